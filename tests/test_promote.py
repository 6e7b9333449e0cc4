"""orchestration/promote.py: a new model replaces `current/` only if it passes the gate, which
compares it with the current model as both were scored on the same data; by hand, a held-back
model is forced through and a promotion rolled back, each leaving an audit line. Every decision
is a line of history.jsonl. Exports here are real folders of real files (promotion copies them;
it never loads them)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Optional

import fsspec
import pytest

from orchestration.lock import FolderLock
from orchestration.promote import (
    CURRENT_DIR,
    HELD_BACK,
    MODEL_FILE,
    PROMOTED,
    ROLLED_BACK,
    Candidate,
    Gate,
    current_model,
    operator,
    promote,
    read_history,
    rollback,
)
from schemas.errors import ShowtellError

EVAL = {"split": "test", "max_images": None, "beam_size": 3, "max_caption_length": 20, "length_normalization": 0.0}
CIDER = Gate("CIDEr")


def _export(
    root: Path, name: str, cider: Optional[float], current: Optional[dict] = None, current_cider: float = 0.0, **metrics
) -> Candidate:
    """An export folder whose files say which model it is, offered with CIDEr = `cider`; with
    `current` (that model's promotion record), the run also scored it: CIDEr `current_cider`."""
    folder = root / "runs" / name / "export"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_text(f"graph of {name}")
    (folder / "variables" / "variables.data-00000-of-00001").write_text(f"weights of {name}")
    (folder / "showtell_export.json").write_text(json.dumps({"model": name}))
    baseline = None
    if current is not None:
        baseline = {"id": current["id"], "status": "ok", "metrics": {"CIDEr": current_cider, **metrics}}
    return Candidate(
        export_dir=str(folder),
        metrics={"CIDEr": cider, "Bleu_4": 0.2, **metrics},
        run_root=str(root / "runs" / name),
        details={"checkpoint": {"phase": 2, "step": 10, "kind": "final"}, "eval": EVAL},
        baseline=baseline,
        measured_on={"run_root": str(root / "runs" / name), "split": "test", "images": 6, "data": f"data of {name}"},
    )


def _model_in(folder: str | Path) -> str:
    return json.loads((Path(folder) / "showtell_export.json").read_text())["model"]


def test_the_first_model_is_promoted(tmp_path):
    models = str(tmp_path / "models")

    record = promote(_export(tmp_path, "night1", 0.50), models, CIDER)

    assert record["decision"] == PROMOTED and record["reason"] == "the first model"
    assert record["current_value"] is None and record["previous_model"] is None and record["forced"] is None
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


def test_a_model_better_than_the_current_one_on_the_same_data_is_promoted_and_the_old_one_kept(tmp_path):
    models = str(tmp_path / "models")
    first = promote(_export(tmp_path, "night1", 0.50), models, CIDER)

    record = promote(_export(tmp_path, "night2", 0.60, current=first, current_cider=0.55), models, CIDER)

    assert record["decision"] == PROMOTED
    assert (record["new_value"], record["current_value"], record["threshold"]) == (0.60, 0.55, 0.55)
    assert record["reason"] == "CIDEr 0.6000 >= 0.5500 - tolerance 0, the current model's on the same data"
    measured = {"run_root": str(tmp_path / "runs/night2"), "split": "test", "images": 6, "data": "data of night2"}
    assert record["measured_on"] == {"new": measured, "current": measured}
    assert _model_in(Path(models) / CURRENT_DIR) == "night2"
    previous = record["previous_model"]
    assert previous["location"].startswith(f"{models}/previous/") and previous["location"].endswith(first["id"])
    assert previous["run_root"].endswith("night1") and previous["export"].endswith("night1/export")
    assert _model_in(previous["location"]) == "night1"
    assert json.loads((Path(previous["location"]) / MODEL_FILE).read_text())["promotion"] == first
    assert [line["decision"] for line in read_history(models)] == [PROMOTED, PROMOTED]


def test_the_gate_compares_the_current_models_score_on_this_data_not_the_one_it_was_promoted_with(tmp_path):
    models = str(tmp_path / "models")
    first = promote(_export(tmp_path, "night1", 0.90), models, CIDER)  # measured on night 1's data

    record = promote(_export(tmp_path, "night2", 0.50, current=first, current_cider=0.45), models, CIDER)

    assert record["decision"] == PROMOTED and record["current_value"] == 0.45


def test_a_model_worse_than_the_current_one_on_the_same_data_is_held_back_and_current_stays(tmp_path):
    models = str(tmp_path / "models")
    first = promote(_export(tmp_path, "night1", 0.50), models, CIDER)

    record = promote(_export(tmp_path, "night2", 0.45, current=first, current_cider=0.50), models, CIDER)

    assert record["decision"] == HELD_BACK and record["model"] is None
    assert (record["new_value"], record["current_value"]) == (0.45, 0.50)
    assert record["reason"] == "CIDEr 0.4500 < 0.5000 - tolerance 0, the current model's on the same data"
    assert record["previous_model"]["location"] == f"{models}/{CURRENT_DIR}"
    assert _model_in(Path(models) / CURRENT_DIR) == "night1"
    assert not (Path(models) / "previous").exists()
    history = read_history(models)
    assert len(history) == 2 and history[-1] == record


@pytest.mark.parametrize(
    "new, tolerance, decision",
    [(0.46, 0.05, PROMOTED), (0.45, 0.05, PROMOTED), (0.44, 0.05, HELD_BACK), (0.50, 0.0, PROMOTED)],
)
def test_the_tolerance_lets_a_slightly_worse_model_through(tmp_path, new, tolerance, decision):
    models = str(tmp_path / "models")
    first = promote(_export(tmp_path, "night1", 0.50), models, Gate("CIDEr", tolerance))

    offered = _export(tmp_path, "night2", new, current=first, current_cider=0.50)
    record = promote(offered, models, Gate("CIDEr", tolerance))

    assert record["decision"] == decision and record["tolerance"] == tolerance
    assert _model_in(Path(models) / CURRENT_DIR) == ("night2" if decision == PROMOTED else "night1")


def test_below_min_value_even_a_first_model_or_one_better_than_the_current_is_held_back(tmp_path):
    models = str(tmp_path / "models")
    floor = Gate("CIDEr", tolerance=0.1, min_value=0.5)

    low_first = promote(_export(tmp_path, "night1", 0.40), models, floor)
    first = promote(_export(tmp_path, "night2", 0.55), models, floor)
    low = promote(_export(tmp_path, "night3", 0.48, current=first, current_cider=0.30), models, floor)
    close = promote(_export(tmp_path, "night4", 0.52, current=first, current_cider=0.60), models, floor)

    assert low_first["decision"] == HELD_BACK and low_first["reason"] == "CIDEr 0.4000 is below promote.min_value 0.5"
    assert first["decision"] == PROMOTED
    assert first["reason"] == "the first model, and CIDEr 0.5500 >= promote.min_value 0.5"
    assert (low["decision"], low["threshold"], low["min_value"]) == (HELD_BACK, 0.5, 0.5)
    assert close["decision"] == PROMOTED and close["threshold"] == pytest.approx(0.5)  # max(0.60 - 0.1, 0.5)
    assert _model_in(Path(models) / CURRENT_DIR) == "night4"


def test_a_current_model_promoted_after_the_run_scored_its_baseline_holds_the_new_one_back(tmp_path):
    models = str(tmp_path / "models")
    first = promote(_export(tmp_path, "night1", 0.50), models, CIDER)
    late = _export(tmp_path, "night2b", 0.60, current=first, current_cider=0.50)  # scored night 1's model
    promote(_export(tmp_path, "night2a", 0.70, current=first, current_cider=0.50), models, CIDER)

    record = promote(late, models, CIDER)

    assert record["decision"] == HELD_BACK and record["current_value"] is None
    assert f"was not scored on this run's data (it scored {first['id']}" in record["reason"]
    assert _model_in(Path(models) / CURRENT_DIR) == "night2a"


def test_a_current_model_from_the_same_run_is_compared_by_the_metrics_that_runs_evaluation_gave_it(tmp_path):
    models = str(tmp_path / "models")
    promote(_export(tmp_path, "night1", 0.50), models, CIDER)
    again = _export(tmp_path, "night1-again", 0.45)  # the same run evaluated again, e.g. with another beam size
    again = Candidate(**{**again.__dict__, "run_root": str(tmp_path / "runs" / "night1")})

    record = promote(again, models, CIDER)

    assert record["decision"] == HELD_BACK and record["current_value"] == 0.50


def test_a_current_model_that_could_not_be_scored_on_the_data_holds_the_new_one_back(tmp_path):
    models = str(tmp_path / "models")
    first = promote(_export(tmp_path, "night1", 0.50), models, CIDER)
    candidate = _export(tmp_path, "night2", 0.60, current=first)
    failed = Candidate(**{**candidate.__dict__, "baseline": {"id": first["id"], "status": "failed", "error": "boom"}})

    record = promote(failed, models, CIDER)

    assert record["decision"] == HELD_BACK
    assert record["reason"].endswith("could not be scored on this run's data (boom)")


def test_promote_compares_the_configured_metric(tmp_path):
    models = str(tmp_path / "models")
    first = promote(_export(tmp_path, "night1", 0.50, Bleu_1=0.7), models, Gate("Bleu_1"))

    offered = _export(tmp_path, "night2", 0.90, current=first, current_cider=0.1, Bleu_1=0.6)
    record = promote(offered, models, Gate("Bleu_1"))

    assert record["decision"] == PROMOTED and (record["new_value"], record["current_value"]) == (0.6, 0.6)


def test_offering_the_current_export_again_changes_nothing(tmp_path):
    models = str(tmp_path / "models")
    candidate = _export(tmp_path, "night1", 0.50)
    first = promote(candidate, models, CIDER)

    again = promote(candidate, models, Gate("CIDEr", 0.1))

    assert again == first
    assert read_history(models) == [first]
    assert not (Path(models) / "previous").exists()


def test_a_promotion_whose_history_line_was_lost_gets_it_back_on_the_rerun(tmp_path):
    models = tmp_path / "models"
    candidate = _export(tmp_path, "night1", 0.50)
    first = promote(candidate, str(models), CIDER)
    (models / "history.jsonl").unlink()  # as if the run died between swapping current/ in and writing history

    assert promote(candidate, str(models), CIDER) == first
    assert read_history(str(models)) == [first]


def test_a_metric_the_new_model_lacks_is_a_clear_error(tmp_path):
    with pytest.raises(
        ShowtellError, match=r"promote.metric SPICE is not among the new model's metrics .*eval.spice: true"
    ):
        promote(_export(tmp_path, "night1", 0.5), str(tmp_path / "models"), Gate("SPICE"))


def test_a_held_back_model_forced_through_by_hand_is_promoted_with_who_and_why(tmp_path):
    models = str(tmp_path / "models")
    first = promote(_export(tmp_path, "night1", 0.50), models, CIDER)
    candidate = _export(tmp_path, "night2", 0.40, current=first, current_cider=0.50)
    assert promote(candidate, models, CIDER)["decision"] == HELD_BACK

    record = promote(candidate, models, CIDER, forced="the new captions style is wanted")

    assert record["decision"] == PROMOTED and _model_in(Path(models) / CURRENT_DIR) == "night2"
    assert record["forced"] == {"by": operator(), "reason": "the new captions style is wanted"}
    assert record["reason"] == f"forced by {operator()}: the new captions style is wanted"
    assert [line["decision"] for line in read_history(models)] == [PROMOTED, HELD_BACK, PROMOTED]
    assert read_history(models)[-1]["forced"]["reason"] == "the new captions style is wanted"


def test_rollback_restores_the_previous_model_keeps_the_displaced_one_and_leaves_an_audit_line(tmp_path):
    models = str(tmp_path / "models")
    first = promote(_export(tmp_path, "night1", 0.50), models, CIDER)
    second = promote(_export(tmp_path, "night2", 0.60, current=first, current_cider=0.5), models, CIDER)

    record = rollback(models, "night 2 captions every cat as a dog")

    assert _model_in(Path(models) / CURRENT_DIR) == "night1"
    restored = current_model(models)
    assert restored["promotion"] == first and restored["restored"] == record
    assert record["decision"] == ROLLED_BACK and record["forced"]["by"] == operator()
    assert record["restored"]["id"] == first["id"] and record["displaced"]["id"] == second["id"]
    assert _model_in(record["displaced"]["location"]) == "night2"
    assert read_history(models)[-1] == record
    assert record["reason"] == f"rolled back by {operator()}: night 2 captions every cat as a dog"
    # night 1 was the first model: there is nothing before it.
    with pytest.raises(ShowtellError, match="was the first one promoted: there is no earlier model"):
        rollback(models, "again")


def test_rollback_with_no_model_promoted_is_a_clear_error(tmp_path):
    with pytest.raises(ShowtellError, match="no model is promoted in .*: nothing to roll back"):
        rollback(str(tmp_path / "models"), "why")


def test_rollback_and_a_forced_promotion_wait_for_the_models_root_lock(tmp_path):
    models = str(tmp_path / "models")
    first = promote(_export(tmp_path, "night1", 0.50), models, CIDER)
    promote(_export(tmp_path, "night2", 0.60, current=first, current_cider=0.5), models, CIDER)
    held_back = _export(tmp_path, "night3", 0.10)

    # A live holder (its heartbeat refreshed every 0.2 s) is waited on for 2 x lock_stale_seconds.
    with FolderLock(models, stale_after=1.0, command="another promotion"):
        with pytest.raises(ShowtellError, match="another promotion"):
            rollback(models, "why", lock_stale_seconds=1.0)
        with pytest.raises(ShowtellError, match="another promotion"):
            promote(held_back, models, CIDER, lock_stale_seconds=1.0, forced="why")

    assert _model_in(Path(models) / CURRENT_DIR) == "night2" and len(read_history(models)) == 2


def test_a_models_root_on_an_object_store_takes_a_local_export(tmp_path):
    models = f"memory://promote-{uuid.uuid4().hex}/models"
    first = promote(_export(tmp_path, "night1", 0.5), models, CIDER)

    record = promote(_export(tmp_path, "night2", 0.6, current=first, current_cider=0.5), models, CIDER)

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
    first = promote(_export(tmp_path, "night1", 0.5), models, CIDER)  # an export that records none
    candidate = _export(tmp_path, "night2", 0.6, current=first)
    (Path(candidate.export_dir) / "showtell_export.json").write_text(
        json.dumps({"model": "night2", "vocabulary_id": "3f1c0d5e9a7b2468"})
    )

    promote(candidate, models, CIDER)

    assert current_model(models)["vocabulary_id"] == "3f1c0d5e9a7b2468"
    assert json.loads((Path(models) / "previous").glob("*").__next__().joinpath(MODEL_FILE).read_text())[
        "vocabulary_id"
    ] is None
