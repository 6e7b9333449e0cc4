"""`showtell run` decides, step by step, to skip, resume or run fresh (orchestration/run.py): the
real runner over tests/run_table.py's table of small real steps that write files and log their
calls. Skip when up to date, re-run on a changed key or input, resume after a failure or a kill,
go on when only `steps` grew, and --until/--from/--force.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.lock import LOCK_FILE
from orchestration.manifest import DONE, FAILED, RUNNING, Manifest
from orchestration.run import RAN, SKIPPED, StepFailedError
from orchestration.run_text import format_outcomes
from schemas.errors import ShowtellError
from tests.run_table import logged_calls, manifest_json, run_table, step_reasons, step_results


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "run"


def test_a_first_run_runs_every_step_in_order_and_records_each(root):
    result = run_table(root)

    assert logged_calls(root) == ["fetch", "prepare", "reset train", "train", "score"]  # never ran: train runs fresh
    assert step_results(result) == dict.fromkeys(["fetch", "prepare", "train", "score"], RAN)
    steps = manifest_json(root)["steps"]
    for name in ("fetch", "prepare", "train", "score"):
        record = steps[name]
        assert record["state"] == DONE and record["error"] is None and record["run_id"] == result.run_id
        assert record["start"] <= record["end"] and record["seconds"] >= 0 and len(record["fingerprint"]) == 64
        assert record["outputs"] == [str(root / f"{name}.txt")] and record["summary"] == {"wrote": f"{name}.txt"}
    assert steps["score"]["basis"]["config"] == {"eval.beam_size": 3}
    assert steps["score"]["basis"]["upstream"] == {"step": "train", "done": steps["train"]["end"]}
    assert not (root / LOCK_FILE).exists()


def test_a_second_run_skips_every_step_that_is_up_to_date(root, caplog):
    run_table(root)
    caplog.set_level("INFO", logger="showtell.run")

    result = run_table(root)

    assert step_results(result) == dict.fromkeys(["fetch", "prepare", "train", "score"], SKIPPED)
    assert logged_calls(root) == ["fetch", "prepare", "reset train", "train", "score"]
    assert "step train: skipped (up to date)" in caplog.text
    assert "0 steps ran" in format_outcomes(result)


def test_a_changed_key_reruns_its_step_and_every_step_after_it(root, caplog):
    run_table(root)
    caplog.set_level("INFO", logger="showtell.run")

    result = run_table(root, "data.min_word_count=2")

    assert step_results(result) == {"fetch": SKIPPED, "prepare": RAN, "train": RAN, "score": RAN}
    assert logged_calls(root)[5:] == ["prepare", "reset train", "train", "score"]  # train runs fresh: reset first
    assert "step prepare: start (config data.min_word_count 4 -> 2)" in caplog.text
    assert "step train: start (prepare re-ran; input prepare.txt changed)" in caplog.text
    assert "step score: done in" in caplog.text


def test_a_changed_key_of_the_last_step_reruns_only_that_step(root):
    run_table(root)

    result = run_table(root, "eval.beam_size=5")

    assert step_results(result) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": SKIPPED, "score": RAN}


def test_more_steps_alone_let_a_step_go_on_from_its_last_attempt(root, caplog):
    run_table(root)
    caplog.set_level("INFO", logger="showtell.run")

    result = run_table(root, "train.phase1.steps=2000000")

    assert step_results(result) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": RAN, "score": RAN}
    assert logged_calls(root)[5:] == ["train", "score"]  # no reset: it goes on
    assert "step train: start (config train.phase1.steps 1000000 -> 2000000)" in caplog.text


@pytest.mark.parametrize(
    "overrides", [["train.phase1.steps=10"], ["train.phase1.steps=2000000", "train.phase1.batch_size=4"]]
)
def test_fewer_steps_or_other_changes_with_them_start_the_step_afresh(root, overrides):
    run_table(root)

    run_table(root, *overrides)

    assert logged_calls(root)[5:] == ["reset train", "train", "score"]


def test_an_input_changed_outside_the_run_reruns_the_steps_from_the_one_reading_it(root, caplog):
    run_table(root)
    (root / "prepare.txt").write_text("edited by hand")
    caplog.set_level("INFO", logger="showtell.run")

    result = run_table(root)

    assert step_results(result) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": RAN, "score": RAN}
    assert "step train: start (input prepare.txt changed)" in caplog.text


def test_missing_outputs_are_checked_and_their_step_resumed_not_reset(root, caplog):
    run_table(root)
    (root / "train.txt").unlink()
    caplog.set_level("INFO", logger="showtell.run")

    result = run_table(root)

    assert step_results(result) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": RAN, "score": RAN}
    assert logged_calls(root)[5:] == ["train", "score"]  # no "reset train": same inputs, same settings
    assert "step train: start (outputs missing: train.txt)" in caplog.text


def test_a_crashed_step_exits_1_naming_its_log_which_holds_its_output_and_traceback(root):
    root.mkdir()
    (root / "crash-train").touch()

    with pytest.raises(StepFailedError) as failed:
        run_table(root)

    assert failed.value.exit_code == 1
    assert str(failed.value).startswith("step train failed after ")
    assert str(failed.value).endswith(f"RuntimeError: train crashed (log: {root / 'logs' / 'train.log'})")
    log = (root / "logs" / "train.log").read_text()
    assert "train: an engine line before the crash" in log
    assert "Traceback (most recent call last)" in log and log.rstrip().endswith("RuntimeError: train crashed")
    assert manifest_json(root)["steps"]["train"]["error"] == "RuntimeError: train crashed"


def test_a_failed_step_is_recorded_and_the_next_run_continues_from_it(root):
    root.mkdir()
    (root / "fail-prepare").touch()

    expected = r"^step prepare failed after [\d.]+ s: prepare was told to fail \(log: "
    with pytest.raises(StepFailedError, match=expected) as failed:
        run_table(root)

    assert failed.value.exit_code == 2 and failed.value.log_url == str(root / "logs" / "prepare.log")

    steps = manifest_json(root)["steps"]
    assert steps["fetch"]["state"] == DONE
    assert steps["prepare"]["state"] == FAILED and steps["prepare"]["error"] == "prepare was told to fail"
    assert steps["prepare"]["end"] and steps["prepare"]["seconds"] is not None
    assert "train" not in steps and not (root / LOCK_FILE).exists()

    (root / "fail-prepare").unlink()
    result = run_table(root)

    assert step_results(result) == {"fetch": SKIPPED, "prepare": RAN, "train": RAN, "score": RAN}
    assert step_reasons(result)["prepare"] == "retrying: it failed (prepare was told to fail)"
    assert logged_calls(root) == ["fetch", "prepare", "reset train", "train", "score"]


def test_a_step_left_running_by_a_killed_run_is_resumed_not_reset(root):
    run_table(root)
    manifest = Manifest.load(str(root))
    manifest.set_step("train", {**manifest.step("train"), "state": RUNNING, "end": None, "run_id": "killed"})

    result = run_table(root)

    assert step_results(result) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": RAN, "score": RAN}
    assert step_reasons(result)["train"].startswith("resuming: run killed started it at ")
    assert logged_calls(root)[5:] == ["train", "score"]


def test_until_stops_after_the_step_and_the_next_run_goes_on_from_there(root):
    result = run_table(root, until="prepare")

    assert step_results(result) == {"fetch": RAN, "prepare": RAN}
    assert set(manifest_json(root)["steps"]) == {"fetch", "prepare"}

    assert step_results(run_table(root)) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": RAN, "score": RAN}


def test_force_reruns_the_step_and_every_step_after_it_fresh(root):
    run_table(root)

    result = run_table(root, force="train")

    assert step_results(result) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": RAN, "score": RAN}
    assert step_reasons(result)["train"] == "forced by --force train"
    assert logged_calls(root)[5:] == ["reset train", "train", "score"]


def test_force_brings_the_steps_before_it_up_to_date_first(root):
    run_table(root, force="score")

    assert logged_calls(root) == ["fetch", "prepare", "reset train", "train", "score"]


def test_from_requires_the_steps_before_it_to_be_done_and_up_to_date(root):
    not_done = r"--from train: step fetch before it is not done and up to date \(not run before\)"
    with pytest.raises(ShowtellError, match=not_done):
        run_table(root, start="train")
    assert logged_calls(root) == []

    run_table(root)
    with pytest.raises(ShowtellError, match=r"step prepare before it .*config data.min_word_count 4 -> 3"):
        run_table(root, "data.min_word_count=3", start="train")

    result = run_table(root, start="train")
    assert step_results(result) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": RAN, "score": RAN}


@pytest.mark.parametrize("option", ["until", "start", "force"])
def test_an_unknown_step_name_is_an_error_listing_the_steps(root, option):
    flag = {"until": "--until", "start": "--from", "force": "--force"}[option]

    unknown = rf"^{flag} 'trian': unknown step; the steps are fetch, prepare, train, score$"
    with pytest.raises(ShowtellError, match=unknown):
        run_table(root, **{option: "trian"})


def test_from_or_force_after_until_is_an_error(root):
    with pytest.raises(ShowtellError, match="--force score comes after --until prepare"):
        run_table(root, until="prepare", force="score")
    with pytest.raises(ShowtellError, match="give one of them"):
        run_table(root, start="train", force="score")
