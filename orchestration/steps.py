"""The steps of `showtell run`, in order, and for each: the config keys it reads (dotted prefixes),
its input files (earlier steps' outputs), its outputs, its work and, for training, how an earlier
attempt is cleared before a fresh one. `orchestration.run` fingerprints keys + inputs per step.

    download      keys  data.source, data.mirror (and data.sample when the source is `sample`)
                  in    -
                  out   <mirror>/annotations/annotations_trainval2014.zip, zips/train2014.zip, zips/val2014.zip
    baseline      keys  promote.models_root
                  in    the three mirrored files
                  out   <run_root>/baseline.json (the promoted model, pinned for the run); the run ends here,
                        successfully, when the data is the one that model was trained on
    preprocess    keys  data.shards, data.min_word_count, data.max_image_pixels, data.shuffle_seed
                  in    the three mirrored files
                  out   <run_root>/data/preprocess_report.json, data/word_counts.txt, data/word_frequencies.txt
                        (data/ is published whole)
    check-data    keys  checks (pipelines/data_checks.py)
                  in    data/preprocess_report.json, data/word_counts.txt, data/word_frequencies.txt, baseline.json
                  out   <run_root>/data_checks.json; the step fails (exit 2) naming each anomaly, so
                        nothing trains and nothing is promoted
    train-phase1  (with train.phase1.feature_cache on, first builds or checks <run_root>/feature_cache/:
                  pipelines/feature_cache.py; rebuilt only when its own key changes)
                  keys  train.phase1, TRAIN_KEYS (model, train.num_examples_per_epoch, train.mixed_precision,
                        train.shuffle_buffer, train.random_flip, train.seed, ray.num_workers: the global
                        batch), train.init_from; a change trains afresh, except more train.phase1.steps
                        alone: it trains on from its checkpoint
                  in    data/preprocess_report.json, data/word_counts.txt (and baseline.json when
                        train.init_from is `promoted`)
                  out   <run_root>/train/phase1/final/state.json (copied last into final/); when the run
                        warm-starts (trainer/warm_start.py), no training: train/warm_start/state.json;
                        with the feature cache on, also feature_cache/cache.json
    train-phase2  keys  train.phase2, TRAIN_KEYS, train.init_from, train.warm_start_steps (more of it, as
                        more train.phase2.steps, trains on)
                  in    the same, and phase 1's state.json (final/ or warm_start/: it holds the weights' fingerprint)
                  out   <run_root>/train/phase2/final/state.json
    evaluate      keys  eval.* but eval.batch_size
                  in    train/phase{1,2}/final/state.json, data/preprocess_report.json, baseline.json
                        (the pinned baseline model is scored on the same images, for the gate)
                  out   <run_root>/eval/report.json, eval/best.json
    export        keys  eval.beam_size, eval.max_caption_length, eval.length_normalization (the
                        SavedModel's `caption` signature searches with them)
                  in    eval/best.json
                  out   <run_root>/export/showtell_export.json (written last), export/saved_model.pb
    promote       keys  promote.*
                  in    eval/best.json, eval/report.json, the export/ folder
                  out   <run_root>/promote.json (the decision; the model goes to promote.models_root, its
                        model.json recording the data it was trained on and that data's statistics)

Keys that change where or how a step runs, not what it produces, are left out on purpose, so
changing them re-runs nothing: `beam.*` (runner, workers, options), `ray.address`, `ray.use_gpu`,
`ray.resources_per_worker`, `ray.max_failures`, `ray.min_workers`, `ray.startup_timeout_s`,
`ray.shared_filesystem`, `train.xla`, `train.shard_cache`, `train.max_minutes` (a fine-tune it
stopped early says so in its state.json and the step's summary), `storage.*` (endpoints, timeouts),
`data.download.*` (retries, timeouts),
`data.checksums` (verification only: the mirrored bytes are the same or the download fails),
`eval.batch_size` (images per model call), `run.*` and `kfp.*`.

The export step exports the checkpoint best.json names (the evaluation's choice by
`eval.select_by`), not always phase 2's final/: the promote step then compares the metric of the
very model it pushes. A best checkpoint that is one of Ray's intermediate ones (weights only) is
first published as a self-contained `<run_root>/best/final/` (weights, config, vocabulary).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import tempfile
from typing import Any, Callable, Optional

from orchestration.promote import Candidate, Gate, promote
from pipelines.data_checks import data_checks_file
from pipelines.eval_report import find_checkpoint
from schemas.config import MSCOCO_FILES, Config, join_url
from schemas.errors import ShowtellError
from schemas.layout import (
    BASELINE_FILE,
    BEST_DIR,
    BEST_FILE,
    DECISION_FILE,
    EVAL_REPORT_FILE,
    EXPORT_DIR,
    EXPORT_METADATA_FILE,
    FEATURE_CACHE_FILE,
    FINAL_DIR,
    PREPROCESS_REPORT_FILE,
    SAVED_MODEL_FILE,
    STATE_FILE,
    WORD_FREQUENCIES_FILE,
)
from schemas.models_root import models_root_of, read_baseline
from schemas.storage import absolute, exists, read_json, remove, write_text
from schemas.vocabulary import WORD_COUNTS_FILE
from trainer import checkpoints as ckpt
from trainer.warm_start import INIT_PROMOTED, init_source, warm_start_dir

log = logging.getLogger("showtell.run")

# What every training phase's result depends on besides its own section (see the docstring for
# the ray.* and train.* keys left out).
TRAIN_KEYS = (
    "model",
    "train.num_examples_per_epoch",
    "train.mixed_precision",
    "train.shuffle_buffer",
    "train.random_flip",
    "train.seed",
    "ray.num_workers",
)
# What a warm start changes: where phase 1's result comes from, and phase 2's steps.
WARM_START_KEYS = {1: ("train.init_from",), 2: ("train.init_from", "train.warm_start_steps")}
# The beam search the export's `caption` signature is traced with (inference.caption_signature.Search).
EXPORT_KEYS = ("eval.beam_size", "eval.max_caption_length", "eval.length_normalization")
EVAL_KEYS = tuple(
    f"eval.{key}"
    for key in (
        "split",
        "checkpoints",
        "beam_size",
        "max_caption_length",
        "length_normalization",
        "select_by",
        "spice",
        "max_images",
        "report_images",
    )
)


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of `showtell run`."""

    name: str
    keys: Callable[[Config], tuple[str, ...]]  # dotted config keys (sections or leaves) deciding what it produces
    inputs: Callable[[Config], list[str]]  # files or folders of earlier steps that it reads
    outputs: Callable[[Config], list[str]]  # files it writes: all of them exist once it is done
    work: Callable[[Config], Optional[dict[str, Any]]]  # config -> a small JSON summary
    reset: Optional[Callable[[Config], None]] = None  # clears an earlier attempt before a fresh (not resumed) run
    # Once the step is done (or up to date), a reason to end the run there, successfully, or None;
    # not asked when the step is forced (`--force STEP` or an earlier step).
    stop: Optional[Callable[[Config], Optional[str]]] = None
    # Config leaves that, when they alone grow, let the step go on from its earlier attempt rather
    # than start afresh: a phase given more steps trains on from its last checkpoint.
    extendable: tuple[str, ...] = ()


# --- locations --------------------------------------------------------------------------------


def mirror_files(config: Config) -> list[str]:
    return [join_url(config.data.mirror, relpath) for relpath in MSCOCO_FILES]


def data_files(config: Config) -> list[str]:
    """The preprocessed data's report and vocabulary (data/ is published whole: they stand for it)."""
    return [join_url(config.data_dir, PREPROCESS_REPORT_FILE), join_url(config.data_dir, WORD_COUNTS_FILE)]


def word_frequencies_file(config: Config) -> str:
    """data/word_frequencies.txt: the train captions' words, for the data checks."""
    return join_url(config.data_dir, WORD_FREQUENCIES_FILE)


def final_state(config: Config, phase: int) -> str:
    """A phase's final/state.json: copied last, it marks a complete final/."""
    return join_url(config.train_dir, ckpt.phase_name(phase), FINAL_DIR, STATE_FILE)


def feature_cache_files(config: Config) -> list[str]:
    """Phase 1's feature cache's cache.json, when phase 1 trains from one (`showtell status` lists it)."""
    cached = config.train.phase1.feature_cache.enabled and init_source(config) is None
    return [join_url(config.feature_cache_dir, FEATURE_CACHE_FILE)] if cached else []


def export_dir(config: Config) -> str:
    return join_url(config.run_root, EXPORT_DIR)


def decision_file(config: Config) -> str:
    return join_url(config.run_root, DECISION_FILE)


# --- work ---------------------------------------------------------------------------------------


def _download(config: Config) -> dict[str, Any]:
    from pipelines.download import mirror_dataset

    return {"files": {result.relpath: result.action for result in mirror_dataset(config)}}


def _pin_baseline(config: Config) -> dict[str, Any]:
    from orchestration.baseline import pin_baseline

    return pin_baseline(config)


def _unchanged_data(config: Config) -> Optional[str]:
    from orchestration.baseline import unchanged_data

    return unchanged_data(config)


def _preprocess(config: Config) -> dict[str, Any]:
    from pipelines.preprocess import run_preprocess

    report = run_preprocess(config)
    return {"records_written": report["records_written"], "words": report["vocabulary"]["words"]}


def _check_data(config: Config) -> dict[str, Any]:
    from pipelines.data_checks import run_data_checks

    return run_data_checks(config)


def train_phase(config: Config, phase: int) -> dict[str, Any]:
    """One training phase (`showtell train`, and the train-phaseN steps): `run_phase`, after
    building or checking phase 1's feature cache when train.phase1.feature_cache is on and phase 1
    trains (a warm start trains no phase 1); its summary then has the cache's under `feature_cache`."""
    from pipelines.feature_cache import ensure_feature_cache
    from trainer.launcher import run_phase

    cache = ensure_feature_cache(config) if phase == 1 and feature_cache_files(config) else None
    summary = run_phase(config, phase)
    return {**summary, "feature_cache": cache} if cache else summary


def _train(phase: int, config: Config) -> dict[str, Any]:
    summary = train_phase(config, phase)
    if "warm_start" in summary:
        return {"step": 0, "final": summary["final"], "warm_start": summary["warm_start"]}
    cache = {"feature_cache": summary["feature_cache"]} if "feature_cache" in summary else {}
    return {
        "step": summary["step"],
        "final": summary["final"],
        "perplexity": summary["metrics"].get("perplexity"),
        "stopped": summary["stopped"],
        **cache,
    }


def _reset_phase(phase: int, config: Config) -> None:
    """Removes a phase's Ray run folder (and phase 1's warm start), so training starts afresh
    instead of resuming."""
    folders = [join_url(config.train_dir, ckpt.phase_name(phase))] + ([warm_start_dir(config)] if phase == 1 else [])
    for folder in folders:
        if exists(folder):
            log.warning("removing %s, to train this phase afresh", folder)
            remove(folder)


def _evaluate(config: Config) -> dict[str, Any]:
    from pipelines.evaluate import run_evaluate

    report = run_evaluate(config)
    return {"best": report["best"], "counts": report["counts"]}


def _required_json(url: str, step: str) -> dict[str, Any]:
    document = read_json(url)
    if document is None:
        raise ShowtellError(f"{url} not found: the {step} step writes it")
    return document


def _export(config: Config) -> dict[str, Any]:
    """Exports the checkpoint best.json names as a SavedModel to `<run_root>/export/`."""
    from inference.caption_signature import Search
    from inference.export import export_saved_model

    best = _required_json(join_url(config.eval_dir, BEST_FILE), "evaluate")
    checkpoint = best["checkpoint"]
    if checkpoint["kind"] == "final":
        remove(join_url(config.run_root, BEST_DIR))  # an earlier run's published intermediate, if any
        source = checkpoint["url"]
    else:
        source = _publish_checkpoint(config, checkpoint["url"])
    export_saved_model(source, export_dir(config), Search.of(config.eval))
    return {"checkpoint": checkpoint, "source": source, "export": export_dir(config)}


def _publish_checkpoint(config: Config, url: str) -> str:
    """An intermediate checkpoint (weights only) published with this run's config and vocabulary
    as `<run_root>/best/final/`, which `showtell export` and `showtell caption` take."""
    with tempfile.TemporaryDirectory(prefix="showtell-best-") as scratch:
        return ckpt.publish_final(
            ckpt.fetch_dir(url, scratch),
            join_url(config.run_root, BEST_DIR),
            config.model_dump(mode="json"),
            join_url(config.data_dir, WORD_COUNTS_FILE),
        )


def promote_run(config: Config, forced: Optional[str] = None) -> dict[str, Any]:
    """Offers the run's export to `promote.models_root` (the promote step; `showtell promote`, which
    may force it through with a reason); writes the decision to `<run_root>/promote.json`."""
    best = _required_json(join_url(config.eval_dir, BEST_FILE), "evaluate")
    report = _required_json(join_url(config.eval_dir, EVAL_REPORT_FILE), "evaluate")
    if not exists(join_url(export_dir(config), EXPORT_METADATA_FILE)):
        raise ShowtellError(f"no export at {export_dir(config)}: the export step writes it")
    if models_root_of(config).rstrip("/") == absolute(config.run_root).rstrip("/"):
        raise ShowtellError(
            f"promote.models_root {models_root_of(config)} is the run_root itself: give it a folder of its own"
        )
    trained_on = _trained_on(config)
    candidate = Candidate(
        export_dir=absolute(export_dir(config)),
        metrics=find_checkpoint(report, best["checkpoint"])["metrics"],
        run_root=absolute(config.run_root),
        details={"checkpoint": best["checkpoint"], "eval": report.get("eval"), "data": trained_on},
        baseline=report.get("baseline"),
        measured_on={
            "run_root": absolute(config.run_root),
            "split": report["split"],
            "images": report.get("images"),
            "data": trained_on["fingerprint"],
        },
    )
    gate = Gate(config.promote.metric, config.promote.tolerance, config.promote.min_value)
    record = promote(candidate, models_root_of(config), gate, config.run.lock_stale_seconds, forced=forced)
    write_text(decision_file(config), json.dumps(record, indent=1) + "\n")
    return {key: record[key] for key in ("decision", "reason", "metric", "new_value", "current_value", "model")}


def _trained_on(config: Config) -> dict[str, Any]:
    """The data the run's model was trained on, for its model.json: the fingerprint of the mirrored
    files pinned with the baseline (computed now for a run that has none), and the statistics a
    later run's data checks compare with (`pipelines.data_checks.data_statistics`; null without
    a preprocess report)."""
    from orchestration.baseline import data_fingerprint
    from pipelines.data_checks import data_statistics

    pinned = read_baseline(config.run_root)
    return {
        "mirror": absolute(config.data.mirror),
        **(pinned["data"] if pinned else data_fingerprint(config)),
        "statistics": data_statistics(config.data_dir),
    }


# --- the table ------------------------------------------------------------------------------------


def _keys(*keys: str) -> Callable[[Config], tuple[str, ...]]:
    return lambda config: keys


def phase_result(config: Config, phase: int) -> str:
    """The state.json that marks a training step's result: phase 2's final/, and phase 1's final/
    or, when the run warm-starts, the warm start's (phase 1 trains nothing then)."""
    if phase == 1 and init_source(config) is not None:
        return join_url(warm_start_dir(config), STATE_FILE)
    return final_state(config, phase)


def _training_step(phase: int) -> Step:
    """train-phase1 or train-phase2: phase 1 reads the pinned baseline when it may warm-start from
    it; phase 2 reads phase 1's result (its final/, or the warm start)."""

    def inputs(config: Config) -> list[str]:
        if phase == 2:
            return [*data_files(config), phase_result(config, 1)]
        pinned = [join_url(config.run_root, BASELINE_FILE)] if config.train.init_from == INIT_PROMOTED else []
        return [*data_files(config), *pinned]

    return Step(
        f"train-phase{phase}",
        keys=_keys(f"train.phase{phase}", *TRAIN_KEYS, *WARM_START_KEYS[phase]),
        inputs=inputs,
        outputs=lambda c: [phase_result(c, phase), *(feature_cache_files(c) if phase == 1 else [])],
        work=functools.partial(_train, phase),
        reset=functools.partial(_reset_phase, phase),
        extendable=(f"train.phase{phase}.steps",) + (("train.warm_start_steps",) if phase == 2 else ()),
    )


STEPS: tuple[Step, ...] = (
    Step(
        "download",
        # data.sample shapes the data only when the source is `sample`.
        keys=lambda c: ("data.source", "data.mirror") + (("data.sample",) if c.data.source == "sample" else ()),
        inputs=lambda c: [],
        outputs=mirror_files,
        work=_download,
    ),
    Step(
        "baseline",
        keys=_keys("promote.models_root"),
        inputs=mirror_files,
        outputs=lambda c: [join_url(c.run_root, BASELINE_FILE)],
        work=_pin_baseline,
        stop=_unchanged_data,
    ),
    Step(
        "preprocess",
        keys=_keys("data.shards", "data.min_word_count", "data.max_image_pixels", "data.shuffle_seed"),
        inputs=mirror_files,
        outputs=lambda c: [*data_files(c), word_frequencies_file(c)],
        work=_preprocess,
    ),
    Step(
        "check-data",
        keys=_keys("checks"),
        inputs=lambda c: [*data_files(c), word_frequencies_file(c), join_url(c.run_root, BASELINE_FILE)],
        outputs=lambda c: [data_checks_file(c)],
        work=_check_data,
    ),
    _training_step(1),
    _training_step(2),
    Step(
        "evaluate",
        keys=_keys(*EVAL_KEYS),
        # phase 1's final/ is absent after a warm start (signed missing); baseline.json: the model scored beside
        inputs=lambda c: [
            final_state(c, 1),
            final_state(c, 2),
            join_url(c.data_dir, PREPROCESS_REPORT_FILE),
            join_url(c.run_root, BASELINE_FILE),
        ],
        outputs=lambda c: [join_url(c.eval_dir, EVAL_REPORT_FILE), join_url(c.eval_dir, BEST_FILE)],
        work=_evaluate,
    ),
    Step(
        "export",
        keys=_keys(*EXPORT_KEYS),
        inputs=lambda c: [join_url(c.eval_dir, BEST_FILE)],
        outputs=lambda c: [join_url(export_dir(c), EXPORT_METADATA_FILE), join_url(export_dir(c), SAVED_MODEL_FILE)],
        work=_export,
    ),
    Step(
        "promote",
        keys=_keys("promote"),
        inputs=lambda c: [join_url(c.eval_dir, BEST_FILE), join_url(c.eval_dir, EVAL_REPORT_FILE), export_dir(c)],
        outputs=lambda c: [decision_file(c)],
        work=promote_run,
    ),
)
STEP_NAMES: tuple[str, ...] = tuple(step.name for step in STEPS)
