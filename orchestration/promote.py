"""Promotion, as TFX's Evaluator + Pusher: a new model becomes `<models_root>/current/` only if it
passes the gate, comparing like with like: the current model is scored on the same split of the
same run's data as the new one (the evaluate step scores the run's pinned baseline), never with a
number measured on another night's data.

    <models_root>/
        current/                 the promoted model: a `showtell export` SavedModel folder, plus
            model.json           what it is: its metrics, the run, checkpoint and data it came from,
                                 its vocabulary id and its promotion record (copied last: it marks
                                 a complete current/)
        previous/<time>-<id>/    each model that was current before, as it was, never deleted
        history.jsonl            one JSON line per decision: promoted, held_back, rolled_back, and
                                 no_new_data (orchestration/baseline.py)
        .showtell.lock           held while deciding, so runs and people sharing a models_root take turns

    gate = Gate(metric="CIDEr", tolerance=0.01, min_value=0.5)          # promote.*
    record = promote(Candidate(export_dir, metrics, run_root, details, baseline, measured_on), models_root, gate)
    record = promote(candidate, models_root, gate, forced="the new data fixes ...")   # by hand
    record = rollback(models_root, "a bad caption bug in ...")                        # by hand

The gate, in order (the record's `reason` says which rule decided, in words):
  - below `min_value` (an absolute floor, as TFX's value threshold): held back;
  - no model promoted yet: promoted;
  - the current model is not the baseline this run scored (another run promoted one since), or
    it could not be scored: held back, as nothing compares the two (a current model made by this
    very run is compared by the metrics its own evaluation of this run's data gave it);
  - else promoted when new >= current - `tolerance` (TFX's change threshold), both as measured on
    this run's data.

A decision record (history line, `<run_root>/promote.json`, the run report): id, time, run_root,
export, decision, reason, metric, new_value, current_value (the current model on the same data;
null for a first model), threshold (the bar the new value had to reach), min_value, tolerance,
measured_on ({"new": ..., "current": ...}: run_root, split, images and data fingerprint of each
value), model (where the promoted model now is, null when held back), previous_model (the model
that was current: its location now, `previous/...` when displaced or `current` when it stays,
its run_root and export) and forced (who and why, for a promotion by hand).

Deciding again on the export that is already current changes nothing: it returns that promotion's
record (and appends it to history.jsonl if a crash kept it out), so a re-run is harmless.
"""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import json
import logging
import socket
import uuid
from typing import Any, Optional

from orchestration.lock import FolderLock
from orchestration.manifest import signature
from schemas.config import join_url
from schemas.errors import ShowtellError
from schemas.layout import CURRENT_DIR, EXPORT_METADATA_FILE, HISTORY_FILE, MODEL_FILE, PREVIOUS_DIR
from schemas.models_root import current_model
from schemas.storage import copy_dir, exists, publish_dir, read_json, read_text, write_text

log = logging.getLogger("showtell.promote")

PROMOTED, HELD_BACK, ROLLED_BACK = "promoted", "held_back", "rolled_back"


@dataclasses.dataclass(frozen=True)
class Gate:
    """When a new model replaces the current one (the config's `promote` section)."""

    metric: str  # compared, higher is better, e.g. CIDEr
    tolerance: float = 0.0  # how much worse than the current model, on the same data, the new one may be
    min_value: Optional[float] = None  # an absolute floor; None: none


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A new model offered for promotion."""

    export_dir: str  # a `showtell export` folder (local path or fsspec URL)
    metrics: dict[str, Optional[float]]  # its evaluation metrics, e.g. {"CIDEr": 0.61, "Bleu_4": 0.2}
    run_root: str  # the run that made it
    details: dict[str, Any]  # kept in model.json: e.g. the checkpoint evaluated, the evaluation settings, the data
    # The current model as the same evaluation scored it: {"id": its promotion id, "status": "ok"
    # or "failed", "metrics": {...}, "error": ...}; None when none was scored (none was promoted).
    baseline: Optional[dict[str, Any]] = None
    measured_on: Optional[dict[str, Any]] = None  # where both were scored: run_root, split, images, data


def read_history(models_root: str) -> list[dict[str, Any]]:
    """Every decision in `<models_root>/history.jsonl`, oldest first."""
    url = join_url(models_root, HISTORY_FILE)
    if not exists(url):
        return []
    return [json.loads(line) for line in read_text(url).splitlines() if line.strip()]


def operator() -> str:
    """Who acts by hand, for the audit line: user@host."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def _lock(models_root: str, lock_stale_seconds: float) -> FolderLock:
    return FolderLock(
        models_root, stale_after=lock_stale_seconds, wait=2 * lock_stale_seconds, command="showtell promote"
    )


def promote(
    candidate: Candidate,
    models_root: str,
    gate: Gate,
    lock_stale_seconds: float = 600.0,
    forced: Optional[str] = None,
) -> dict[str, Any]:
    """Decides on `candidate` by `gate` (or promotes it whatever the gate says, `forced` giving
    the reason), appends the decision to the history and returns it. ShowtellError when the new
    model lacks the metric."""
    new_value = candidate.metrics.get(gate.metric)
    if new_value is None and forced is None:
        raise ShowtellError(
            f"promote.metric {gate.metric} is not among the new model's metrics "
            f"({', '.join(sorted(candidate.metrics))})"
            + ("; SPICE is scored only with eval.spice: true" if gate.metric == "SPICE" else "")
        )
    with _lock(models_root, lock_stale_seconds):
        current = current_model(models_root)
        export_signature = signature(candidate.export_dir)
        if current is not None and current.get("export_signature") == export_signature:
            log.info("promote: %s is already the current model (%s)", candidate.export_dir, current["promotion"]["id"])
            _append_once(models_root, current["promotion"])
            return current["promotion"]
        record = _decide(candidate, models_root, gate, new_value, current, forced)
        if record["decision"] == PROMOTED:
            _install(candidate, models_root, record, current, export_signature)
        _append_once(models_root, record)
    log.info("promote: %s %s: %s", candidate.export_dir, record["decision"], record["reason"])
    return record


def _judge(
    candidate: Candidate, gate: Gate, new_value: Optional[float], current: Optional[dict[str, Any]]
) -> tuple[str, Optional[float], Optional[float], str]:
    """(decision, current value, threshold, reason) by the gate's rules (the module's docstring)."""
    metric, floor = gate.metric, gate.min_value
    if floor is not None and new_value < floor:
        return HELD_BACK, None, floor, f"{metric} {new_value:.4f} is below promote.min_value {floor:g}"
    if current is None:
        above = f", and {metric} {new_value:.4f} >= promote.min_value {floor:g}" if floor is not None else ""
        return PROMOTED, None, floor, "the first model" + above
    current_id, baseline = current["promotion"]["id"], candidate.baseline or {}
    if baseline.get("id") != current_id and current["run_root"] == candidate.run_root:
        # The current model is this run's own earlier export (e.g. before eval settings changed):
        # its metric was measured on this same run's data.
        baseline = {"id": current_id, "status": "ok", "metrics": current["metrics"]}
    if baseline.get("id") != current_id:
        scored = f"it scored {baseline['id']}" if baseline.get("id") else "it scored no current model"
        return HELD_BACK, None, None, (
            f"the current model ({current_id}) was not scored on this run's data ({scored}: another run promoted "
            "one since this run began); `showtell promote --force --reason ...` promotes it by hand"
        )
    current_value = (baseline.get("metrics") or {}).get(metric)
    if baseline.get("status") != "ok" or current_value is None:
        return HELD_BACK, None, None, (
            f"the current model could not be scored on this run's data ({baseline.get('error') or f'no {metric}'})"
        )
    threshold = current_value - gate.tolerance
    if floor is not None:
        threshold = max(threshold, floor)
    passed = new_value >= threshold
    reason = (
        f"{metric} {new_value:.4f} {'>=' if passed else '<'} {current_value:.4f} - tolerance {gate.tolerance:g}, "
        "the current model's on the same data"
    )
    return (PROMOTED if passed else HELD_BACK), current_value, threshold, reason


def _decide(
    candidate: Candidate,
    models_root: str,
    gate: Gate,
    new_value: Optional[float],
    current: Optional[dict[str, Any]],
    forced: Optional[str],
) -> dict[str, Any]:
    """The decision record; nothing is moved yet."""
    now = datetime.datetime.now(datetime.timezone.utc)
    if forced is None:
        decision, current_value, threshold, reason = _judge(candidate, gate, new_value, current)
    else:
        decision, current_value, threshold, reason = PROMOTED, None, None, f"forced by {operator()}: {forced}"
    previous = None
    if current is not None:
        location = (
            join_url(models_root, PREVIOUS_DIR, f"{now.strftime('%Y%m%dT%H%M%SZ')}-{current['promotion']['id']}")
            if decision == PROMOTED
            else join_url(models_root, CURRENT_DIR)
        )
        previous = {"location": location, "run_root": current["run_root"], "export": current["export"]}
    scored_current = current_value is not None
    return {
        "id": uuid.uuid4().hex[:12],
        "time": now.isoformat(timespec="seconds"),
        "run_root": candidate.run_root,
        "export": candidate.export_dir,
        "decision": decision,
        "reason": reason,
        "metric": gate.metric,
        "new_value": new_value,
        "current_value": current_value,
        "threshold": threshold,
        "min_value": gate.min_value,
        "tolerance": gate.tolerance,
        "measured_on": {"new": candidate.measured_on, "current": candidate.measured_on if scored_current else None},
        "model": join_url(models_root, CURRENT_DIR) if decision == PROMOTED else None,
        "previous_model": previous,
        "forced": {"by": operator(), "reason": forced} if forced is not None else None,
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


def rollback(models_root: str, reason: str, lock_stale_seconds: float = 600.0) -> dict[str, Any]:
    """Restores the model that was current before the current one (its promotion's
    `previous_model`), keeping the displaced one under previous/; appends a `rolled_back` line
    naming both, who and why, and returns it. ShowtellError when there is nothing to go back to."""
    with _lock(models_root, lock_stale_seconds):
        current = current_model(models_root)
        if current is None:
            raise ShowtellError(f"no model is promoted in {models_root}: nothing to roll back")
        before = current["promotion"].get("previous_model")
        if before is None:
            raise ShowtellError(
                f"the current model of {models_root} ({current['promotion']['id']}) was the first one promoted: "
                "there is no earlier model to roll back to"
            )
        restored = read_json(join_url(before["location"], MODEL_FILE))
        if restored is None:
            raise ShowtellError(f"the model before the current one is gone from {before['location']}")
        now = datetime.datetime.now(datetime.timezone.utc)
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        displaced = join_url(models_root, PREVIOUS_DIR, f"{stamp}-{current['promotion']['id']}")
        record = {
            "id": uuid.uuid4().hex[:12],
            "time": now.isoformat(timespec="seconds"),
            "decision": ROLLED_BACK,
            "reason": f"rolled back by {operator()}: {reason}",
            "model": join_url(models_root, CURRENT_DIR),
            "restored": {
                "id": restored["promotion"]["id"], "run_root": restored["run_root"], "from": before["location"]
            },
            "displaced": {"id": current["promotion"]["id"], "run_root": current["run_root"], "location": displaced},
            "forced": {"by": operator(), "reason": reason},
        }
        copy_dir(join_url(models_root, CURRENT_DIR), displaced, marker=MODEL_FILE)
        with publish_dir(join_url(models_root, CURRENT_DIR), marker=MODEL_FILE) as staging:
            copy_dir(before["location"], staging)
            write_text(join_url(staging, MODEL_FILE), json.dumps({**restored, "restored": record}, indent=1) + "\n")
        _append_once(models_root, record)
    log.info("promote: rolled back to %s (trained on %s): %s", record["restored"]["id"], restored["run_root"], reason)
    return record


def append_decision(models_root: str, record: dict[str, Any], lock_stale_seconds: float = 600.0) -> None:
    """Appends a decision taken elsewhere (e.g. a run that ended for want of new data) to
    history.jsonl, under the models_root lock; a record whose id is there already is not added again."""
    with _lock(models_root, lock_stale_seconds):
        _append_once(models_root, record)


def _append_once(models_root: str, record: dict[str, Any]) -> None:
    """Appends `record` to history.jsonl unless a line with its id is there (object stores cannot
    append: the file is rewritten whole, under the models_root lock)."""
    url = join_url(models_root, HISTORY_FILE)
    text = read_text(url) if exists(url) else ""
    if any(json.loads(line).get("id") == record["id"] for line in text.splitlines() if line.strip()):
        return
    write_text(url, text + json.dumps(record) + "\n")
