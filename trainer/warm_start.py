"""Warm start: a run's training starts from an earlier model (`train.init_from`), its vocabulary
remapped explicitly to the data's (docs/im2txt.md: merged word_counts "quietly wreck" a model).

    source = init_source(config)             # None: train from scratch; else a final/ or an export
    summary = prepare_warm_start(config)     # -> <run_root>/train/warm_start/, which phase 2 starts from

Three weights are indexed by word id: the word embedding's rows, and the logits' kernel columns and
bias. Every other weight is copied as it is, and must have the same shape (the same `model`
settings: encoder, image size, widths). The word-indexed ones are rebuilt for the data's vocabulary:

    word in both vocabularies       keeps its rows                                   (kept)
    <UNK>                           keeps <UNK>'s rows
    word new to the data            <UNK>'s rows: the old model read it as <UNK>     (added)
    word the data no longer has     its rows are dropped: it is <UNK> now            (dropped)
    slack ids (model.vocab_size     never a target: an old slack row where there is one,
      above the words + <UNK>)      else zero weights and a bias of -1e4 (probability 0)

<UNK>'s logit is shared by <UNK> and the n new words, each getting log(n + 1) less, so together
they keep exactly the probability the old model gave <UNK>. So, before its first step, for a
caption made of words both vocabularies hold, the warm-started model's next-word log-probabilities
equal the old model's when no word was dropped; when some were, they equal the old model's
renormalised over the words kept: log p_old(w) - log(1 - p_old(dropped words)).

    old vocabulary  a <S> </S> dog <UNK>=4          new vocabulary  a <S> </S> cat <UNK>=4
    rows(new <- old)  a<-0  <S><-1  </S><-2  cat<-<UNK>(4)  <UNK><-4     kept 3, added 1, dropped 1 (dog)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from typing import TYPE_CHECKING, Any, Optional

import fsspec
import numpy as np
import yaml

from schemas.config import Config, Model, join_url
from schemas.errors import ShowtellError
from schemas.layout import (
    CONFIG_FILE,
    EXPORT_METADATA_FILE,
    MODEL_FILE,
    STATE_FILE,
    WARM_START_DIR,
    WEIGHTS_FILE,
)
from schemas.models_root import baseline_location, models_root_of, read_baseline
from schemas.storage import absolute, exists, publish_dir, read_json, read_text, write_text
from schemas.vocabulary import WORD_COUNTS_FILE, Vocabulary, parse_word_counts
from trainer import checkpoints as ckpt

if TYPE_CHECKING:
    from trainer.model import ShowAndTell

log = logging.getLogger("showtell.train")

# The weights indexed by word id, by the end of their path, and the axis the id indexes.
WORD_INDEXED = {"word_embedding/embeddings": 0, "logits/kernel": 1, "logits/bias": 0}
# `model` settings two models must share for one's weights to start the other (vocab_size may differ).
SAME_MODEL_KEYS = ("encoder", "image_size", "embedding_size", "num_lstm_units")
SLACK_BIAS = -1e4  # the logit bias of a slack id with no old row: exp(-1e4) is 0 in float32
INIT_NONE, INIT_PROMOTED = "none", "promoted"


def warm_start_dir(config: Config) -> str:
    """`<run_root>/train/warm_start/`: the remapped initial weights phase 2 starts from."""
    return join_url(config.train_dir, WARM_START_DIR)


def init_source(config: Config) -> Optional[str]:
    """The model training starts from, as `train.init_from` says: None (from scratch), or the URL
    of a `final/` or an export. `promoted` is the run's pinned baseline (`<run_root>/baseline.json`,
    from `showtell run`'s baseline step) or, with none pinned, `<models_root>/current/` as it is
    now; either way None when no model is promoted."""
    value = config.train.init_from
    if value == INIT_NONE:
        return None
    if value == INIT_PROMOTED:
        if read_baseline(config.run_root) is not None:
            return baseline_location(config.run_root)
        current = join_url(models_root_of(config), "current")
        return current if exists(join_url(current, MODEL_FILE)) else None
    return absolute(value)


def training_config(config: Config, phase: int) -> Config:
    """The config phase `phase` trains with: a warm-started phase 2 (`train.init_from`) trains
    `train.warm_start_steps` steps instead of `train.phase2.steps`."""
    if phase != 2 or init_source(config) is None:
        return config
    phase2 = config.train.phase2.model_copy(update={"steps": config.train.warm_start_steps})
    return config.model_copy(update={"train": config.train.model_copy(update={"phase2": phase2})})


# --- the initial model ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InitialModel:
    """The weights a warm start begins from, by weight path, with what they were built for."""

    url: str  # the final/ or export they come from
    model_cfg: Model  # its model settings
    vocabulary: Vocabulary  # its word_counts.txt
    vocab_size: int  # its word-indexed weights' size (words + <UNK>, and any slack)
    weights: dict[str, np.ndarray]  # weight path -> value


def read_initial_model(url: str) -> InitialModel:
    """The weights of a published `final/` (checked against its state.json's fingerprint) or of
    a `showtell export` folder (its SavedModel's variables, checked the same way)."""
    if exists(join_url(url, EXPORT_METADATA_FILE)):
        return _read_export(url)
    if exists(join_url(url, STATE_FILE)) and exists(join_url(url, CONFIG_FILE)):
        loaded = ckpt.CheckpointLoader().load(url)
        return _initial_model(url, loaded.model, parse_word_counts(loaded.word_counts))
    raise ShowtellError(
        f"train.init_from: {url} is neither a final/ checkpoint (state.json, config.yaml) nor a "
        f"`showtell export` folder ({EXPORT_METADATA_FILE})"
    )


def _initial_model(url: str, model: ShowAndTell, vocabulary: Vocabulary) -> InitialModel:
    weights = {variable.path: variable.numpy() for variable in model.weights}
    return InitialModel(url, model.model_cfg, vocabulary, model.vocab_size, weights)


def _read_export(url: str) -> InitialModel:
    """An export's variables, in the order the model it came from built them (`inference.export`
    saves `model.weights` as a list), put back into a model built from its metadata's settings."""
    import tensorflow as tf

    metadata = read_json(join_url(url, EXPORT_METADATA_FILE))
    if "model" not in metadata or "fingerprint" not in metadata:
        raise ShowtellError(
            f"train.init_from: {url} was exported by an older showtell, without its model settings and weights "
            "fingerprint; start from its final/ checkpoint instead"
        )
    word_counts = read_text(join_url(url, WORD_COUNTS_FILE))
    model = ckpt.build_inference_model(Model.model_validate(metadata["model"]), word_counts)
    with tempfile.TemporaryDirectory(prefix="showtell-init-") as scratch:
        saved = tf.saved_model.load(ckpt.fetch_dir(url, scratch))
        values = [variable.numpy() for variable in saved.model_weights]
    if [v.shape for v in values] != [tuple(w.shape) for w in model.weights]:
        raise ShowtellError(f"train.init_from: {url}'s variables do not fit the model its metadata describes")
    for variable, value in zip(model.weights, values):
        variable.assign(value)
    if ckpt.weights_fingerprint(model) != metadata["fingerprint"]:
        raise ShowtellError(
            f"train.init_from: {url}'s variables do not match the fingerprint in {EXPORT_METADATA_FILE}"
        )
    return _initial_model(url, model, parse_word_counts(word_counts))


def recorded_fingerprint(url: str) -> Optional[str]:
    """The weights fingerprint a final/ (state.json) or an export (its metadata) records: which
    model it holds, read without loading it."""
    document = read_json(join_url(url, EXPORT_METADATA_FILE)) or read_json(join_url(url, STATE_FILE)) or {}
    return document.get("fingerprint")


# --- the remap --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Remap:
    """Which old row each new word id takes (see the module's docstring)."""

    rows: tuple[Optional[int], ...]  # new id -> old id whose rows it takes; None: a slack id with no old row
    added_ids: tuple[int, ...]  # new ids of the words new to the data, and <UNK>: they share <UNK>'s logit
    kept: int  # words in both vocabularies
    added: int  # words only the new one has
    dropped: int  # words only the old one has

    def summary(self) -> dict[str, int]:
        return {"kept": self.kept, "added": self.added, "dropped": self.dropped}


def vocabulary_remap(old: Vocabulary, new: Vocabulary, old_size: int, new_size: int) -> Remap:
    """The rows of a model of vocabulary `old` (word-indexed weights of `old_size` ids) that a
    model of vocabulary `new` (`new_size` ids) starts from.

        vocabulary_remap(["a", "dog"], ["a", "cat"], 3, 3).rows   # (0, 2, 2): cat takes <UNK>'s row
    """
    old_index = {word: i for i, word in enumerate(old.words)}
    old_unk, new_unk = len(old.words), len(new.words)
    rows: list[Optional[int]] = []
    added_ids = [new_unk]
    for new_id, word in enumerate(new.words):
        if word in old_index:
            rows.append(old_index[word])
        else:
            rows.append(old_unk)
            added_ids.append(new_id)
    rows.append(old_unk)
    old_slack = list(range(old_unk + 1, old_size))
    rows.extend(old_slack[i] if i < len(old_slack) else None for i in range(new_size - new_unk - 1))
    kept = len(new.words) - (len(added_ids) - 1)
    return Remap(tuple(rows), tuple(sorted(added_ids)), kept, len(added_ids) - 1, len(old.words) - kept)


def remapped_value(path: str, old_value: np.ndarray, remap: Remap) -> np.ndarray:
    """A word-indexed weight's value for the new vocabulary (`WORD_INDEXED[...]` names the axis)."""
    axis = next(axis for suffix, axis in WORD_INDEXED.items() if path.endswith(suffix))
    moved = np.moveaxis(old_value, axis, 0)
    fresh = np.zeros((len(remap.rows), *moved.shape[1:]), moved.dtype)
    for new_id, old_id in enumerate(remap.rows):
        if old_id is not None:
            fresh[new_id] = moved[old_id]
        elif path.endswith("logits/bias"):
            fresh[new_id] = SLACK_BIAS
    if path.endswith("logits/bias"):
        fresh[list(remap.added_ids)] -= math.log(len(remap.added_ids))
    return np.moveaxis(fresh, 0, axis)


def warm_start_weights(initial: InitialModel, model: ShowAndTell, vocabulary: Vocabulary) -> Remap:
    """Assigns `initial`'s weights to a built `model` of vocabulary `vocabulary`, remapped."""
    old_cfg, new_cfg = initial.model_cfg, model.model_cfg
    differ = [key for key in SAME_MODEL_KEYS if getattr(old_cfg, key) != getattr(new_cfg, key)]
    if differ:
        settings = ", ".join(f"model.{k} {getattr(old_cfg, k)!r}, here {getattr(new_cfg, k)!r}" for k in differ)
        raise ShowtellError(
            f"train.init_from: {initial.url} was built with other model settings ({settings}): "
            "its weights cannot start this model"
        )
    remap = vocabulary_remap(initial.vocabulary, vocabulary, initial.vocab_size, model.vocab_size)
    for variable in model.weights:
        old = initial.weights.get(variable.path)
        if old is None:
            raise ShowtellError(f"train.init_from: {initial.url} has no weight {variable.path}")
        if any(variable.path.endswith(suffix) for suffix in WORD_INDEXED):
            old = remapped_value(variable.path, old, remap)
        if tuple(old.shape) != tuple(variable.shape):
            raise ShowtellError(
                f"train.init_from: {initial.url}'s {variable.path} is {tuple(old.shape)}, "
                f"this model's {tuple(variable.shape)}"
            )
        variable.assign(old)
    return remap


# --- the step ---------------------------------------------------------------------------------


def prepare_warm_start(config: Config) -> dict[str, Any]:
    """Publishes `<run_root>/train/warm_start/` (model.weights.h5, word_counts.txt, config.yaml,
    state.json with the weights' fingerprint, the data's vocabulary id and the remap) from
    `init_source(config)`, and returns state.json. ShowtellError when there is nothing to start from."""
    source = init_source(config)
    if source is None:
        raise ShowtellError(f"train.init_from is {config.train.init_from!r}, and there is no model to start from")
    data_word_counts = ckpt.read_text(join_url(config.data_dir, WORD_COUNTS_FILE))
    vocabulary = parse_word_counts(data_word_counts)
    initial = read_initial_model(source)
    model = ckpt.build_inference_model(config.model, data_word_counts)
    remap = warm_start_weights(initial, model, vocabulary)
    state = {
        "phase": 0,
        "step": 0,
        "fingerprint": ckpt.weights_fingerprint(model),
        "vocab_size": model.vocab_size,
        "vocabulary_id": vocabulary.id,
        "init_from": source,
        "init_fingerprint": recorded_fingerprint(source),
        "init_vocabulary_id": initial.vocabulary.id,
        "remap": remap.summary(),
    }
    out = warm_start_dir(config)
    with publish_dir(out, marker=STATE_FILE) as staging, tempfile.TemporaryDirectory(prefix="showtell-") as scratch:
        model.save_weights(os.path.join(scratch, WEIGHTS_FILE))
        fs, staging_path = fsspec.core.url_to_fs(staging)
        fs.put(os.path.join(scratch, WEIGHTS_FILE), f"{staging_path}/{WEIGHTS_FILE}")
        write_text(join_url(staging, WORD_COUNTS_FILE), data_word_counts)
        write_text(join_url(staging, CONFIG_FILE), yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        write_text(join_url(staging, STATE_FILE), json.dumps(state, indent=1, sort_keys=True) + "\n")
    log.info(
        "warm start from %s: %d words kept, %d added, %d dropped -> %s",
        source, remap.kept, remap.added, remap.dropped, out,
    )
    return state
