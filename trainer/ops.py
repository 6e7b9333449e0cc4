"""The small TensorFlow ops of im2txt's training: sequences from a caption, the masked loss,
perplexity, the learning-rate schedule and gradient clipping (docs/im2txt.md, "Model").

Pure functions of tensors and config, with no model in sight, so the training loop, the
evaluation and the tests share one definition of each.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from schemas.config import Phase


def caption_to_sequences(caption_ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Splits one caption into im2txt's (input_seq, target_seq, mask), as `batch_with_dynamic_pad`.

    The model reads word t and must predict word t + 1, so the input is the caption without its
    last word and the target the caption without its first; the mask marks every real word:

        caption_ids = [<S>, a, dog, </S>]      (length 4; <S> = 1, a = 4, dog = 230, </S> = 2)
        input_seq   = [<S>, a, dog]            [1, 4, 230]
        target_seq  = [a, dog, </S>]           [4, 230, 2]
        mask        = [1, 1, 1]                int32, length 3

    `padded_batch` then pads every sequence of a batch to its longest with zeros, so a shorter
    caption [<S>, a, </S>] batched with the one above becomes

        input_seqs  = [[1, 4, 230], [1, 4, 0]]
        target_seqs = [[4, 230, 2], [4, 2, 0]]
        mask        = [[1, 1, 1],   [1, 1, 0]]    (the padded step is not a word: no loss)
    """
    input_seq = caption_ids[:-1]
    target_seq = caption_ids[1:]
    return input_seq, target_seq, tf.ones_like(input_seq, dtype=tf.int32)


def masked_cross_entropy(logits: tf.Tensor, targets: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(sum of the next-word cross-entropies over the real words, number of real words).

    logits [B, T, V] (any float dtype; computed in float32), targets [B, T] int ids, mask [B, T]
    (1 for a real word, 0 for padding). Both results are float32 scalars and sums, not a mean:
    im2txt averages over the real words of the whole batch, so a distributed step all-reduces
    both sums across replicas and divides once (a mean of per-replica means would weight a
    replica's words by how few it had).
    """
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=tf.cast(logits, tf.float32))
    weights = tf.cast(mask, tf.float32)
    return tf.reduce_sum(losses * weights), tf.reduce_sum(weights)


def perplexity(mean_loss: float | tf.Tensor) -> float | tf.Tensor:
    """exp(mean per-word cross-entropy): a float for a Python or NumPy number, else a tensor.

    A diverged loss gives inf, not an OverflowError.
    """
    if tf.is_tensor(mean_loss):
        return tf.exp(tf.cast(mean_loss, tf.float32))
    with np.errstate(over="ignore"):
        return float(np.exp(np.float64(mean_loss)))


def learning_rate(step: int | float | tf.Tensor, phase: Phase, steps_per_epoch: float) -> float | tf.Tensor:
    """im2txt's staircase decay: `phase.learning_rate` times the decay factor once per
    `phase.epochs_per_decay` epochs of steps. A float for a Python step, a tensor for a tensor.

    Phase 1's 2.0 halved every 8 epochs, at 100 steps an epoch: 2.0 for steps 0-799, 1.0 from
    step 800, 0.5 from 1600. A decay factor of 1.0 (phase 2) keeps it constant.
    """
    steps_per_decay = phase.epochs_per_decay * steps_per_epoch
    decays = step // steps_per_decay
    return phase.learning_rate * phase.learning_rate_decay_factor**decays


@keras.saving.register_keras_serializable(package="showtell")
class PhaseSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`learning_rate` as a Keras schedule, for `keras.optimizers.SGD(learning_rate=...)`."""

    def __init__(self, phase: Phase, steps_per_epoch: float):
        self.phase = phase
        self.steps_per_epoch = float(steps_per_epoch)

    def __call__(self, step):
        # float64: a float32 step is exact only to 2**24 and decay boundaries are fractional.
        rate = learning_rate(tf.cast(step, tf.float64), self.phase, self.steps_per_epoch)
        return tf.cast(rate, tf.float32)

    def get_config(self) -> dict:
        # The base Phase's fields only: phase 1's extra keys (encoder pretraining) are not the schedule's.
        return {
            "phase": self.phase.model_dump(include=set(Phase.model_fields)),
            "steps_per_epoch": self.steps_per_epoch,
        }

    @classmethod
    def from_config(cls, config: dict) -> "PhaseSchedule":
        return cls(Phase.model_validate(config["phase"]), config["steps_per_epoch"])


def clip_by_global_norm(grads: list, clip_norm: float) -> tuple[list, tf.Tensor]:
    """Scales the gradients together so their global norm is at most `clip_norm` (im2txt's
    `clip_gradients=5.0`); returns them and the norm before clipping.

    A None gradient (a frozen or unused variable) stays None and counts for nothing.
    """
    return tf.clip_by_global_norm(grads, clip_norm)
