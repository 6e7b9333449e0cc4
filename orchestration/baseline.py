"""The run's baseline: the model promoted when the run began, pinned for the whole run (as TFX's
ModelResolver picks the latest blessed model), and the night it makes unnecessary.

    record = pin_baseline(config)       # -> <run_root>/baseline.json (schemas/models_root.py reads it)
    reason = unchanged_data(config)     # "no new data since the promoted model (...)", or None

`baseline.json` holds the models root, when it was pinned, the promoted model's model.json (null
when none was promoted yet) and the fingerprint of the run's mirrored data:

    {"models_root": "gs://b/showtell/models", "pinned": "2025-01-31T02:00:07+00:00",
     "model": {"run_root": ..., "promotion": {"id": "3f2a9c81d0e4", ...}, "data": {...}, ...},
     "data": {"fingerprint": "<sha256>", "files": {"zips/train2014.zip": "sha256:<hex>", ...}}}

The data fingerprint hashes MSCOCO's three mirrored files by content (`orchestration.manifest`'s
signatures: the download's own hashes vouch for big files, nothing is read twice), so it does not
depend on where the mirror is or how its path is spelled. A promoted model records the one it was
trained on; a run whose data has the same fingerprint as its baseline's has nothing to learn.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Optional

from orchestration.manifest import Places, Signer, now_iso
from orchestration.promote import append_decision
from schemas.config import MSCOCO_FILES, Config, join_url
from schemas.layout import BASELINE_FILE
from schemas.models_root import baseline_location, current_model, model_id, models_root_of, read_baseline
from schemas.storage import absolute, write_text

log = logging.getLogger("showtell.run")

NO_NEW_DATA = "no_new_data"  # the history decision of a run that ended at its baseline


def data_fingerprint(config: Config) -> dict[str, Any]:
    """{"fingerprint": SHA-256 of the files' signatures by relative path, "files": {relpath: signature}}
    of MSCOCO's three files in `data.mirror`."""
    signer, places = Signer(), Places.of(config)
    files = {relpath: signer.sign(join_url(config.data.mirror, relpath), places) for relpath in MSCOCO_FILES}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"fingerprint": digest, "files": files}


def pin_baseline(config: Config) -> dict[str, Any]:
    """Writes `<run_root>/baseline.json`: the model promoted now and the run's data fingerprint;
    returns a summary for the step's record."""
    models_root = models_root_of(config)
    model = current_model(models_root)
    record = {"models_root": models_root, "pinned": now_iso(), "model": model, "data": data_fingerprint(config)}
    write_text(join_url(config.run_root, BASELINE_FILE), json.dumps(record, indent=1) + "\n")
    if model is None:
        log.info("baseline: no model is promoted in %s yet", models_root)
        return {"model": None, "data": record["data"]["fingerprint"]}
    log.info("baseline: the promoted model %s (trained on %s)", model_id(model), model["run_root"])
    return {"model": model_id(model), "trained_on": model["run_root"], "data": record["data"]["fingerprint"]}


def unchanged_data(config: Config) -> Optional[str]:
    """Why the run ends at its baseline: its data is the data the baseline model was trained on.
    Appends a `no_new_data` line to the models root's history.jsonl (once per run) and returns the
    reason; None when there is new data or no baseline model."""
    pinned = read_baseline(config.run_root)
    model = (pinned or {}).get("model")
    if model is None:
        return None
    fingerprint = pinned["data"]["fingerprint"]
    if (model.get("data") or {}).get("fingerprint") != fingerprint:
        return None
    reason = (
        f"no new data since the promoted model (trained on {model['run_root']}, data {fingerprint[:12]}); "
        "`showtell run --force baseline` trains anyway"
    )
    run_root = absolute(config.run_root)
    append_decision(
        pinned["models_root"],
        {
            "id": hashlib.sha256(f"{run_root}|{model_id(model)}|{fingerprint}".encode()).hexdigest()[:12],
            "time": now_iso(),
            "run_root": run_root,
            "decision": NO_NEW_DATA,
            "reason": reason,
            "model": baseline_location(config.run_root),
            "baseline": {"id": model_id(model), "run_root": model["run_root"]},
            "data": fingerprint,
        },
        config.run.lock_stale_seconds,
    )
    return reason
