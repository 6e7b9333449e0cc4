"""The training optimizer: im2txt's plain SGD on a phase's staircase schedule (`trainer.ops.PhaseSchedule`).

The train step (`trainer.train_loop.make_train_step`) all-reduces the gradient of the global
batch's mean loss itself, once, then clips it by its global norm, as im2txt does. Keras'
optimizers, under a `tf.distribute` strategy, sum the gradients they are given across replicas
again, which would multiply that global gradient by the number of replicas:

    2 replicas, each holding the all-reduced and clipped global gradient g
    keras.optimizers.SGD.apply_gradients   -> applies g + g = 2g
    PreReducedSGD.apply_gradients          -> applies g

so the optimizer is a `PreReducedSGD`, which leaves that second sum out.
"""
from __future__ import annotations

from schemas.config import Phase


def pre_reduced_sgd_class() -> type:
    """`PreReducedSGD`: keras.optimizers.SGD that takes gradients already summed across replicas.

    Built on first use, so that importing this module does not import Keras.
    """
    import keras

    if not hasattr(keras.optimizers.SGD, "_all_reduce_sum_gradients"):  # guard against a Keras change
        raise RuntimeError("keras.optimizers.SGD has no _all_reduce_sum_gradients: update trainer.optimizer")

    class PreReducedSGD(keras.optimizers.SGD):
        """SGD that takes gradients already summed across replicas (Keras would sum them again)."""

        def _all_reduce_sum_gradients(self, grads_and_vars):
            return list(grads_and_vars)

    return PreReducedSGD


def make_optimizer(phase: Phase, steps_per_epoch: float, mixed_precision: str, model):
    """im2txt's plain SGD on the phase's staircase schedule, built for `model`'s trainable variables;
    `mixed_precision: fp16` wraps it in a LossScaleOptimizer.

    Call it inside the strategy's scope, so that its variables exist (mirrored) before a restore.
    """
    import keras

    from trainer.ops import PhaseSchedule

    optimizer = pre_reduced_sgd_class()(learning_rate=PhaseSchedule(phase, steps_per_epoch))
    if mixed_precision == "fp16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer
