"""What a training phase leaves on storage, and how it gets there without half-written files.

    <run_root>/train/phaseN/                 Ray Train's run folder (storage_path=<run_root>/train, name=phaseN)
        checkpoint_000000200/                a checkpoint Ray keeps (`train.phaseN.checkpoints_kept` newest)
            model.weights.h5                 Keras weights of the whole ShowAndTell model
            optimizer.npz                    the optimizer's variables (iterations, slots), in order
            state.json                       phase, step, weights fingerprint, vocabulary id, every report so far
        checkpoint_manager_snapshot.json     Ray's own index of its checkpoints
        history.jsonl                        one line per report, in step order (rank 0 rewrites it)
        tensorboard/                         loss, perplexity, learning rate (rank 0)
        final/                               the published result: everything inference needs
            model.weights.h5, config.yaml, word_counts.txt, state.json

Checkpoints are written by rank 0 into a local temp folder and handed to `ray.train.report`, which
copies them into the run folder, so a crash mid-write never becomes Ray's "latest". `final/` is
assembled in a staging sibling and published whole (`schemas.storage.publish_dir`). Every path is a local path or an
fsspec URL (gs://, s3://, ...).

The vocabulary contract: a checkpoint's state.json records the `vocabulary_id`
(`schemas.vocabulary.vocabulary_id`) of the word_counts.txt it was trained with, and it is used
with no other (`check_vocabulary`): loading a kept checkpoint under another word_counts.txt,
publishing it with one, or loading a final/ whose own word_counts.txt is not the one its state.json
names, is refused. A state.json without `vocabulary_id` (written before showtell recorded it) is
taken as it is: there is nothing to check it against.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import TYPE_CHECKING, Any, Iterable, Optional

import fsspec
import yaml

from schemas.config import Model, join_url
from schemas.errors import ShowtellError
from schemas.layout import CONFIG_FILE, FINAL_DIR, OPTIMIZER_FILE, STATE_FILE, WEIGHTS_FILE
from schemas.storage import absolute, exists, is_local, publish_dir, read_json, read_text, write_text
from schemas.vocabulary import WORD_COUNTS_FILE, parse_word_counts

if TYPE_CHECKING:
    from trainer.model import ShowAndTell

# The columns of history.jsonl, in order (a row may carry more, e.g. grad_norm).
HISTORY_COLUMNS = ("step", "loss", "perplexity", "learning_rate", "examples_per_sec", "wall_time")


def phase_name(phase: int) -> str:
    return f"phase{phase}"


# --- weights --------------------------------------------------------------------------------


def weights_fingerprint(model) -> str:
    """SHA-256 of every weight of `model` (paths, shapes, dtypes, values), by weight path: two
    models with equal fingerprints hold identical weights."""
    digest = hashlib.sha256()
    for variable in sorted(model.weights, key=lambda v: v.path):
        value = variable.numpy()
        digest.update(f"{variable.path}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save_checkpoint(directory: str, model, optimizer, state: dict) -> None:
    """Writes weights, optimizer variables and `state` into a local `directory`."""
    import numpy as np

    model.save_weights(os.path.join(directory, WEIGHTS_FILE))
    arrays = {f"{i:04d}": v.numpy() for i, v in enumerate(optimizer.variables)}
    names = [v.path for v in optimizer.variables]
    np.savez(os.path.join(directory, OPTIMIZER_FILE), __names__=np.array(names), **arrays)
    with open(os.path.join(directory, STATE_FILE), "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=1, sort_keys=True)


def load_checkpoint(directory: str, model, optimizer) -> dict:
    """Restores weights and optimizer variables from a local `directory`; returns its state."""
    import numpy as np

    model.load_weights(os.path.join(directory, WEIGHTS_FILE))
    with np.load(os.path.join(directory, OPTIMIZER_FILE)) as saved:
        names = [str(n) for n in saved["__names__"]]
        variables = list(optimizer.variables)
        if len(names) != len(variables):
            raise ValueError(
                f"checkpoint {directory} holds {len(names)} optimizer variables, this optimizer has "
                f"{len(variables)}: was it written by another phase or model?"
            )
        for i, variable in enumerate(variables):
            variable.assign(saved[f"{i:04d}"])
    return read_state(directory)


def read_state(directory: str) -> dict:
    with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as handle:
        return json.load(handle)


def check_vocabulary(state: dict, word_counts: str, checkpoint: str, source: Optional[str] = None) -> None:
    """Refuses, with a one-line ShowtellError naming both ids, the checkpoint at `checkpoint` whose
    `state` (its state.json) records another vocabulary than `word_counts` (a word_counts.txt's
    text), the one it is about to be used with: its word ids would mean other words. `source` says
    where `word_counts` comes from; None when it is the checkpoint's own (a final/'s), which makes a
    mismatch an inconsistent final/. A state without `vocabulary_id` passes (see above)."""
    recorded = state.get("vocabulary_id")
    given = parse_word_counts(word_counts).id
    if recorded is None or recorded == given:
        return
    if source is None:
        raise ShowtellError(
            f"{checkpoint}: its {STATE_FILE} records vocabulary {recorded} but its {WORD_COUNTS_FILE} is vocabulary "
            f"{given}: an inconsistent checkpoint; put back the {WORD_COUNTS_FILE} of the data it was trained on"
        )
    raise ShowtellError(
        f"checkpoint {checkpoint} was trained on vocabulary {recorded}, not on {given} ({source}): "
        f"use it with the {WORD_COUNTS_FILE} of the data it was trained on"
    )


def fetch_dir(url: str, local_dir: str) -> str:
    """The folder at `url` as a local path: itself when local, else downloaded into `local_dir`."""
    if is_local(url):
        return absolute(url)
    fs, path = fsspec.core.url_to_fs(url)
    fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
    return local_dir


def build_inference_model(model_cfg: Model, word_counts_text: str) -> ShowAndTell:
    """A ShowAndTell of `model_cfg` sized for the vocabulary of `word_counts_text`, its encoder
    built without pretrained weights: a checkpoint's weights go in next."""
    from trainer.model import build_model, resolve_vocab_size

    model_cfg = model_cfg.model_copy(update={"encoder_weights": "none"})
    return build_model(model_cfg, resolve_vocab_size(model_cfg, word_counts_text))


def load_weights(model: ShowAndTell, checkpoint_url: str) -> None:
    """Loads the weights of the checkpoint folder at `checkpoint_url` (a kept
    `checkpoint_NNNNNNNNN/` or a `final/`, any fsspec URL) into a built `model`."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="showtell-checkpoint-") as scratch:
        model.load_weights(os.path.join(fetch_dir(checkpoint_url, scratch), WEIGHTS_FILE))


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint ready for inference."""

    model: ShowAndTell  # built, holding the checkpoint's weights
    model_cfg: Model  # the config that built it
    word_counts: str  # the text of its vocabulary's word_counts.txt


class CheckpointLoader:
    """Loads checkpoints for inference into one built model, rebuilt only when the model config
    or the vocabulary changes (building and tracing cost far more than loading weights).

        loader = CheckpointLoader()
        final = loader.load("runs/x/train/phase2/final")                # config and vocabulary from final/
        kept = loader.load(".../phase1/checkpoint_000000400", model_cfg, word_counts)   # weights only
        kept.model is final.model   # True when both have the same model config and vocabulary

    A published `final/` is built from its own config.yaml and word_counts.txt; one of Ray's kept
    checkpoints holds weights only, so the caller names its model config and vocabulary, which
    must be the one its state.json records (`check_vocabulary`; a final/'s own word_counts.txt
    must be too). The loaded weights must match the fingerprint in the checkpoint's state.json, so
    a garbled file that still loads is caught too (a ShowtellError); a file that does not load
    raises what loading raised.
    """

    def __init__(self) -> None:
        self._key: Optional[tuple[str, str]] = None  # (model config JSON, word_counts.txt) of the built model
        self._model: Optional[ShowAndTell] = None  # built for `_key`

    def load(self, url: str, model_cfg: Optional[Model] = None, word_counts: Optional[str] = None) -> LoadedCheckpoint:
        """The checkpoint folder at `url` (any fsspec URL) loaded; `model_cfg` and `word_counts`
        only for a kept checkpoint, None for a published final/."""
        source = "the word_counts.txt it is loaded with"
        if model_cfg is None:
            from schemas.config import build_config

            model_cfg = build_config(yaml.safe_load(read_text(join_url(url, CONFIG_FILE)))).model
            word_counts, source = read_text(join_url(url, WORD_COUNTS_FILE)), None
        state = read_json(join_url(url, STATE_FILE))
        if not state or "fingerprint" not in state:
            raise ShowtellError(f"{STATE_FILE} is missing or has no weights fingerprint: an incomplete checkpoint")
        check_vocabulary(state, word_counts, url, source)
        key = (json.dumps(model_cfg.model_dump(mode="json", exclude={"encoder_weights"}), sort_keys=True), word_counts)
        if key != self._key:
            self._key, self._model = None, None
            self._model, self._key = build_inference_model(model_cfg, word_counts), key
        try:
            load_weights(self._model, url)
        except Exception:
            self._key, self._model = None, None  # partly loaded: rebuild for the next checkpoint
            raise
        if weights_fingerprint(self._model) != state["fingerprint"]:
            raise ShowtellError(f"the weights in {WEIGHTS_FILE} do not match the fingerprint in {STATE_FILE}")
        return LoadedCheckpoint(self._model, model_cfg, word_counts)


# --- history ----------------------------------------------------------------------------------


def history_text(rows: Iterable[dict]) -> str:
    """history.jsonl's text: one JSON object a line, `HISTORY_COLUMNS` first."""
    lines = []
    for row in rows:
        ordered = {k: row[k] for k in HISTORY_COLUMNS if k in row}
        ordered.update((k, v) for k, v in row.items() if k not in ordered)
        lines.append(json.dumps(ordered) + "\n")
    return "".join(lines)


def read_history(url: str) -> list[dict]:
    if not exists(url):
        return []
    return [json.loads(line) for line in read_text(url).splitlines() if line.strip()]


# --- publishing ---------------------------------------------------------------------------------


def publish_final(checkpoint_dir: str, phase_dir: str, config_tree: dict[str, Any], word_counts_url: str) -> str:
    """Publishes a (local) checkpoint folder as `<phase_dir>/final/` with the config and vocabulary
    (which must be the one its state.json records: `check_vocabulary`).

    Everything is written into a staging folder first and then published over `final/`
    (`schemas.storage.publish_dir`), so a crash leaves either the old `final/` or the new one,
    never a mix (on object stores `state.json` is copied last and marks a complete `final/`).
    Returns the URL of `final/`.
    """
    final = join_url(phase_dir, FINAL_DIR)
    state, word_counts = read_state(checkpoint_dir), read_text(word_counts_url)
    state.pop("history", None)  # history.jsonl sits next to final/
    check_vocabulary(state, word_counts, checkpoint_dir, word_counts_url)
    with publish_dir(final, marker=STATE_FILE) as staging:
        fs, staging_path = fsspec.core.url_to_fs(staging)
        fs.put(os.path.join(checkpoint_dir, WEIGHTS_FILE), f"{staging_path}/{WEIGHTS_FILE}")
        write_text(join_url(staging, CONFIG_FILE), yaml.safe_dump(config_tree, sort_keys=False))
        write_text(join_url(staging, WORD_COUNTS_FILE), word_counts)
        write_text(join_url(staging, STATE_FILE), json.dumps(state, indent=1, sort_keys=True) + "\n")
    return final


def published_state(phase_dir: str) -> Optional[dict]:
    """`final/state.json` of a phase (its step, fingerprint, metrics), or None if none is published."""
    return read_json(join_url(phase_dir, FINAL_DIR, STATE_FILE))
