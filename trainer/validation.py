"""Held-out perplexity of a trained captioner, and the baseline it must beat.

Perplexity is im2txt's: exp of the cross-entropy of each next word, averaged over the real
(unmasked) words of the whole split, with the image fed and the true previous words given
(teacher forcing). The baseline is a unigram model: each next word drawn from the training
captions' word frequencies, blind to the image and to the words before it.
"""
from __future__ import annotations

import collections
import math
from typing import Iterable

import numpy as np

from schemas.layout import FINAL_DIR
from schemas.records import CAPTION_IDS_KEY


def model_perplexity(model, files: list[str], image_size: int, batch_size: int = 32) -> float:
    """Teacher-forced perplexity of `model` (a ShowAndTell) over every record of `files`."""
    from trainer.inputs import make_dataset
    from trainer.ops import masked_cross_entropy

    dataset = make_dataset(files, image_size=image_size, batch_size=batch_size, training=False, repeat=False)
    loss_sum = words = 0.0
    for features, targets, mask in dataset:
        batch_loss, batch_words = masked_cross_entropy(model(features, training=False), targets, mask)
        loss_sum += float(batch_loss)
        words += float(batch_words)
    if not words:
        raise ValueError(f"no caption words in {files}")
    return math.exp(loss_sum / words)


def _next_word_ids(files: Iterable[str]) -> Iterable[np.ndarray]:
    """Per record, the ids a captioner must predict: the caption's ids after `<S>`."""
    import tensorflow as tf

    for serialized in tf.data.TFRecordDataset(list(files)):
        example = tf.train.SequenceExample.FromString(serialized.numpy())
        feature = example.feature_lists.feature_list[CAPTION_IDS_KEY].feature
        yield np.array([f.int64_list.value[0] for f in feature[1:]], dtype=np.int64)


def unigram_perplexity(train_files: list[str], eval_files: list[str], vocab_size: int) -> float:
    """Perplexity on `eval_files` of next-word frequencies counted over `train_files`.

    Add-one smoothing over the whole vocabulary (`<UNK>` included), so no word has probability 0.
    """
    counts = collections.Counter()
    for ids in _next_word_ids(train_files):
        counts.update(ids.tolist())
    total = sum(counts.values()) + vocab_size
    log_prob = words = 0
    for ids in _next_word_ids(eval_files):
        for word in ids.tolist():
            log_prob += math.log((counts[word] + 1) / total)
            words += 1
    if not words:
        raise ValueError(f"no caption words in {eval_files}")
    return math.exp(-log_prob / words)


def validate_phase(config, phase: int, split: str = "val") -> dict[str, float]:
    """Perplexity of a phase's published checkpoint on `split`, beside the unigram baseline."""
    from schemas.config import join_url
    from trainer import checkpoints as ckpt
    from trainer.inputs import shard_files

    final = join_url(config.train_dir, ckpt.phase_name(phase), FINAL_DIR)
    model, trained = ckpt.load_final_model(final)
    eval_files = shard_files(config.data_dir, split)
    return {
        "perplexity": model_perplexity(model, eval_files, trained.model.image_size),
        "unigram_perplexity": unigram_perplexity(shard_files(config.data_dir, "train"), eval_files, model.vocab_size),
    }

