"""Promotion, as TFX's Evaluator + Pusher: a new model becomes `<models_root>/current/` only if
its metric is at least the current model's minus a tolerance; the first model is promoted.

    <models_root>/
        current/                 the promoted model: a `showtell export` SavedModel folder, plus
            model.json           what it is: its metrics, the run and checkpoint it came from, its
                                 vocabulary_id (from the export's showtell_export.json; null for an
                                 export written before it was recorded) and its promotion record
                                 (copied last: it marks a complete current/)
        previous/<time>-<id>/    each model that was current before, as it was, never deleted
        history.jsonl            one JSON line per decision (`promoted` or `held_back`)
        .showtell.lock           held while deciding, so runs sharing a models_root take turns

    record = promote(Candidate(export_dir, metrics, run_root, details), models_root, "CIDEr", 0.0)

A history line (and the record returned): id, time, run_root, export (the new model's folder),
decision, metric, tolerance, new_value, current_value (null for a first model), model (where the
promoted model now is, null when held back) and previous_model (the model that was current: its
location now, `previous/...` when displaced or `current` when it stays, its run_root and export).

Deciding again on the export that is already current changes nothing: it returns that promotion's
record (and appends it to history.jsonl if a crash kept it out), so a re-run is harmless.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import uuid
from typing import Any, Optional

from orchestration.lock import FolderLock
from orchestration.manifest import signature
from schemas.config import join_url
from schemas.errors import ShowtellError
from schemas.layout import CURRENT_DIR, EXPORT_METADATA_FILE, HISTORY_FILE, MODEL_FILE, PREVIOUS_DIR
from schemas.storage import copy_dir, exists, publish_dir, read_json, read_text, write_text

log = logging.getLogger("showtell.promote")

PROMOTED, HELD_BACK = "promoted", "held_back"
# Evaluation settings that change what a metric means: models scored differently are compared with a warning.
COMPARABLE_EVAL_KEYS = ("split", "max_images", "beam_size", "max_caption_length", "length_normalization")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A new model offered for promotion."""

    export_dir: str  # a `showtell export` folder (local path or fsspec URL)
    metrics: dict[str, Optional[float]]  # its evaluation metrics, e.g. {"CIDEr": 0.61, "Bleu_4": 0.2}
    run_root: str  # the run that made it
    details: dict[str, Any]  # kept in model.json: e.g. the checkpoint evaluated and the evaluation settings


def current_model(models_root: str) -> Optional[dict[str, Any]]:
    """model.json of `<models_root>/current/`, or None when no model was promoted yet."""
    return read_json(join_url(models_root, CURRENT_DIR, MODEL_FILE))


def read_history(models_root: str) -> list[dict[str, Any]]:
    """Every decision in `<models_root>/history.jsonl`, oldest first."""
    url = join_url(models_root, HISTORY_FILE)
    if not exists(url):
        return []
    return [json.loads(line) for line in read_text(url).splitlines() if line.strip()]


def promote(
    candidate: Candidate,
    models_root: str,
    metric: str,
    tolerance: float,
    lock_stale_seconds: float = 600.0,
) -> dict[str, Any]:
    """Decides on `candidate`, promotes it if it is good enough, appends the decision to the
    history and returns it. ShowtellError when either model lacks `metric`."""
    new_value = candidate.metrics.get(metric)
    if new_value is None:
        raise ShowtellError(
            f"promote.metric {metric} is not among the new model's metrics ({', '.join(sorted(candidate.metrics))})"
            + ("; SPICE is scored only with eval.spice: true" if metric == "SPICE" else "")
        )
    with FolderLock(
        models_root, stale_after=lock_stale_seconds, wait=2 * lock_stale_seconds, command="showtell promote"
    ):
        current = current_model(models_root)
        export_signature = signature(candidate.export_dir)
        if current is not None and current.get("export_signature") == export_signature:
            log.info(
                "promote: %s is already the current model (%s)",
                candidate.export_dir,
                join_url(models_root, CURRENT_DIR),
            )
            _append_once(models_root, current["promotion"])
            return current["promotion"]
        record = _decide(candidate, models_root, metric, tolerance, new_value, current)
        if record["decision"] == PROMOTED:
            _install(candidate, models_root, record, current, export_signature)
        _append_once(models_root, record)
    comparison = (
        "first model"
        if current is None
        else f"{new_value:.4f} vs current {record['current_value']:.4f} - {tolerance:g}"
    )
    log.info("promote: %s %s (%s %s)", candidate.export_dir, record["decision"], metric, comparison)
    return record


def _decide(
    candidate: Candidate,
    models_root: str,
    metric: str,
    tolerance: float,
    new_value: float,
    current: Optional[dict[str, Any]],
) -> dict[str, Any]:
    """The decision record; nothing is moved yet."""
    now = datetime.datetime.now(datetime.timezone.utc)
    record_id = uuid.uuid4().hex[:12]
    current_value, previous = None, None
    decision = PROMOTED
    if current is not None:
        current_value = current["metrics"].get(metric)
        if current_value is None:
            raise ShowtellError(
                f"the current model ({join_url(models_root, CURRENT_DIR, MODEL_FILE)}) has no {metric} "
                f"(it has {', '.join(sorted(k for k, v in current['metrics'].items() if v is not None))}): "
                f"set promote.metric to one of those, or move {join_url(models_root, CURRENT_DIR)} away "
                "to have the next model promoted as a first one"
            )
        _warn_if_not_comparable(candidate, current)
        decision = PROMOTED if new_value >= current_value - tolerance else HELD_BACK
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        location = (
            join_url(models_root, PREVIOUS_DIR, f"{stamp}-{current['promotion']['id']}")
            if decision == PROMOTED
            else join_url(models_root, CURRENT_DIR)
        )
        previous = {"location": location, "run_root": current["run_root"], "export": current["export"]}
    return {
        "id": record_id,
        "time": now.isoformat(timespec="seconds"),
        "run_root": candidate.run_root,
        "export": candidate.export_dir,
        "decision": decision,
        "metric": metric,
        "tolerance": tolerance,
        "new_value": new_value,
        "current_value": current_value,
        "model": join_url(models_root, CURRENT_DIR) if decision == PROMOTED else None,
        "previous_model": previous,
    }


def _install(
    candidate: Candidate,
    models_root: str,
    record: dict[str, Any],
    current: Optional[dict[str, Any]],
    export_signature: str,
) -> None:
    """Keeps the current model under previous/, then swaps the candidate in as current/ whole."""
    current_dir = join_url(models_root, CURRENT_DIR)
    if current is not None:
        copy_dir(current_dir, record["previous_model"]["location"], marker=MODEL_FILE)
    model = {
        "run_root": candidate.run_root,
        "export": candidate.export_dir,
        "export_signature": export_signature,
        "vocabulary_id": (read_json(join_url(candidate.export_dir, EXPORT_METADATA_FILE)) or {}).get("vocabulary_id"),
        "metrics": candidate.metrics,
        **candidate.details,
        "promotion": record,
    }
    with publish_dir(current_dir, marker=MODEL_FILE) as staging:
        copy_dir(candidate.export_dir, staging)
        write_text(join_url(staging, MODEL_FILE), json.dumps(model, indent=1) + "\n")


def append_decision(models_root: str, record: dict[str, Any], lock_stale_seconds: float = 600.0) -> None:
    """Appends a decision taken elsewhere (e.g. a run that ended for want of new data) to
    history.jsonl, under the models_root lock; a record whose id is there already is not added again."""
    with FolderLock(
        models_root, stale_after=lock_stale_seconds, wait=2 * lock_stale_seconds, command="showtell run"
    ):
        _append_once(models_root, record)


def _append_once(models_root: str, record: dict[str, Any]) -> None:
    """Appends `record` to history.jsonl unless a line with its id is there (object stores cannot
    append: the file is rewritten whole, under the models_root lock)."""
    url = join_url(models_root, HISTORY_FILE)
    text = read_text(url) if exists(url) else ""
    if any(json.loads(line).get("id") == record["id"] for line in text.splitlines() if line.strip()):
        return
    write_text(url, text + json.dumps(record) + "\n")


def _warn_if_not_comparable(candidate: Candidate, current: dict[str, Any]) -> None:
    new_eval, old_eval = candidate.details.get("eval") or {}, current.get("eval") or {}
    differ = [key for key in COMPARABLE_EVAL_KEYS if new_eval.get(key) != old_eval.get(key)]
    if differ:
        log.warning(
            "promote: the new and the current model were evaluated with different %s: their metrics may not compare",
            ", ".join(f"eval.{key} ({old_eval.get(key)!r} -> {new_eval.get(key)!r})" for key in differ),
        )
