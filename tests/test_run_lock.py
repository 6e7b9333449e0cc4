"""`showtell run` under the run_root lock (orchestration/run.py with orchestration/lock.py): a run
refused while another holds the lock, one that waits for it, and one that loses it midway.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestration.lock import LOCK_FILE, LockHeldError, LockLostError
from orchestration.manifest import MANIFEST_FILE, RUNNING
from orchestration.run import RAN, run_pipeline
from orchestration.steps import Step
from tests.run_table import REPO, TABLE, logged_calls, manifest_json, run_config, run_table, step_results


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "run"


HOLDER = """
import sys, time
from orchestration.lock import FolderLock
lock = FolderLock(sys.argv[1], stale_after=60, command="showtell run")
lock.acquire()
print(lock.run_id, flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


def _hold_lock(root: Path, seconds: float) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-c", HOLDER, str(root), str(seconds)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def test_a_run_fails_at_once_naming_the_run_that_holds_the_lock(root):
    process, holder = _hold_lock(root, 30)
    try:
        with pytest.raises(LockHeldError) as caught:
            run_table(root)
    finally:
        process.kill()
        process.wait()
    message = str(caught.value)
    assert f"{root} is locked by run {holder} (showtell run, pid {process.pid} on " in message
    assert "wait for it with --wait SECONDS" in message and "run.lock_stale_seconds" in message
    assert logged_calls(root) == [] and not (root / MANIFEST_FILE).exists()


def test_a_run_with_wait_proceeds_once_the_other_run_is_done(root):
    process, _ = _hold_lock(root, 2)

    result = run_table(root, wait=60)

    assert process.wait(10) == 0
    assert step_results(result) == dict.fromkeys(["fetch", "prepare", "train", "score"], RAN)


def test_a_run_that_lost_its_lock_stops_without_writing_the_manifest_again(root):
    def taken_over(config):
        thief = {"run_id": "thief", "host": "elsewhere", "boot_id": "", "pid": 1, "started": "t", "command": "x"}
        (Path(config.run_root) / LOCK_FILE).write_text(json.dumps({**thief, "heartbeat": time.time()}))
        time.sleep(0.5)  # a few heartbeats: the lock is found lost
        (Path(config.run_root) / "steal.txt").write_text("done")

    table = (TABLE[0], Step("steal", lambda c: (), lambda c: [], lambda c: [str(root / "steal.txt")], taken_over))

    with pytest.raises(LockLostError, match="lost the lock on .* to run thief"):
        run_pipeline(run_config(root, "run.lock_stale_seconds=0.5"), table)

    assert manifest_json(root)["steps"]["steal"]["state"] == RUNNING  # as it was when the lock was lost
    assert json.loads((root / LOCK_FILE).read_text())["run_id"] == "thief"
