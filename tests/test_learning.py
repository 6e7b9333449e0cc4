"""Learning check: the demo's training budget (configs/local.yaml) brings validation perplexity
well below the unigram perplexity of the same captions. Real sample data, Beam, Ray and TF.

The baseline is a unigram model: each next word drawn from the training captions' word
frequencies, blind to the image and to the words before it.
"""
from __future__ import annotations

import collections
import math
from typing import Iterable

import numpy as np
import pytest

from schemas.config import join_url
from schemas.layout import FINAL_DIR
from schemas.records import CAPTION_IDS_KEY
from trainer import checkpoints as ckpt
from trainer.inputs import shard_files
from trainer.validation import model_perplexity

pytestmark = pytest.mark.slow


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
    final = join_url(config.train_dir, ckpt.phase_name(phase), FINAL_DIR)
    model = ckpt.CheckpointLoader().load(final).model
    eval_files = shard_files(config.data_dir, split)
    return {
        "perplexity": model_perplexity(model, eval_files, model.model_cfg.image_size),
        "unigram_perplexity": unigram_perplexity(shard_files(config.data_dir, "train"), eval_files, model.vocab_size),
    }


@pytest.mark.parametrize("phase", [1, 2])
def test_demo_budget_beats_the_unigram_baseline_by_far(demo_run, phase):
    scores = validate_phase(demo_run.config, phase=phase)

    assert scores["unigram_perplexity"] > 10  # a real baseline: dozens of words in play
    assert scores["perplexity"] < scores["unigram_perplexity"] / 3, scores
