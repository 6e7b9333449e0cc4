"""Averaging the encoder's batch-norm moving statistics over the replicas of a distributed run.

Keras 3 creates batch norm's moving mean and variance with no cross-replica aggregation, so while
the encoder trains (phase 2, encoder pretraining) each worker's statistics follow its own batches
and drift apart. Training itself reads the batch's statistics, so the steps stay equal on every
worker; only the moving statistics, which inference reads, differ. Averaged before each
checkpoint and after pretraining, the model holds statistics of every worker's data:

    moving_mean of one channel     worker 0: 0.20    worker 1: 0.40
    after sync()                   worker 0: 0.30    worker 1: 0.30

Every non-trainable float variable of the model is averaged; a model without any gets a `sync`
that does nothing.
"""
from __future__ import annotations

from typing import Callable


def make_statistics_sync(strategy, model) -> Callable[[], None]:
    """`sync()`: sets the model's batch-norm moving statistics to their mean over the replicas.

    Every worker must call `sync()` at the same point: it is a collective (one all-reduce).
    """
    import tensorflow as tf

    variables = [v for v in model.non_trainable_variables if str(v.dtype).startswith("float")]
    if not variables:
        return lambda: None

    def replica_means():
        context = tf.distribute.get_replica_context()
        return context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in variables])

    @tf.function
    def sync():
        means = strategy.run(replica_means)
        for variable, mean in zip(variables, means):
            variable.assign(strategy.experimental_local_results(mean)[0])

    return sync
