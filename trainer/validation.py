"""Held-out perplexity of a trained captioner, as the evaluation reports it.

Perplexity is im2txt's: exp of the cross-entropy of each next word, averaged over the real
(unmasked) words of the whole split, with the image fed and the true previous words given
(teacher forcing).
"""
from __future__ import annotations

import math
from typing import Optional


def model_perplexity(
    model, files: list[str], image_size: int, batch_size: int = 32, shard_cache: Optional[dict] = None
) -> float:
    """Teacher-forced perplexity of `model` (a ShowAndTell) over every record of `files` (local
    paths or URLs of any fsspec store); `shard_cache`: `train.shard_cache` as JSON, for remote files
    (default: its defaults)."""
    from schemas.config import ShardCache
    from trainer.inputs import make_dataset
    from trainer.ops import masked_cross_entropy

    cache = ShardCache.model_validate(shard_cache or {})
    dataset = make_dataset(
        files, image_size=image_size, batch_size=batch_size, training=False, repeat=False, shard_cache_config=cache
    )
    loss_sum = words = 0.0
    for features, targets, mask in dataset:
        batch_loss, batch_words = masked_cross_entropy(model(features, training=False), targets, mask)
        loss_sum += float(batch_loss)
        words += float(batch_words)
    if not words:
        raise ValueError(f"no caption words in {files}")
    return math.exp(loss_sum / words)
