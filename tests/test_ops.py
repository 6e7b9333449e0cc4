"""trainer/ops.py: im2txt's caption sequences, masked loss, perplexity, schedule and clipping."""
from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from schemas.config import Phase, Phase1, Phase2
from trainer import ops

START, A, DOG, END = 1, 4, 230, 2


def test_caption_to_sequences_is_im2txts_worked_example():
    input_seq, target_seq, mask = ops.caption_to_sequences(tf.constant([START, A, DOG, END], tf.int64))

    assert input_seq.numpy().tolist() == [START, A, DOG]
    assert target_seq.numpy().tolist() == [A, DOG, END]
    assert mask.numpy().tolist() == [1, 1, 1]
    assert mask.dtype == tf.int32


def test_padded_batch_pads_sequences_with_zeros_and_mask_zero():
    captions = tf.data.Dataset.from_tensors(tf.constant([START, A, DOG, END], tf.int64)).concatenate(
        tf.data.Dataset.from_tensors(tf.constant([START, A, END], tf.int64))
    )

    input_seqs, target_seqs, mask = next(iter(captions.map(ops.caption_to_sequences).padded_batch(2)))

    assert input_seqs.numpy().tolist() == [[START, A, DOG], [START, A, 0]]
    assert target_seqs.numpy().tolist() == [[A, DOG, END], [A, END, 0]]
    assert mask.numpy().tolist() == [[1, 1, 1], [1, 1, 0]]


# Two captions of 3 and 1 real words, vocabulary of 4; the second row's last two steps are padding.
LOGITS = np.array(
    [
        [[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0]],
        [[0.3, -0.2, 0.1, 2.5], [9.0, -9.0, 4.0, 0.0], [-3.0, 7.0, 0.0, 1.0]],
    ],
    np.float32,
)
TARGETS = np.array([[0, 3, 2], [3, 0, 0]], np.int64)
MASK = np.array([[1, 1, 1], [1, 0, 0]], np.int32)


def _hand_cross_entropy(logits: np.ndarray, target: int) -> float:
    return math.log(sum(math.exp(x) for x in logits)) - float(logits[target])


def test_masked_cross_entropy_sums_over_real_words_only():
    expected = sum(
        _hand_cross_entropy(LOGITS[b, t], TARGETS[b, t]) for b in range(2) for t in range(3) if MASK[b, t]
    )

    loss_sum, words = ops.masked_cross_entropy(tf.constant(LOGITS), tf.constant(TARGETS), tf.constant(MASK))

    assert words.dtype == loss_sum.dtype == tf.float32
    assert float(words) == 4.0
    assert float(loss_sum) == pytest.approx(expected, rel=1e-6)


def test_masked_cross_entropy_ignores_logits_at_padded_steps():
    changed = LOGITS.copy()
    changed[1, 1:] = np.array([[50.0, -50.0, 0.0, 3.0], [0.0, 0.0, 100.0, -7.0]])

    before = ops.masked_cross_entropy(tf.constant(LOGITS), tf.constant(TARGETS), tf.constant(MASK))
    after = ops.masked_cross_entropy(tf.constant(changed), tf.constant(TARGETS), tf.constant(MASK))

    assert float(after[0]) == float(before[0])
    assert float(after[1]) == float(before[1])


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_masked_cross_entropy_of_half_precision_logits_is_float32(dtype):
    reference, _ = ops.masked_cross_entropy(tf.constant(LOGITS), tf.constant(TARGETS), tf.constant(MASK))

    loss_sum, words = ops.masked_cross_entropy(tf.cast(LOGITS, dtype), tf.constant(TARGETS), tf.constant(MASK))

    assert loss_sum.dtype == words.dtype == tf.float32
    assert float(loss_sum) == pytest.approx(float(reference), rel=2e-2)


def test_perplexity_is_exp_of_the_mean_loss():
    assert ops.perplexity(math.log(12.0)) == pytest.approx(12.0)
    assert isinstance(ops.perplexity(0.0), float)
    assert ops.perplexity(1000.0) == math.inf  # a diverged loss: inf, not OverflowError

    tensor = ops.perplexity(tf.constant(math.log(40.0)))
    assert tf.is_tensor(tensor)
    assert float(tensor) == pytest.approx(40.0, rel=1e-6)


def test_phase1_rate_halves_at_exactly_eight_epochs_of_steps():
    phase = Phase1()  # 2.0, halved every 8 epochs

    rates = {step: ops.learning_rate(step, phase, steps_per_epoch=100) for step in (0, 799, 800, 1599, 1600)}

    assert rates == {0: 2.0, 799: 2.0, 800: 1.0, 1599: 1.0, 1600: 0.5}


def test_fractional_steps_per_epoch_decays_on_the_first_whole_step_past_the_boundary():
    phase = Phase1()  # 8 epochs of 18,323.84375 steps (586,363 captions / 32) = 146,590.75 steps

    assert ops.learning_rate(146_590, phase, 586_363 / 32) == 2.0
    assert ops.learning_rate(146_591, phase, 586_363 / 32) == 1.0


def test_decay_factor_one_keeps_the_rate_constant():
    phase = Phase2()  # 0.0005, factor 1.0

    assert {ops.learning_rate(step, phase, 100) for step in (0, 800, 10_000_000)} == {0.0005}


def test_phase_schedule_matches_learning_rate_on_tensors():
    schedule = ops.PhaseSchedule(Phase1(), steps_per_epoch=100)

    rates = [float(schedule(tf.constant(step, tf.int64))) for step in (0, 799, 800, 1600, 2_000_000)]

    assert rates == [2.0, 2.0, 1.0, 0.5, ops.learning_rate(2_000_000, Phase1(), 100)]
    assert schedule(0).dtype == tf.float32


def test_phase_schedule_round_trips_through_keras_serialization():
    schedule = ops.PhaseSchedule(Phase1(learning_rate=0.5, epochs_per_decay=2.0), steps_per_epoch=10.5)

    config = json.loads(json.dumps(keras.saving.serialize_keras_object(schedule)))
    restored = keras.saving.deserialize_keras_object(config)

    assert isinstance(restored, ops.PhaseSchedule)
    assert restored.phase.model_dump() == schedule.phase.model_dump(include=set(Phase.model_fields))
    assert restored.steps_per_epoch == 10.5
    assert float(restored(21)) == float(schedule(21)) == 0.25


def test_sgd_follows_the_phase_schedule():
    optimizer = keras.optimizers.SGD(learning_rate=ops.PhaseSchedule(Phase1(), steps_per_epoch=1))
    variable = keras.Variable(1.0)
    rates = []
    for _ in range(9):
        rates.append(float(optimizer.learning_rate))
        optimizer.apply_gradients([(tf.constant(0.0), variable)])

    assert rates == [2.0] * 8 + [1.0]


def test_clipping_scales_gradients_down_to_the_norm():
    grads = [tf.constant([3.0, 0.0]), tf.constant([[0.0], [4.0]])]  # global norm 5

    clipped, norm = ops.clip_by_global_norm(grads, 1.0)

    assert float(norm) == pytest.approx(5.0)
    assert float(tf.linalg.global_norm(clipped)) == pytest.approx(1.0)
    np.testing.assert_allclose(clipped[0].numpy(), [0.6, 0.0], rtol=1e-6)


def test_clipping_leaves_small_gradients_and_none_alone():
    grads = [tf.constant([0.3, 0.4]), None]  # a frozen variable has no gradient

    clipped, norm = ops.clip_by_global_norm(grads, 5.0)

    assert clipped[1] is None
    assert float(norm) == pytest.approx(0.5)
    np.testing.assert_allclose(clipped[0].numpy(), grads[0].numpy(), rtol=1e-6)
