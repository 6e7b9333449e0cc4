"""The real steps of `showtell run` (orchestration/steps.py): their order, the config keys that
decide what each produces (and those left out on purpose), their outputs, and the promote step.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestration.manifest import config_values
from orchestration.steps import STEP_NAMES, STEPS
from schemas.errors import ShowtellError
from schemas.models_root import models_root_of
from tests.run_table import real_step, run_config


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "run"


def _affected(*overrides: str) -> set[str]:
    """The real steps whose config values differ under `overrides` (the steps after them re-run too)."""
    base, changed = run_config(Path("/runs/x")), run_config(Path("/runs/x"), *overrides)
    return {
        step.name
        for step in STEPS
        if config_values(base, step.keys(base)) != config_values(changed, step.keys(changed))
    }


@pytest.mark.parametrize(
    "overrides, steps",
    [
        (["eval.beam_size=2"], {"evaluate", "export"}),  # export: the caption signature searches with it
        (["eval.select_by=Bleu_4"], {"evaluate"}),
        (["train.phase2.steps=7"], {"train-phase2"}),
        (["train.phase1.learning_rate=1.0"], {"train-phase1"}),
        (["model.num_lstm_units=64"], {"train-phase1", "train-phase2"}),
        (["ray.num_workers=4"], {"train-phase1", "train-phase2"}),
        (["data.min_word_count=2"], {"preprocess"}),
        (["checks.max_oov_rate_increase=0.1", "checks.min_records_ratio=null"], {"check-data"}),
        (["data.sample.train_images=5"], {"download"}),
        (["promote.tolerance=0.1"], {"promote"}),
        # where and how things run, not what they produce:
        (["beam.runner=DataflowRunner", "beam.direct_num_workers=4", "ray.address=auto", "ray.max_failures=3"], set()),
        (["data.download.retries=9", "data.checksums={zips/val2014.zip: 'md5:00'}", "eval.batch_size=8"], set()),
        (["train.xla=true", "ray.use_gpu=true", "run.lock_stale_seconds=5"], set()),
    ],
)
def test_each_real_step_reads_the_keys_that_decide_what_it_produces(overrides, steps):
    assert _affected(*overrides) == steps


def test_a_real_source_makes_the_sample_settings_irrelevant():
    base = run_config(Path("/runs/x"), "data.source=gs://b/mscoco")
    changed = run_config(Path("/runs/x"), "data.source=gs://b/mscoco", "data.sample.train_images=5")
    download = real_step("download")
    assert config_values(base, download.keys(base)) == config_values(changed, download.keys(changed))


def test_every_real_step_is_in_order_and_names_its_keys_inputs_and_outputs():
    config = run_config(Path("/runs/x"))
    assert STEP_NAMES == (
        "download", "baseline", "preprocess", "check-data", "train-phase1", "train-phase2", "evaluate", "export",
        "promote",
    )
    for step in STEPS:
        config_values(config, step.keys(config))  # every key exists in the schema
        assert step.outputs(config) and all(url.startswith("/runs/x") for url in step.outputs(config))
    checks = real_step("check-data")
    assert "/runs/x/data/word_frequencies.txt" in real_step("preprocess").outputs(config)
    assert {"/runs/x/data/preprocess_report.json", "/runs/x/data/word_frequencies.txt", "/runs/x/baseline.json"} <= set(
        checks.inputs(config)
    )
    assert checks.outputs(config) == ["/runs/x/data_checks.json"]
    exported = ["/runs/x/export/showtell_export.json", "/runs/x/export/saved_model.pb"]
    assert real_step("export").outputs(config) == exported
    assert models_root_of(config) == "/runs/x/models"
    assert models_root_of(run_config(Path("/runs/x"), "promote.models_root=gs://b/models")) == "gs://b/models"


def _evaluated_and_exported(root: Path, cider: float, baseline: dict | None = None) -> None:
    """eval/best.json, eval/report.json (with `baseline`, the promoted model's result) and export/
    as the evaluate and export steps leave them."""
    checkpoint = {"phase": 2, "step": 4, "kind": "final", "url": str(root / "train/phase2/final")}
    (root / "eval").mkdir(parents=True, exist_ok=True)
    best = {"select_by": "CIDEr", "value": cider, "checkpoint": checkpoint}
    (root / "eval" / "best.json").write_text(json.dumps(best))
    report = {
        "split": "test",
        "images": 6,
        "eval": {"split": "test"},
        "checkpoints": [{**checkpoint, "metrics": {"CIDEr": cider, "Bleu_4": 0.1}}],
        "baseline": baseline,
    }
    (root / "eval" / "report.json").write_text(json.dumps(report))
    (root / "export").mkdir(exist_ok=True)
    (root / "export" / "saved_model.pb").write_text(f"model scoring {cider}")
    (root / "export" / "showtell_export.json").write_text("{}")


def test_the_promote_step_offers_the_export_with_its_best_metrics_and_records_the_decision(root):
    promote_step = real_step("promote")
    _evaluated_and_exported(root, 0.5)
    config = run_config(root)

    summary = promote_step.work(config)

    assert summary["decision"] == "promoted" and (summary["new_value"], summary["current_value"]) == (0.5, None)
    assert summary["model"] == str(root / "models" / "current")
    assert json.loads((root / "promote.json").read_text())["run_root"] == str(root)
    assert (root / "models" / "current" / "saved_model.pb").read_text() == "model scoring 0.5"

    first = json.loads((root / "promote.json").read_text())
    _evaluated_and_exported(root, 0.4, baseline={"id": first["id"], "status": "ok", "metrics": {"CIDEr": 0.5}})
    summary = promote_step.work(config)
    assert summary["decision"] == "held_back" and summary["current_value"] == 0.5


def test_the_promote_step_refuses_a_models_root_that_is_the_run_root(root):
    _evaluated_and_exported(root, 0.5)

    with pytest.raises(ShowtellError, match="is the run_root itself"):
        real_step("promote").work(run_config(root, f"promote.models_root={root}"))
