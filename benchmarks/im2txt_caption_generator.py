"""im2txt's CaptionGenerator, ported to showtell's StepModel: the baseline that `caption_bench.py`
times against `inference.beam_search`.

Reproduces the design of tensorflow/models research/im2txt/im2txt/inference_utils/
caption_generator.py: one image at a time; its initial state for that one image, then per step
one model call on that image's live partial captions (1, then up to beam_size rows), their states
kept as numpy rows per caption; each partial caption expanded by its beam_size most probable
words (`np.argsort` of the softmax, `math.log` per word, words below p = 1e-12 skipped); Python
heaps (`TopN`) keep the beam_size best partial and finished captions; no early stop (it runs until
no partial caption is left or the length limit); when no caption finished, the partial ones are
returned.

    generator = CaptionGenerator(model, start_id=1, end_id=2, beam_size=3, max_caption_length=20)
    generator.beam_search(images[:1])   # [Caption(...), ...], best first, as beam_search's per image

The departures, each so that it returns exactly what `inference.beam_search` returns:
- The slicing defect (tensorflow/models issue 6513) is fixed: `argsort(p)[-beam_size:]` keeps
  the most probable words where im2txt's `argsort(p)[:-beam_size]` kept all but them.
  `im2txt_slicing=True` restores the defect (tests show what it costs).
- `max_caption_length` counts words, as beam_search does: max_caption_length steps that may add a
  word, then one that may only finish, and the partial captions fed to that last step are the
  fallback. im2txt counted `<S>` too and ran max_caption_length - 1 steps.
- The model is a StepModel (logits out); the softmax im2txt's graph computed is taken here in
  numpy float32, and the words fed are int32.
- Captions come out as `inference.beam_search.Caption` (words without `<S>` and `</S>`).
"""
from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np
import tensorflow as tf

from inference.beam_search import Caption, StepModel

MIN_PROBABILITY = 1e-12  # im2txt skips rarer words ("Avoid log(0).")


class PartialCaption:
    """im2txt's Caption: a complete or partial caption, ordered by score."""

    def __init__(self, sentence: list[int], state: Any, logprob: float, score: float):
        self.sentence = sentence  # word ids, <S> first (and </S> last when complete)
        self.state = state  # the model state after the caption's last word but one: numpy rows
        self.logprob = logprob
        self.score = score

    def __lt__(self, other: "PartialCaption") -> bool:
        return self.score < other.score

    def to_caption(self, finished: bool) -> Caption:
        words = self.sentence[1:-1] if finished else self.sentence[1:]
        return Caption(tuple(words), self.logprob, self.score, finished)


class TopN:
    """im2txt's TopN: the top n elements of an incrementally provided set."""

    def __init__(self, n: int):
        self._n = n
        self._data: list[PartialCaption] = []

    def size(self) -> int:
        return len(self._data)

    def push(self, x: PartialCaption) -> None:
        if len(self._data) < self._n:
            heapq.heappush(self._data, x)
        else:
            heapq.heappushpop(self._data, x)

    def extract(self, sort: bool = False) -> list[PartialCaption]:
        """All elements (descending when `sort`), leaving the TopN empty."""
        data, self._data = self._data, []
        if sort:
            data.sort(reverse=True)
        return data


class CaptionGenerator:
    """im2txt's CaptionGenerator over a StepModel, for one image at a time."""

    def __init__(
        self,
        model: StepModel,
        *,
        start_id: int,
        end_id: int,
        beam_size: int = 3,
        max_caption_length: int = 20,
        length_normalization_factor: float = 0.0,
        im2txt_slicing: bool = False,
    ):
        self.model = model
        self.start_id = start_id
        self.end_id = end_id
        self.beam_size = beam_size
        self.max_caption_length = max_caption_length
        self.length_normalization_factor = length_normalization_factor
        self.im2txt_slicing = im2txt_slicing

    def beam_search(self, image: Any) -> list[Caption]:
        """Captions of one image (`image` has leading dimension 1), best first."""
        initial_state = tf.nest.map_structure(lambda tensor: np.asarray(tensor)[0], self.model.initial_state(image))
        partial_captions = TopN(self.beam_size)
        partial_captions.push(PartialCaption([self.start_id], initial_state, 0.0, 0.0))
        complete_captions = TopN(self.beam_size)

        for step in range(self.max_caption_length + 1):
            partial_captions_list = partial_captions.extract()
            can_grow = step < self.max_caption_length  # the last step may only finish captions
            input_feed = np.array([c.sentence[-1] for c in partial_captions_list], np.int32)
            state_feed = tf.nest.map_structure(lambda *rows: np.stack(rows), *[c.state for c in partial_captions_list])
            logits, new_states = self.model.step(input_feed, state_feed)
            softmax = _softmax(np.asarray(logits, np.float32))
            new_states = tf.nest.map_structure(np.asarray, new_states)

            for i, partial_caption in enumerate(partial_captions_list):
                word_probabilities = softmax[i]
                state = tf.nest.map_structure(lambda rows, i=i: rows[i], new_states)
                for w in self._most_likely_words(word_probabilities):
                    p = word_probabilities[w]
                    if p < MIN_PROBABILITY:
                        continue
                    sentence = partial_caption.sentence + [int(w)]
                    logprob = partial_caption.logprob + math.log(p)
                    score = logprob
                    if w == self.end_id:
                        if self.length_normalization_factor > 0:
                            score /= len(sentence) ** self.length_normalization_factor
                        complete_captions.push(PartialCaption(sentence, state, logprob, score))
                    elif can_grow:
                        partial_captions.push(PartialCaption(sentence, state, logprob, score))
            if partial_captions.size() == 0:
                break

        # Never a mixture of complete and partial captions: a partial caption could score higher.
        if complete_captions.size():
            return [c.to_caption(finished=True) for c in complete_captions.extract(sort=True)]
        return [c.to_caption(finished=False) for c in sorted(partial_captions_list, reverse=True)]

    def _most_likely_words(self, word_probabilities: np.ndarray) -> np.ndarray:
        """Word ids from the most probable down: the beam_size best (im2txt: all but them)."""
        order = np.argsort(word_probabilities)
        return (order[: -self.beam_size] if self.im2txt_slicing else order[-self.beam_size :])[::-1]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)
