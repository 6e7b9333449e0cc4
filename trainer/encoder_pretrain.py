"""Encoder pretraining on caption words: a stand-in for ImageNet weights where none can be loaded.

im2txt's phase 1 trains the LSTM on a frozen, ImageNet-pretrained Inception v3, whose features
already tell objects and colours apart. Offline (the demo) there are no pretrained weights, and an
encoder learning from scratch through the captioner's single image input learns slowly: the model
first settles on captions that ignore the image. With `train.phase1.encoder_pretrain_steps > 0`,
a fresh phase 1 first trains the encoder alone, with a throw-away linear head, to predict which
vocabulary words the captions of the training split contain (multi-label, sigmoid cross-entropy),
then phase 1 proceeds as im2txt's, on that encoder (frozen unless `train_encoder`).

Only training-split captions are used, through the same input pipeline as phase 1.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import tensorflow as tf

from schemas import progress
from schemas.errors import ShowtellError

log = logging.getLogger("showtell.train")

MOMENTUM = 0.9  # SGD momentum of the pretraining optimizer
LOG_EVERY = 100  # pretraining steps between progress lines


def caption_word_targets(target_seqs: tf.Tensor, mask: tf.Tensor, vocab_size: int) -> tf.Tensor:
    """Multi-hot [B, vocab_size] float32: 1 for each word id among a caption's real target words.

    target_seqs = [[4, 9, 2], [5, 2, 0]]    mask = [[1, 1, 1], [1, 1, 0]]    vocab_size = 10
    -> [[0, 0, 1, 0, 1, 0, 0, 0, 0, 1],       (words 2, 4 and 9)
        [0, 0, 1, 0, 0, 1, 0, 0, 0, 0]]       (words 2 and 5; the padding 0 is not a word)
    """
    present = tf.one_hot(target_seqs, vocab_size) * tf.cast(mask, tf.float32)[..., tf.newaxis]
    return tf.reduce_max(present, axis=1)


def pretrain_encoder(
    strategy, model, batches, *, steps: int, learning_rate: float, vocab_size: int, log_progress: bool = True
) -> float:
    """Trains `model.encoder` for `steps` global steps on `batches` (the phase's distributed
    iterator) and returns the last `LOG_EVERY` steps' mean loss, logging it every `LOG_EVERY`
    steps and showing each step on the progress display (`schemas.progress`) if `log_progress`
    (one worker of many is enough). The encoder is left trainable
    or not as it was; its batch norms keep the statistics they learned.

    Gradients are averaged over the replicas (every replica holds the same number of captions),
    so the encoder stays equal on every worker. A non-finite loss is a ShowtellError.
    """
    import keras

    if steps < 1:
        raise ValueError(f"pretrain_encoder needs steps >= 1, got {steps}")
    was_trainable = model.encoder.trainable
    model.encoder.trainable = True
    with strategy.scope():
        head = keras.layers.Dense(vocab_size, name="caption_word_head")
        head.build((None, model.encoder.output_shape[-1]))
        variables = model.encoder.trainable_variables + head.trainable_variables
        optimizer = keras.optimizers.SGD(learning_rate, momentum=MOMENTUM)
        optimizer.build(variables)

    def replica_step(features, targets, mask):
        with tf.GradientTape() as tape:
            logits = head(model.encoder(features["images"], training=True))
            labels = caption_word_targets(targets, mask, vocab_size)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, logits))
        context = tf.distribute.get_replica_context()
        grads = context.all_reduce(tf.distribute.ReduceOp.MEAN, tape.gradient(loss, variables))
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    @tf.function
    def train_step(iterator):
        loss = strategy.run(replica_step, args=next(iterator))
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, loss, axis=None)

    recent: deque[float] = deque(maxlen=LOG_EVERY)
    try:
        for step in range(1, steps + 1):
            loss = float(train_step(batches))
            if not math.isfinite(loss):
                raise ShowtellError(
                    f"encoder pretraining: loss is {loss} at step {step} (learning rate {learning_rate:g})"
                )
            recent.append(loss)
            if log_progress:
                progress.advance(at=step, **{"encoder pretraining loss": sum(recent) / len(recent)})
            if log_progress and (step % LOG_EVERY == 0 or step == steps):
                log.info(
                    "encoder pretraining: step %d/%d, caption-word loss %.4f", step, steps, sum(recent) / len(recent)
                )
    finally:
        model.encoder.trainable = was_trainable
    return sum(recent) / len(recent)
