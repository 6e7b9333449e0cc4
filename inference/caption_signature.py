"""The SavedModel's `caption` signature: the whole beam search in the graph, so a client that
knows nothing of showtell (TF Serving, `saved_model_cli`, a Python process with only TensorFlow)
gets captions from one call, instead of ~20 `step` round trips and a beam search of its own.

    caption = make_caption_function(endpoints, words, start_id=1, end_id=2, search=Search(beam_size=3))
    caption(images=tf.constant([jpeg_bytes, png_bytes]))
    # {"captions":  string  [2, 3]      b"a large red circle on a white background", ... best first
    #  "word_ids":  int64   [2, 3, 20]  each caption's word ids, then -1 (max_caption_length columns)
    #  "log_probs": float32 [2, 3]      its log-probability (</S> included when finished)
    #  "scores":    float32 [2, 3]      what ranks it (log_probs, or length-normalised: Search)
    #  "finished":  bool    [2]         the image's captions ended with </S>; else its best unfinished ones}

A slot with no caption (an image with fewer than beam_size) has caption "", word ids all -1 and
log_prob -inf. The search is `inference.beam_search.search_beams`, the one `showtell caption`
runs eagerly over a checkpoint, traced here with N free; its settings (`Search`) are fixed when
the function is traced and recorded in showtell_export.json (`caption`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import tensorflow as tf

from inference.beam_search import check_word_ids, search_beams
from schemas.config import Eval
from schemas.vocabulary import UNKNOWN_WORD

SIGNATURE = "caption"
NO_WORD = -1  # word_ids' padding after a caption's last word


@dataclasses.dataclass(frozen=True)
class Search:
    """The beam search settings a `caption` signature is traced with: the `eval` keys of the
    same names (`Search.of(config.eval)`), which evaluation chose the exported model with."""

    beam_size: int = Eval().beam_size  # captions kept per image
    max_caption_length: int = Eval().max_caption_length  # words per caption at most, </S> not counted
    length_normalization: float = Eval().length_normalization  # rank finished captions by log p / tokens**this

    @classmethod
    def of(cls, settings: object) -> Search:
        """The fields of any object with these attributes (an `Eval`, parsed flags)."""
        return cls(**{name: getattr(settings, name) for name in SEARCH_FIELDS})

    def describe(self) -> str:
        """'beam_size 3, max_caption_length 20, length_normalization 0.0'"""
        return ", ".join(f"{name} {getattr(self, name)}" for name in SEARCH_FIELDS)


SEARCH_FIELDS = tuple(field.name for field in dataclasses.fields(Search))


def make_caption_function(
    endpoints: object, words: Sequence[str], *, start_id: int, end_id: int, search: Search
) -> Callable[..., dict[str, tf.Tensor]]:
    """The `caption` tf.function over an Endpoints' `initial_state` and `step` (a built model's or a
    loaded SavedModel's; inference/captioner.py): `images` string [N] -> the outputs above. Word
    ids past `words` read as <UNK>, as Captioner.sentence does."""
    check_word_ids(start_id, end_id, getattr(endpoints.owner, "vocab_size", None))
    vocabulary = tf.constant([*words, UNKNOWN_WORD])  # id -> word; the last entry for every id past the words
    last_word = len(words)

    def step(input_words: tf.Tensor, state: list[tf.Tensor]) -> tuple[tf.Tensor, list[tf.Tensor]]:
        outputs = endpoints.step(input_words=tf.cast(input_words, tf.int64), state_h=state[0], state_c=state[1])
        return outputs["logits"], [outputs["state_h"], outputs["state_c"]]

    k, max_words = search.beam_size, search.max_caption_length

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")], autograph=False)
    def caption(images: tf.Tensor) -> dict[str, tf.Tensor]:
        no_images = {
            "captions": tf.zeros([0, k], tf.string),
            "word_ids": tf.zeros([0, k, max_words], tf.int64),
            "log_probs": tf.zeros([0, k]),
            "scores": tf.zeros([0, k]),
            "finished": tf.zeros([0], tf.bool),
        }
        return tf.cond(tf.size(images) > 0, lambda: search_images(images), lambda: no_images)

    def search_images(images: tf.Tensor) -> dict[str, tf.Tensor]:
        state = endpoints.initial_state(images=images)
        best = search_beams(
            step,
            [state["state_h"], state["state_c"]],
            start_id=start_id,
            end_id=end_id,
            beam_size=search.beam_size,
            max_caption_length=search.max_caption_length,
            length_normalization=search.length_normalization,
        )
        in_caption = tf.range(max_words)[None, None, :] < best.lengths[:, :, None]
        shown = in_caption & (best.word_ids != start_id) & (best.word_ids != end_id)  # as Captioner.sentence
        tokens = tf.gather(vocabulary, tf.minimum(best.word_ids, last_word))
        # Ragged [N, (k), (words)] -> joined, [N, (k)], every row k long -> [N, k].
        sentences = tf.strings.reduce_join(tf.ragged.boolean_mask(tokens, shown), axis=-1, separator=" ")
        return {
            "captions": tf.reshape(sentences.flat_values, [-1, k]),
            "word_ids": tf.where(in_caption, tf.cast(best.word_ids, tf.int64), tf.constant(NO_WORD, tf.int64)),
            "log_probs": best.log_probs,
            "scores": best.scores,
            "finished": best.finished,
        }

    return caption
