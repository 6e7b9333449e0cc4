"""inference/beam_search.py: batched beam search against exhaustive search, greedy decoding and
im2txt's design (benchmarks/im2txt_caption_generator.py), on a fake StepModel and a real
ShowAndTell."""
from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np
import pytest
import tensorflow as tf

from benchmarks.im2txt_caption_generator import CaptionGenerator
from inference.beam_search import Caption, beam_search
from schemas.config import Model
from trainer.model import build_model

START, END, A, B, C = range(5)  # the fake vocabulary: <S>, </S> and three words
VOCAB = 5
MAX_TOKENS = 32  # the fake's prefix capacity: <S> and up to 31 more tokens

# (image id, the words after <S>) -> next-token probabilities [VOCAB]
Distribution = Callable[[int, tuple[int, ...]], np.ndarray]


class PrefixModel:
    """A StepModel whose next-token distribution is any function of (image, words so far).

    `inputs` are image ids, int [N]. The state is nested, {"image": int32 [N], "prefix":
    (tokens int32 [N, MAX_TOKENS], lengths int32 [N])}: every token fed so far, <S> first, so
    the logits come from the prefix the state carries, and a beam search that tiles or gathers
    state rows wrongly reads the wrong distribution. Logits are the log-probabilities.
    """

    def __init__(self, distribution: Distribution):
        self.distribution = distribution
        self.calls: list[int] = []  # the rows of each step call

    def initial_state(self, inputs) -> dict:
        images = tf.convert_to_tensor(inputs, tf.int32)
        count = images.shape[0]
        return {"image": images, "prefix": (tf.zeros([count, MAX_TOKENS], tf.int32), tf.zeros([count], tf.int32))}

    def step(self, input_words, state: dict) -> tuple[tf.Tensor, dict]:
        words = np.asarray(input_words)
        self.calls.append(len(words))
        tokens, lengths = (np.array(part) for part in state["prefix"])
        rows = np.arange(len(words))
        tokens[rows, lengths] = words
        lengths += 1
        images = np.asarray(state["image"])
        probabilities = [self.distribution(int(images[i]), tuple(tokens[i, 1 : lengths[i]].tolist())) for i in rows]
        logits = tf.constant(np.log(probabilities), tf.float32)
        return logits, {"image": state["image"], "prefix": (tf.constant(tokens), tf.constant(lengths))}


def search(model: PrefixModel, images: list[int], **options) -> list[list[Caption]]:
    return beam_search(model, tf.constant(images, tf.int32), start_id=START, end_id=END, **options)


def random_distribution(image: int, words: tuple[int, ...]) -> np.ndarray:
    """Seeded by (image, words): a different softmax for every prefix of every image."""
    logits = np.random.default_rng([image, len(words), *words]).normal(scale=2.0, size=VOCAB)
    return np.exp(logits) / np.exp(logits).sum()


def table(rules: dict[tuple[int, ...], dict[int, float]], default: dict[int, float]) -> Distribution:
    """The same distribution for every image: `rules[words]` or `default`, each some tokens'
    probabilities, the rest of the mass spread over the other tokens unevenly (no ties)."""

    def distribution(image: int, words: tuple[int, ...]) -> np.ndarray:
        given = rules.get(words, default)
        others = [token for token in range(VOCAB) if token not in given]
        weights = np.array([1.0 / (rank + 1) for rank in range(len(others))])
        probabilities = np.zeros(VOCAB)
        probabilities[list(given)] = list(given.values())
        probabilities[others] = (1.0 - sum(given.values())) * weights / weights.sum()
        return probabilities

    return distribution


def log_prob(distribution: Distribution, image: int, tokens: tuple[int, ...]) -> float:
    """Sum of the log-probabilities of `tokens` after <S>."""
    return sum(math.log(distribution(image, tokens[:i])[token]) for i, token in enumerate(tokens))


def exhaustive_search(
    distribution: Distribution, image: int, max_words: int, count: int, length_normalization: float = 0.0
) -> list[Caption]:
    """The `count` best of every finished caption of up to `max_words` words (</S> never inside)."""
    finished = []
    for length in range(max_words + 1):
        for words in itertools.product([START, A, B, C], repeat=length):
            total = log_prob(distribution, image, (*words, END))
            finished.append(Caption(words, total, total / (length + 2) ** length_normalization, True))
    return sorted(finished, key=lambda caption: -caption.score)[:count]


def greedy_search(distribution: Distribution, image: int, max_words: int) -> Caption:
    """The most probable token each step, until </S> or after max_words words the one last token."""
    words: tuple[int, ...] = ()
    while True:
        token = int(np.argmax(distribution(image, words)))
        if token == END:
            total = log_prob(distribution, image, (*words, END))
            return Caption(words, total, total, True)
        if len(words) == max_words:
            total = log_prob(distribution, image, words)
            return Caption(words, total, total, False)
        words += (token,)


def assert_same(actual: list[Caption], expected: list[Caption]) -> None:
    """The same captions in the same order; log_prob and score up to float32 rounding."""
    assert [(c.word_ids, c.finished) for c in actual] == [(c.word_ids, c.finished) for c in expected]
    for got, want in zip(actual, expected):
        assert got.log_prob == pytest.approx(want.log_prob, abs=1e-5)
        assert got.score == pytest.approx(want.score, abs=1e-5)


# --- exhaustive, greedy, im2txt -----------------------------------------------------------------


@pytest.mark.parametrize("length_normalization", [0.0, 0.7])
@pytest.mark.parametrize("max_words, beam_size", [(1, VOCAB), (3, (VOCAB - 1) ** 3)])
def test_wide_beam_equals_exhaustive_search(max_words, beam_size, length_normalization):
    """Beam search prunes nothing, and so returns the exhaustive search's best `beam_size`
    finished captions, when (a) beam_size >= V, so every slot offers every token, and (b)
    beam_size >= (V - 1) ** max_words, the most partial captions there can be (V - 1 tokens
    that are not </S>, max_words deep), so every one keeps a slot. With max_words = 1 that is
    the issue's "beam >= vocabulary" exactly. For longer captions beam >= V alone is not enough
    (next test), so the second case uses (V - 1) ** 3 = 64."""
    model = PrefixModel(random_distribution)

    results = search(
        model, [0, 1, 2], beam_size=beam_size, max_caption_length=max_words, length_normalization=length_normalization
    )

    for image, captions in enumerate(results):
        assert len(captions) == beam_size
        assert_same(captions, exhaustive_search(random_distribution, image, max_words, beam_size, length_normalization))


def test_a_vocabulary_wide_beam_can_miss_the_best_longer_caption():
    # The best caption, "C C" (0.1 * 0.8 * 0.99), has a prefix that ranks 6th after two words
    # (A A, A B, A C, B A, B B are likelier), so a beam of V = 5 drops it; 64 keeps everything.
    distribution = table(
        {
            (): {A: 0.6, B: 0.2, C: 0.1, END: 0.01},
            (A,): {A: 0.35, B: 0.3, C: 0.25},
            (B,): {A: 0.55, B: 0.44},
            (C,): {C: 0.8},
            (C, C): {END: 0.99},
        },
        default={END: 0.05},
    )
    best = exhaustive_search(distribution, 0, max_words=3, count=1)[0]

    vocabulary_wide = search(PrefixModel(distribution), [0], beam_size=VOCAB, max_caption_length=3)[0]
    exhaustive_wide = search(PrefixModel(distribution), [0], beam_size=(VOCAB - 1) ** 3, max_caption_length=3)[0]

    assert best.word_ids == (C, C)
    assert (C, C) not in [c.word_ids for c in vocabulary_wide]
    assert_same(exhaustive_wide[:1], [best])


def test_beam_size_one_is_greedy_decoding():
    model = PrefixModel(random_distribution)

    results = search(model, list(range(8)), beam_size=1, max_caption_length=4)

    for image, captions in enumerate(results):
        assert_same(captions, [greedy_search(random_distribution, image, max_words=4)])


def test_beam_beats_greedy_when_the_likeliest_first_word_leads_nowhere():
    # Greedy takes A (0.5) then </S> (0.3): p = 0.15. B (0.4) then </S> (0.9) is p = 0.36.
    distribution = table(
        {(): {A: 0.5, B: 0.4}, (A,): {END: 0.3, A: 0.28, B: 0.22, C: 0.19}},
        default={END: 0.9, A: 0.04, B: 0.03, C: 0.02},
    )

    greedy = search(PrefixModel(distribution), [0], beam_size=1, max_caption_length=5)[0]
    beam = search(PrefixModel(distribution), [0], beam_size=2, max_caption_length=5)[0]

    assert [(c.word_ids, round(c.prob, 6)) for c in greedy] == [((A,), 0.15)]
    assert [(c.word_ids, round(c.prob, 6)) for c in beam] == [((B,), 0.36), ((A,), 0.15)]
    assert_same(beam, exhaustive_search(distribution, 0, max_words=5, count=2))


def test_im2txt_slicing_defect_is_not_reproduced():
    """im2txt's `argsort(p)[:-beam_size]` expands each partial caption by every word but its
    beam_size best (tensorflow/models issue 6513). Here the best caption is "A" (p = 0.81); the
    defect never looks at A and ends with a caption over 100 times less probable."""
    distribution = table({(): {A: 0.9, B: 0.05, END: 0.03}, (A,): {END: 0.9}}, default={END: 0.9, A: 0.05})
    model = PrefixModel(distribution)
    options = dict(start_id=START, end_id=END, beam_size=3, max_caption_length=4)

    ours = beam_search(model, tf.constant([0]), **options)[0]
    defective = CaptionGenerator(model, im2txt_slicing=True, **options).beam_search(tf.constant([0]))
    fixed = CaptionGenerator(model, **options).beam_search(tf.constant([0]))

    assert ours[0].word_ids == (A,) and ours[0].prob == pytest.approx(0.81, rel=1e-5)
    assert_same(ours, exhaustive_search(distribution, 0, max_words=4, count=3))
    assert defective[0].score < ours[0].score - math.log(100)
    assert defective[0].word_ids[0] != A
    assert_same(fixed, ours)


@pytest.mark.parametrize(
    "beam_size, max_words, length_normalization", [(3, 4, 0.0), (2, 6, 0.0), (3, 4, 0.5), (4, 3, 1.0), (1, 5, 0.0)]
)
def test_im2txt_design_with_the_slicing_fixed_gives_the_same_captions(beam_size, max_words, length_normalization):
    """The benchmark's baseline (one image at a time, Python heaps) agrees caption for caption,
    including the pruned searches exhaustive search cannot check."""
    model = PrefixModel(random_distribution)
    options = dict(start_id=START, end_id=END, beam_size=beam_size, max_caption_length=max_words)
    im2txt = CaptionGenerator(model, length_normalization_factor=length_normalization, **options)

    results = beam_search(model, tf.constant(list(range(6))), length_normalization=length_normalization, **options)

    for image, captions in enumerate(results):
        assert_same(captions, im2txt.beam_search(tf.constant([image])))


# --- scores, lengths, fallback ------------------------------------------------------------------


def test_length_normalization_divides_finished_scores_by_tokens_with_start_and_end():
    # "" (p = 0.35, log -1.05) beats "A B" (p = 0.27, log -1.31) until both are divided by their
    # tokens: <S> </S> is 2 tokens (-0.52 at x = 1), <S> A B </S> is 4 (-0.33).
    distribution = table({(): {A: 0.6, END: 0.35}, (A,): {B: 0.5, END: 0.05}, (A, B): {END: 0.9}}, default={END: 0.9})
    model = PrefixModel(distribution)

    plain = search(model, [0], beam_size=3, max_caption_length=3)[0]
    normalized = search(model, [0], beam_size=3, max_caption_length=3, length_normalization=1.0)[0]

    plain_order, normalized_order = ([c.word_ids for c in captions] for captions in (plain, normalized))
    assert plain_order[0] == () and plain_order.index(()) < plain_order.index((A, B))
    assert normalized_order[0] == (A, B) and normalized_order.index((A, B)) < normalized_order.index(())
    assert all(c.score == c.log_prob for c in plain)
    for caption in normalized:
        assert caption.log_prob == pytest.approx(log_prob(distribution, 0, (*caption.word_ids, END)), abs=1e-5)
        assert caption.score == pytest.approx(caption.log_prob / (len(caption.word_ids) + 2), abs=1e-6)
    assert [c.score for c in normalized] == sorted((c.score for c in normalized), reverse=True)


def test_no_finished_caption_falls_back_to_the_best_unfinished_ones():
    # </S> is never among a caption's 2 likeliest tokens: every caption hits 3 words. The best
    # 3 words: A A A (0.5 * 0.45 * 0.5 = 0.1125), then A B A (0.5 * 0.35 * 0.5) beats A A B (0.5 * 0.45 * 0.3).
    even, odd = table({}, default={END: 0.001, A: 0.5, B: 0.3}), table({}, default={END: 0.001, A: 0.45, B: 0.35})
    distribution = lambda image, words: (odd if len(words) % 2 else even)(image, words)  # noqa: E731
    model = PrefixModel(distribution)

    captions = search(model, [0], beam_size=2, max_caption_length=3)[0]

    assert [(c.word_ids, c.finished) for c in captions] == [((A, A, A), False), ((A, B, A), False)]
    for caption in captions:
        assert caption.score == caption.log_prob == pytest.approx(log_prob(distribution, 0, caption.word_ids), abs=1e-5)
    assert model.calls == [2] * 4  # 3 words, then the step that could only have finished them


def test_a_caption_may_finish_at_exactly_max_words_and_finished_ones_are_never_mixed_with_unfinished():
    # After two words only "A A" may end (</S> 0.6): it finishes at the length limit; the other
    # live caption hits the limit unfinished and is left out, as im2txt never mixes the two.
    distribution = table({(A, A): {END: 0.6, A: 0.3}}, default={A: 0.5, B: 0.4, END: 0.0001})
    model = PrefixModel(distribution)

    captions = search(model, [0], beam_size=2, max_caption_length=2)[0]

    assert [(c.word_ids, c.finished) for c in captions] == [((A, A), True)]
    assert captions[0].prob == pytest.approx(0.5 * 0.5 * 0.6, rel=1e-5)


# --- batching -----------------------------------------------------------------------------------


def test_each_image_in_a_batch_gets_the_captions_it_gets_alone():
    images = [4, 0, 7, 2, 9]
    together = search(PrefixModel(random_distribution), images, beam_size=3, max_caption_length=6)

    for image, captions in zip(images, together):
        assert_same(captions, search(PrefixModel(random_distribution), [image], beam_size=3, max_caption_length=6)[0])


def test_one_step_call_per_decoding_step_on_every_beam_of_every_image():
    # </S> takes 0.9 at every step: after 2 steps each image has 2 finished captions better than
    # any partial one could become, so the search stops there, far from max_caption_length.
    model = PrefixModel(table({}, default={END: 0.9}))

    results = search(model, [0, 1, 2], beam_size=2, max_caption_length=20)

    assert model.calls == [3 * 2, 3 * 2]
    assert all(len(captions) == 2 and all(c.finished for c in captions) for captions in results)


def test_the_search_stops_for_the_batch_only_when_its_last_image_is_done():
    ends_early = table({}, default={END: 0.9})
    runs_on = table({}, default={END: 0.001, A: 0.5, B: 0.29})
    model = PrefixModel(lambda image, words: (ends_early if image == 0 else runs_on)(image, words))

    early, late = search(model, [0, 1], beam_size=2, max_caption_length=5)

    assert model.calls == [4] * 6
    assert [c.word_ids for c in early] == [(), (START,)] and all(c.finished for c in early)
    assert [len(c.word_ids) for c in late] == [5, 5] and not any(c.finished for c in late)


def test_no_images_no_captions_and_no_steps():
    model = PrefixModel(random_distribution)

    assert search(model, []) == []
    assert model.calls == []


# --- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"start_id": -1}, "start_id must be a word id"),
        ({"end_id": START}, "start_id and end_id must differ"),
        ({"end_id": VOCAB}, f"end_id {VOCAB} is outside the model's {VOCAB} word ids"),
        ({"start_id": VOCAB + 3}, f"start_id {VOCAB + 3} is outside the model's {VOCAB} word ids"),
    ],
)
def test_word_ids_that_are_no_two_distinct_ids_of_the_model_raise_value_error(options, message):
    with pytest.raises(ValueError, match=message):
        beam_search(PrefixModel(random_distribution), tf.constant([0]), **{"start_id": START, "end_id": END, **options})


def test_ids_are_checked_before_any_step_when_the_model_declares_its_vocab_size():
    model = PrefixModel(random_distribution)
    model.vocab_size = VOCAB

    with pytest.raises(ValueError, match=f"start_id {VOCAB} is outside the model's {VOCAB} word ids"):
        beam_search(model, tf.constant([0]), start_id=VOCAB, end_id=END)
    assert model.calls == []


def test_a_state_whose_tensors_disagree_on_the_number_of_images_raises():
    class Ragged(PrefixModel):
        def initial_state(self, inputs):
            return {**super().initial_state(inputs), "extra": tf.zeros([3, 1])}

    with pytest.raises(ValueError, match=r"one leading dimension N, got \[2, 3\]"):
        search(Ragged(random_distribution), [0, 1])


def test_logits_of_the_wrong_shape_raise():
    class Flat(PrefixModel):
        def step(self, input_words, state):
            logits, state = super().step(input_words, state)
            return tf.reshape(logits, [-1]), state

    with pytest.raises(ValueError, match=r"step must return logits \[6, vocab\] for 6 words, got \(30,\)"):
        search(Flat(random_distribution), [0, 1], beam_size=3)


# --- a real ShowAndTell -------------------------------------------------------------------------


def test_show_and_tell_captions_carry_the_models_own_log_probabilities():
    model_cfg = Model(
        encoder="mobilenet_v3_small", image_size=32, encoder_weights="none", embedding_size=16, num_lstm_units=16
    )
    model = build_model(model_cfg, vocab_size=10)
    images = tf.random.stateless_uniform([2, 32, 32, 3], seed=[1, 2], minval=-1.0, maxval=1.0)
    options = dict(start_id=1, end_id=2, beam_size=3, max_caption_length=5)

    results = beam_search(model, images, **options)

    assert len(results) == 2
    for image, captions in enumerate(results):
        assert 1 <= len(captions) <= 3
        assert [c.score for c in captions] == sorted((c.score for c in captions), reverse=True)
        for caption in captions:
            assert all(0 <= word < 10 and word != 2 for word in caption.word_ids)
            assert len(caption.word_ids) <= 5 and (caption.finished or len(caption.word_ids) == 5)
            targets = [*caption.word_ids, *([2] if caption.finished else [])]
            state, total = model.initial_state(images[image : image + 1]), 0.0
            for previous, target in zip([1, *caption.word_ids], targets):
                logits, state = model.step(tf.constant([previous]), state)
                total += float(tf.nn.log_softmax(logits)[0, target])
            assert caption.log_prob == pytest.approx(total, abs=1e-4)
        assert_same(captions, CaptionGenerator(model, **options).beam_search(images[image : image + 1]))
