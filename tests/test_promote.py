"""orchestration/promote.py: a new model replaces `current/` only if its metric is at least the
current one's minus the tolerance; every decision is a line of history.jsonl. Exports here are
real folders of real files (promotion copies them; it never loads them)."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import fsspec
import pytest

from orchestration.promote import (
    CURRENT_DIR,
    HELD_BACK,
    MODEL_FILE,
    PROMOTED,
    Candidate,
    current_model,
    promote,
    read_history,
)
from schemas.errors import ShowtellError

EVAL = {"split": "test", "max_images": None, "beam_size": 3, "max_caption_length": 20, "length_normalization": 0.0}


def _export(root: Path, name: str, cider: float | None, **metrics: float) -> Candidate:
    """An export folder whose files say which model it is, offered with CIDEr = `cider`."""
    folder = root / "runs" / name / "export"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_text(f"graph of {name}")
    (folder / "variables" / "variables.data-00000-of-00001").write_text(f"weights of {name}")
    (folder / "showtell_export.json").write_text(json.dumps({"model": name}))
    return Candidate(
        export_dir=str(folder),
        metrics={"CIDEr": cider, "Bleu_4": 0.2, **metrics},
        run_root=str(root / "runs" / name),
        details={"checkpoint": {"phase": 2, "step": 10, "kind": "final"}, "eval": EVAL},
    )


def _model_in(folder: str | Path) -> str:
    return json.loads((Path(folder) / "showtell_export.json").read_text())["model"]


def test_the_first_model_is_promoted(tmp_path):
    models = str(tmp_path / "models")

    record = promote(_export(tmp_path, "night1", 0.50), models, "CIDEr", 0.0)

    assert record["decision"] == PROMOTED and record["current_value"] is None and record["previous_model"] is None
    assert record["model"] == f"{models}/{CURRENT_DIR}"
    assert _model_in(record["model"]) == "night1"
    assert (
        Path(models) / CURRENT_DIR / "variables" / "variables.data-00000-of-00001"
    ).read_text() == "weights of night1"
    model = current_model(models)
    assert model["metrics"]["CIDEr"] == 0.50 and model["run_root"].endswith("night1") and model["eval"] == EVAL
    assert model["promotion"] == record
    assert read_history(models) == [record]
    assert not list(Path(models).glob("current.staging-*"))


def test_a_better_model_is_promoted_and_the_old_one_kept_under_previous(tmp_path):
    models = str(tmp_path / "models")
    first = promote(_export(tmp_path, "night1", 0.50), models, "CIDEr", 0.0)

    record = promote(_export(tmp_path, "night2", 0.60), models, "CIDEr", 0.0)

    assert record["decision"] == PROMOTED
    assert (record["new_value"], record["current_value"]) == (0.60, 0.50)
    assert _model_in(Path(models) / CURRENT_DIR) == "night2"
    previous = record["previous_model"]
    assert previous["location"].startswith(f"{models}/previous/") and previous["location"].endswith(first["id"])
    assert previous["run_root"].endswith("night1") and previous["export"].endswith("night1/export")
    assert _model_in(previous["location"]) == "night1"
    assert json.loads((Path(previous["location"]) / MODEL_FILE).read_text())["promotion"] == first
    assert [line["decision"] for line in read_history(models)] == [PROMOTED, PROMOTED]


def test_a_worse_model_is_held_back_and_current_stays(tmp_path):
    models = str(tmp_path / "models")
    promote(_export(tmp_path, "night1", 0.50), models, "CIDEr", 0.0)

    record = promote(_export(tmp_path, "night2", 0.45), models, "CIDEr", 0.0)

    assert record["decision"] == HELD_BACK and record["model"] is None
    assert (record["new_value"], record["current_value"]) == (0.45, 0.50)
    assert record["previous_model"]["location"] == f"{models}/{CURRENT_DIR}"
    assert _model_in(Path(models) / CURRENT_DIR) == "night1"
    assert not (Path(models) / "previous").exists()
    history = read_history(models)
    assert len(history) == 2 and history[-1] == record
    assert set(record) >= {"time", "run_root", "decision", "metric", "new_value", "current_value", "previous_model"}


@pytest.mark.parametrize(
    "new, tolerance, decision",
    [(0.46, 0.05, PROMOTED), (0.45, 0.05, PROMOTED), (0.44, 0.05, HELD_BACK), (0.50, 0.0, PROMOTED)],
)
def test_the_tolerance_lets_a_slightly_worse_model_through(tmp_path, new, tolerance, decision):
    models = str(tmp_path / "models")
    promote(_export(tmp_path, "night1", 0.50), models, "CIDEr", tolerance)

    record = promote(_export(tmp_path, "night2", new), models, "CIDEr", tolerance)

    assert record["decision"] == decision and record["tolerance"] == tolerance
    assert _model_in(Path(models) / CURRENT_DIR) == ("night2" if decision == PROMOTED else "night1")


def test_promote_compares_the_configured_metric(tmp_path):
    models = str(tmp_path / "models")
    promote(_export(tmp_path, "night1", 0.50, Bleu_1=0.7), models, "Bleu_1", 0.0)

    record = promote(_export(tmp_path, "night2", 0.90, Bleu_1=0.6), models, "Bleu_1", 0.0)

    assert record["decision"] == HELD_BACK and (record["new_value"], record["current_value"]) == (0.6, 0.7)


def test_offering_the_current_export_again_changes_nothing(tmp_path):
    models = str(tmp_path / "models")
    candidate = _export(tmp_path, "night1", 0.50)
    first = promote(candidate, models, "CIDEr", 0.0)

    again = promote(candidate, models, "CIDEr", 0.1)

    assert again == first
    assert read_history(models) == [first]
    assert not (Path(models) / "previous").exists()


def test_a_promotion_whose_history_line_was_lost_gets_it_back_on_the_rerun(tmp_path):
    models = tmp_path / "models"
    candidate = _export(tmp_path, "night1", 0.50)
    first = promote(candidate, str(models), "CIDEr", 0.0)
    (models / "history.jsonl").unlink()  # as if the run died between swapping current/ in and writing history

    assert promote(candidate, str(models), "CIDEr", 0.0) == first
    assert read_history(str(models)) == [first]


def test_a_metric_the_new_model_lacks_is_a_clear_error(tmp_path):
    with pytest.raises(
        ShowtellError, match=r"promote.metric SPICE is not among the new model's metrics .*eval.spice: true"
    ):
        promote(_export(tmp_path, "night1", 0.5), str(tmp_path / "models"), "SPICE", 0.0)


def test_a_metric_the_current_model_lacks_is_a_clear_error_and_moves_nothing(tmp_path):
    models = str(tmp_path / "models")
    promote(_export(tmp_path, "night1", 0.5), models, "CIDEr", 0.0)

    with pytest.raises(ShowtellError, match=r"current model \(.*model.json\) has no METEOR .*set promote.metric"):
        promote(_export(tmp_path, "night2", 0.6, METEOR=0.3), models, "METEOR", 0.0)
    assert _model_in(Path(models) / CURRENT_DIR) == "night1" and len(read_history(models)) == 1


def test_models_scored_with_other_evaluation_settings_are_compared_with_a_warning(tmp_path, caplog):
    models = str(tmp_path / "models")
    promote(_export(tmp_path, "night1", 0.5), models, "CIDEr", 0.0)
    other = _export(tmp_path, "night2", 0.6)
    other.details["eval"] = {**EVAL, "beam_size": 1}

    with caplog.at_level(logging.WARNING, logger="showtell.promote"):
        promote(other, models, "CIDEr", 0.0)

    assert "eval.beam_size (3 -> 1)" in caplog.text


def test_a_models_root_on_an_object_store_takes_a_local_export(tmp_path):
    models = f"memory://promote-{uuid.uuid4().hex}/models"
    promote(_export(tmp_path, "night1", 0.5), models, "CIDEr", 0.0)

    record = promote(_export(tmp_path, "night2", 0.6), models, "CIDEr", 0.0)

    fs, root = fsspec.core.url_to_fs(models)
    assert json.loads(fs.cat_file(f"{root}/current/showtell_export.json"))["model"] == "night2"
    assert (
        json.loads(fs.cat_file(f"{record['previous_model']['location'].split('://', 1)[1]}/showtell_export.json"))[
            "model"
        ]
        == "night1"
    )
    assert [line["decision"] for line in read_history(models)] == [PROMOTED, PROMOTED]
    assert not fs.exists(f"{root}/.showtell.lock")


def test_model_json_records_the_vocabulary_id_its_export_records(tmp_path):
    models = str(tmp_path / "models")
    promote(_export(tmp_path, "night1", 0.5), models, "CIDEr", 0.0)  # an export that records none
    first = current_model(models)
    candidate = _export(tmp_path, "night2", 0.6)
    (Path(candidate.export_dir) / "showtell_export.json").write_text(
        json.dumps({"model": "night2", "vocabulary_id": "3f1c0d5e9a7b2468"})
    )

    promote(candidate, models, "CIDEr", 0.0)

    assert first["vocabulary_id"] is None and current_model(models)["vocabulary_id"] == "3f1c0d5e9a7b2468"
