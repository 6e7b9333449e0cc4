"""Batched beam search for captions, as im2txt's CaptionGenerator (docs/im2txt.md, "Inference")
but keeping the best partial captions (im2txt keeps the worst: tensorflow/models issue 6513)
and searching every image of a batch at once.

    captions = beam_search(model, images, start_id=1, end_id=2, beam_size=3)
    captions[0][0]    # Caption(word_ids=(0, 12, 7, 3), log_prob=-3.21, score=-3.21, finished=True)

Any `StepModel` works: ShowAndTell over float images, a Captioner over JPEG bytes, a test fake.

The search, per image, as im2txt: start from one partial caption, `<S>`, with log-probability 0.
Each decoding step expands every live partial caption by its `beam_size` most probable next
tokens; the candidates that are `</S>` join the image's finished captions (the `beam_size` best
kept, by score), the others compete for the `beam_size` live slots (the best kept, by
log-probability). A caption holds at most `max_caption_length` words: after that many words a
partial caption may still pick `</S>` (one last step that only finishes), and one that does not
is left unfinished. An image's result is its finished captions, best first, or, when it has
none, its best unfinished ones (im2txt's fallback; never a mixture of the two).

Batched: all images' beams are rows of one model batch of fixed size N * beam_size, so
`model.step` runs once per decoding step whatever N is, and a tf.function step traces once.
Worked example of the shapes, N = 2 images, beam_size k = 3, vocabulary V = 5, state [h, c]:

    state = model.initial_state(inputs)      # h, c: [2, units]
    state = tiled                            # h, c: [6, units]; rows 0-2 are image 0's slots, 3-5 image 1's
    words = [<S>] * 6                        # int32 [6]
    live log-probs [2, 3] = [[0, -inf, -inf], [0, -inf, -inf]]   # one live caption per image at first
    each step:
      logits, state = model.step(words, state)          # [6, 5], h, c: [6, units]
      log_softmax, top_k(min(k, V) = 3)                 # [6, 3] token log-probs and ids
      + the slot's live log-prob, reshaped per image    # [2, 9] candidates; candidate i came from slot i // 3
      </S> candidates + finished [2, 3] -> top_k(3)     # the new finished captions [2, 3]
      other candidates -> top_k(3)                      # the new live captions [2, 3], their parents [2, 3]
      state rows gathered from parent + image * k       # h, c: [6, units]; words [6] = the new words

One search, two ways to run it: `search_beams` is a tf.while_loop over decoding steps. Called
eagerly (`beam_search`, over any StepModel: a checkpoint's model, an export's `step` signature,
a test's fake), the loop is Python and each step is one model call from Python. Traced in a
tf.function (inference/caption_signature.py), the whole search is one graph: the SavedModel's
`caption` signature returns captions in one call, with no Python on the client.

Slots without a caption (a -inf log-probability: the first step's copies, an image that ran out
of candidates or is done) still go through the model; their candidates keep -inf and so never
become captions. The bookkeeping after each model step is one compiled tf.function (`_advance`),
traced once per batch shape.

Stopping: after `max_caption_length` words and the step that may finish them, or earlier once no
image can still improve: an image is done when it holds `beam_size` finished captions and the
worst of them scores at least the best any live caption could still reach. Log-probabilities
only fall as words are added, so that bound is the best live log-probability, divided by the
largest length normaliser, (max_caption_length + 2) ** length_normalization, when normalising.
The bound is exact, so stopping early never changes a caption.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Protocol

import numpy as np
import tensorflow as tf

State = Any  # a tf.nest structure (list/tuple/dict) of tensors, each with leading dimension N

NO_CAPTION = float("-inf")  # the log-probability and score of an empty slot


class StepModel(Protocol):
    """What beam search drives. A model with an integer `vocab_size` attribute (ShowAndTell and
    Captioner have one) gets `start_id` and `end_id` checked before its first step; otherwise they
    are checked against the first step's logits."""

    def initial_state(self, inputs: Any) -> State:
        """N images (whatever form the model takes) -> state, leading dim N."""

    def step(self, input_words: tf.Tensor, state: State) -> tuple[tf.Tensor, State]:
        """int [M] words + state -> (logits float [M, V], new state)."""


@dataclasses.dataclass(frozen=True)
class Caption:
    """One caption of one image."""

    word_ids: tuple[int, ...]  # the generated words, without <S> and without </S>
    log_prob: float  # sum of the log-probabilities of every generated token, </S> included when finished
    # What captions are ranked by: log_prob, or for finished captions with length normalisation
    # x > 0, log_prob / (len(word_ids) + 2) ** x: the length counts <S> and </S>, as im2txt's
    # len(sentence).
    score: float
    finished: bool  # ended with </S>; False when it hit max_caption_length

    @property
    def prob(self) -> float:
        """exp(log_prob), printed as im2txt's (p=0.040413)."""
        return math.exp(self.log_prob)


def beam_search(
    model: StepModel,
    inputs: Any,
    *,
    start_id: int,
    end_id: int,
    beam_size: int = 3,
    max_caption_length: int = 20,
    length_normalization: float = 0.0,
) -> list[list[Caption]]:
    """Per input image, up to beam_size captions, best first.

    Captions hold at most `max_caption_length` words, `</S>` not counted. With
    `length_normalization` x > 0, a finished caption of L words scores log_prob / (L + 2) ** x
    (its tokens with `<S>` and `</S>`, as im2txt), which favours longer captions; unfinished
    ones score their log_prob. With 0.0 every score is the log-probability.

    `model.step` is called once per decoding step, on N * beam_size rows (N = the leading
    dimension of `model.initial_state(inputs)`), at most max_caption_length + 1 times: this is
    `search_beams` run eagerly, its loop a Python loop around the model's calls.

    The three settings are the user's and are taken as checked where they entered (the `eval`
    config section, or the `showtell caption` flags that mirror it): beam_size and
    max_caption_length at least 1, length_normalization finite and at least 0. What is checked
    here are programming errors, as ValueError (schemas/errors.py): start/end ids outside the
    logits (or equal), a state whose tensors disagree on N, or logits of the wrong shape.
    """
    check_word_ids(start_id, end_id, getattr(model, "vocab_size", None))
    state = model.initial_state(inputs)
    num_images = _num_images(state)
    if num_images == 0:
        return []
    rows = num_images * beam_size

    def checked_step(words: tf.Tensor, state: State) -> tuple[tf.Tensor, State]:
        logits, state = model.step(words, state)
        return _checked_logits(logits, rows, start_id, end_id), state

    best = search_beams(
        checked_step,
        state,
        start_id=start_id,
        end_id=end_id,
        beam_size=beam_size,
        max_caption_length=max_caption_length,
        length_normalization=length_normalization,
    )
    return _captions(tf.nest.map_structure(np.asarray, best))


class BestCaptions(NamedTuple):
    """The result of `search_beams`: per image, its finished captions, best first, or, when it
    has none, its best unfinished ones. Slot j of image i holds no caption when log_probs[i, j]
    is -inf (its length is then 0). Shapes for N images, beam_size k, max_caption_length L:"""

    word_ids: tf.Tensor  # int32 [N, k, L]: the first `lengths` columns are the caption's words
    lengths: tf.Tensor  # int32 [N, k]
    log_probs: tf.Tensor  # float32 [N, k]: as Caption.log_prob
    scores: tf.Tensor  # float32 [N, k]: as Caption.score, what the slots are ranked by
    finished: tf.Tensor  # bool [N]: the image's captions ended with </S> (else: the fallback)


def search_beams(
    step: Callable[[tf.Tensor, State], tuple[tf.Tensor, State]],
    state: State,
    *,
    start_id: int,
    end_id: int,
    beam_size: int,
    max_caption_length: int,
    length_normalization: float,
) -> BestCaptions:
    """The search itself, from the initial state of N images (every tensor [N, ...]):
    `step(words int32 [N * k], state) -> (logits [N * k, V], state)` is called once per decoding
    step. Run eagerly, its loop is a Python loop (`beam_search`); traced in a tf.function, it is
    a tf.while_loop with N free, so one call of the function returns the captions (the
    SavedModel's `caption` signature, inference/caption_signature.py). Settings as beam_search's.
    """
    k, max_words = beam_size, max_caption_length
    num_images = tf.shape(tf.nest.flatten(state)[0])[0]
    rows = num_images * k
    state = tf.nest.map_structure(lambda tensor: tf.repeat(tensor, k, axis=0), state)
    no_words = tf.zeros([num_images, k, max_words], tf.int32)
    no_captions = tf.fill([num_images, k], NO_CAPTION)
    beams = _Beams(
        live_log_probs=tf.tile(tf.constant([[0.0] + [NO_CAPTION] * (k - 1)]), [num_images, 1]),
        live_words=no_words,
        finished_scores=no_captions,
        finished_log_probs=no_captions,
        finished_words=no_words,
        finished_lengths=tf.zeros([num_images, k], tf.int32),
    )
    settings = _Settings(
        end_id=tf.constant(end_id, tf.int32),
        length_normalization=tf.constant(length_normalization, tf.float32),
        live_bound_divisor=tf.constant((max_words + 2) ** length_normalization, tf.float32),
    )

    def grow(length, beams, words, state, all_done):  # one more word on every live caption
        logits, state = step(words, state)
        beams, words, state, all_done = _advance(beams, logits, state, length, settings, True)
        return length + 1, beams, words, state, all_done

    def finish():  # after max_caption_length words, the step that may only add </S>
        logits, _ = step(words, state)
        return _advance(beams, logits, state, length, settings, False)[0]

    start = (tf.constant(0), beams, tf.fill([rows], tf.constant(start_id, tf.int32)), state, tf.constant(False))
    length, beams, words, state, all_done = tf.while_loop(
        lambda *loop: tf.logical_not(loop[-1]), grow, start, maximum_iterations=max_words
    )
    beams = tf.cond(all_done, lambda: beams, finish)

    # Per image: the finished captions if it has any, else the live ones (`length` words each).
    finished = tf.reduce_any(tf.math.is_finite(beams.finished_scores), axis=1)
    live_lengths = tf.where(tf.math.is_finite(beams.live_log_probs), length, 0)
    return BestCaptions(
        word_ids=tf.where(finished[:, None, None], beams.finished_words, beams.live_words),
        lengths=tf.where(finished[:, None], beams.finished_lengths, live_lengths),
        log_probs=tf.where(finished[:, None], beams.finished_log_probs, beams.live_log_probs),
        scores=tf.where(finished[:, None], beams.finished_scores, beams.live_log_probs),
        finished=finished,
    )


def _captions(best: BestCaptions) -> list[list[Caption]]:
    """BestCaptions of numpy arrays -> per image, its Captions, best first."""
    return [
        [
            Caption(
                tuple(best.word_ids[image, j, : best.lengths[image, j]].tolist()),
                float(best.log_probs[image, j]),
                float(best.scores[image, j]),
                finished=bool(best.finished[image]),
            )
            for j in np.flatnonzero(np.isfinite(best.log_probs[image]))
        ]
        for image in range(len(best.finished))
    ]


class _Beams(NamedTuple):
    """The search so far, per image: beam_size live and beam_size finished captions, best first
    (a -inf log-probability or score: no caption)."""

    live_log_probs: tf.Tensor  # float32 [N, k]
    live_words: tf.Tensor  # int32 [N, k, max_caption_length]: the first `length` columns
    finished_scores: tf.Tensor  # float32 [N, k]
    finished_log_probs: tf.Tensor  # float32 [N, k]
    finished_words: tf.Tensor  # int32 [N, k, max_caption_length]: the first `finished_lengths`
    finished_lengths: tf.Tensor  # int32 [N, k]


class _Settings(NamedTuple):
    """beam_search's arguments that `_advance` needs, as tensors so that they never retrace it."""

    end_id: tf.Tensor  # int32 []
    length_normalization: tf.Tensor  # float32 []
    live_bound_divisor: tf.Tensor  # float32 []: (max_caption_length + 2) ** length_normalization


@tf.function
def _advance(
    beams: _Beams, logits: tf.Tensor, state: State, length: tf.Tensor, settings: _Settings, grow: bool
) -> tuple[_Beams, tf.Tensor, State, tf.Tensor]:
    """One decoding step's bookkeeping, as the module docstring's worked example: the logits
    [N * k, V] of the next token after each live caption of `length` words -> (the beams, the
    next words [N * k] and their state rows, whether every image is done). With `grow` False
    (the step after max_caption_length words) only the finished captions change.

    Compiled: it traces once per shape (N, k, V, max_caption_length, the state's) and `grow`.
    """
    k = beams.live_words.shape[1]
    num_images = tf.shape(beams.live_words)[0]  # free in a traced search
    rows = num_images * k
    log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32))
    tokens_per_slot = min(k, log_probs.shape[-1])
    token_log_probs, token_ids = tf.math.top_k(log_probs, tokens_per_slot)  # [rows, tokens_per_slot]
    totals = tf.reshape(tf.reshape(beams.live_log_probs, [rows, 1]) + token_log_probs, [num_images, -1])
    candidates = tf.reshape(token_ids, [num_images, -1])  # [N, k * tokens_per_slot]
    is_end = tf.equal(candidates, settings.end_id)

    # Finished: the k best of the finished captions and the </S> candidates (length + 2 tokens each).
    end_log_probs = tf.where(is_end, totals, NO_CAPTION)
    normalizer = tf.pow(tf.cast(length + 2, tf.float32), settings.length_normalization)
    finished_scores, picked = tf.math.top_k(tf.concat([beams.finished_scores, end_log_probs / normalizer], 1), k)
    sources = tf.where(picked < k, picked, k + (picked - k) // tokens_per_slot)  # rows of [finished; live]
    new_lengths = tf.fill([num_images, k], length)
    beams = beams._replace(
        finished_scores=finished_scores,
        finished_log_probs=tf.gather(tf.concat([beams.finished_log_probs, end_log_probs], 1), picked, batch_dims=1),
        finished_words=tf.gather(tf.concat([beams.finished_words, beams.live_words], 1), sources, batch_dims=1),
        finished_lengths=tf.gather(tf.concat([beams.finished_lengths, new_lengths], 1), sources, batch_dims=1),
    )
    if not grow:
        return beams, tf.zeros([rows], tf.int32), state, tf.constant(True)

    # Live: the k best word candidates, their parents' words and state rows.
    live_log_probs, picked = tf.math.top_k(tf.where(is_end, NO_CAPTION, totals), k)
    parents = picked // tokens_per_slot  # [N, k], slots of the same image
    new_words = tf.gather(candidates, picked, batch_dims=1)  # [N, k]
    parent_words = tf.gather(beams.live_words, parents, batch_dims=1)
    columns = tf.range(tf.shape(beams.live_words)[2])[None, None, :]
    live_words = tf.where(columns == length, new_words[:, :, None], parent_words)
    parent_rows = tf.reshape(parents + tf.range(num_images)[:, None] * k, [rows])
    state = tf.nest.map_structure(lambda tensor: tf.gather(tensor, parent_rows), state)

    # Done: the worst kept finished caption beats anything the live ones could still become
    # (an image with no live caption left: -inf >= -inf). A done image's live captions go.
    done = finished_scores[:, k - 1] >= live_log_probs[:, 0] / settings.live_bound_divisor
    live_log_probs = tf.where(done[:, None], NO_CAPTION, live_log_probs)
    beams = beams._replace(live_log_probs=live_log_probs, live_words=live_words)
    return beams, tf.reshape(new_words, [rows]), state, tf.reduce_all(done)


def check_word_ids(start_id: int, end_id: int, vocab_size: int | None = None) -> None:
    """ValueError unless `<S>`'s and `</S>`'s ids are two different word ids (a caller's bug),
    below `vocab_size` when it is given."""
    for name, value in (("start_id", start_id), ("end_id", end_id)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"beam search: {name} must be a word id (an integer >= 0), got {value!r}")
    if start_id == end_id:
        raise ValueError(f"beam search: start_id and end_id must differ, both are {start_id}")
    if isinstance(vocab_size, int):
        for name, value in (("start_id", start_id), ("end_id", end_id)):
            if value >= vocab_size:
                raise ValueError(f"beam search: {name} {value} is outside the model's {vocab_size} word ids")


def _num_images(state: State) -> int:
    """N, the leading dimension every tensor of the initial state shares."""
    sizes = {int(tf.shape(tensor)[0]) for tensor in tf.nest.flatten(state)}
    if len(sizes) != 1:
        raise ValueError(
            f"beam search: initial_state must give tensors with one leading dimension N, got {sorted(sizes) or 'none'}"
        )
    return sizes.pop()


def _checked_logits(logits: tf.Tensor, rows: int, start_id: int, end_id: int) -> tf.Tensor:
    """`logits` as a tensor when it is [rows, V] with both ids below V; ValueError otherwise."""
    logits = tf.convert_to_tensor(logits)
    if logits.shape.rank != 2 or logits.shape[0] != rows:
        raise ValueError(f"beam search: step must return logits [{rows}, vocab] for {rows} words, got {logits.shape}")
    check_word_ids(start_id, end_id, logits.shape[1])
    return logits
