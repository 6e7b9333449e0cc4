"""`showtell status` (orchestration/run.py's `step_status`, orchestration/run_text.py's
`format_status`) over tests/run_table.py's table of small real steps: each step's state, timing,
staleness, outputs, and what `showtell run` would do with it now.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestration.lock import FolderLock
from orchestration.manifest import DONE, FAILED, RUNNING, Manifest
from orchestration.run import StepFailedError, step_status
from orchestration.run_text import format_status
from tests.run_table import TABLE, run_config, run_table


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "run"


def test_status_says_a_step_of_the_live_run_is_running_now(root):
    run_table(root)
    with FolderLock(str(root), stale_after=60) as lock:
        manifest = Manifest.load(str(root))
        manifest.set_step("train", {**manifest.step("train"), "state": RUNNING, "run_id": lock.run_id})

        rows = {row.name: row for row in step_status(run_config(root), TABLE)}
        text = format_status(run_config(root), list(rows.values()))

    assert rows["train"].state == RUNNING and rows["train"].next_run == f"running now (run {lock.run_id})"
    assert f"lock: held by run {lock.run_id}" in text


def test_status_shows_each_steps_state_timing_staleness_and_outputs(root):
    run_table(root, until="train")
    (root / "fetch.txt").unlink()
    config = run_config(root, "data.min_word_count=2")

    rows = {row.name: row for row in step_status(config, TABLE)}

    assert (rows["fetch"].state, rows["fetch"].fingerprint) == (DONE, "current")
    assert rows["fetch"].next_run == "run: outputs missing: fetch.txt"
    assert rows["fetch"].outputs == [(str(root / "fetch.txt"), False)]
    assert rows["prepare"].fingerprint == "stale" and "data.min_word_count 4 -> 2" in rows["prepare"].next_run
    assert rows["train"].state == DONE and rows["train"].seconds is not None and rows["train"].start
    assert (rows["score"].state, rows["score"].fingerprint, rows["score"].next_run) == ("-", "-", "run: not run before")
    text = format_status(config, list(rows.values()))
    assert text.splitlines()[:2] == [f"run_root: {root}", "lock: free"]
    assert "fingerprint" in text and "stale" in text and f"{root / 'fetch.txt'}  (missing)" in text


def test_status_calls_a_step_left_running_without_a_live_lock_interrupted(root):
    run_table(root)
    manifest = Manifest.load(str(root))
    manifest.set_step("train", {**manifest.step("train"), "state": RUNNING, "run_id": "gone"})

    rows = {row.name: row for row in step_status(run_config(root), TABLE)}

    assert rows["train"].state == "interrupted" and rows["train"].next_run.startswith("run: resuming")
    assert rows["score"].next_run == "run: train is not done"


def test_status_shows_a_failed_steps_error(root):
    root.mkdir()
    (root / "fail-prepare").touch()
    with pytest.raises(StepFailedError):
        run_table(root)

    rows = step_status(run_config(root), TABLE)

    prepare = {row.name: row for row in rows}["prepare"]
    assert prepare.state == FAILED and prepare.next_run == "run: retrying: it failed (prepare was told to fail)"
    assert "prepare failed: prepare was told to fail" in format_status(run_config(root), rows).splitlines()


def test_status_says_which_steps_follow_one_that_will_rerun(root):
    run_table(root)

    rows = {row.name: row for row in step_status(run_config(root, "data.min_word_count=2"), TABLE)}

    assert rows["fetch"].next_run == "skip"
    assert rows["train"].next_run == rows["score"].next_run == "run: after prepare re-runs"


def _all_current(rows) -> bool:
    return [(row.fingerprint, row.next_run) for row in rows] == [("current", "skip")] * len(TABLE)


def test_status_is_current_whether_run_root_is_spelled_relative_absolute_or_through_a_symlink(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alias").symlink_to(tmp_path)
    run_table(Path("run"))

    for spelling in (Path("run"), tmp_path / "run", tmp_path / "alias" / "run"):
        assert _all_current(step_status(run_config(spelling), TABLE)), spelling


def test_status_is_current_for_a_run_made_through_an_absolute_path_and_reached_relative(tmp_path, monkeypatch):
    run_table(tmp_path / "run")
    monkeypatch.chdir(tmp_path)

    assert _all_current(step_status(run_config(Path("run")), TABLE))


def test_status_of_a_copied_run_folder_is_current_until_an_input_changes_there(root, tmp_path):
    run_table(root)
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(root, copy)

    assert _all_current(step_status(run_config(copy), TABLE))
    (copy / "prepare.txt").write_text("edited by hand")
    rows = {row.name: row for row in step_status(run_config(copy), TABLE)}
    assert (rows["prepare"].fingerprint, rows["prepare"].next_run) == ("current", "skip")
    assert (rows["train"].fingerprint, rows["train"].next_run) == ("stale", "run: input prepare.txt changed")
    assert _all_current(step_status(run_config(root), TABLE))  # the original is untouched
