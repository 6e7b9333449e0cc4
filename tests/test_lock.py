"""orchestration/lock.py: one holder at a time, on local disks and object stores, with stale
locks (dead process, old heartbeat) taken over. Holders in other processes are real subprocesses."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from orchestration.lock import LOCK_FILE, FolderLock, LockHeldError, LockLostError, LockOwner, read_owner, stale_reason

REPO = Path(__file__).resolve().parent.parent

HOLDER = """
import sys, time
from orchestration.lock import FolderLock
lock = FolderLock(sys.argv[1], stale_after=float(sys.argv[3]), command="test holder")
lock.acquire()
print(lock.run_id, flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


def _hold(folder: Path, seconds: float, stale_after: float = 60.0) -> tuple[subprocess.Popen, str]:
    """A subprocess that takes the lock, prints its run id, holds it `seconds`, releases it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(seconds), str(stale_after)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    run_id = process.stdout.readline().strip()
    assert run_id, "the holder did not take the lock"
    return process, run_id


def _write_owner(folder: Path, **fields) -> LockOwner:
    owner = LockOwner(
        run_id="other",
        host="elsewhere",
        boot_id="b",
        pid=1,
        started="2025-01-01T00:00:00+00:00",
        heartbeat=time.time(),
        command="showtell run",
    )
    owner = dataclasses.replace(owner, **fields)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps(dataclasses.asdict(owner)))
    return owner


def test_a_lock_names_its_owner_while_held_and_is_gone_after(tmp_path):
    with FolderLock(str(tmp_path / "run"), stale_after=60, command="showtell run") as lock:
        owner = read_owner(str(tmp_path / "run"))
        assert owner.run_id == lock.run_id and owner.pid == os.getpid() and owner.command == "showtell run"
        assert abs(owner.heartbeat - time.time()) < 5

    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_second_lock_fails_at_once_naming_the_live_holder(tmp_path):
    process, holder = _hold(tmp_path, 30)
    try:
        started = time.monotonic()
        with pytest.raises(LockHeldError) as caught:
            FolderLock(str(tmp_path), stale_after=60, hint="; wait with --wait").acquire()
        assert time.monotonic() - started < 3
        message = str(caught.value)
        assert f"is locked by run {holder} (test holder, pid {process.pid} on " in message
        assert message.endswith("; wait with --wait")
    finally:
        process.kill()
        process.wait()


def test_a_waiting_lock_gets_the_folder_once_the_holder_releases_it(tmp_path):
    process, holder = _hold(tmp_path, 2)
    started = time.monotonic()

    with FolderLock(str(tmp_path), stale_after=60, wait=30) as lock:
        waited = time.monotonic() - started
        assert read_owner(str(tmp_path)).run_id == lock.run_id != holder

    assert 0.5 < waited < 20
    assert process.wait(10) == 0


def test_the_lock_of_a_sigkilled_process_is_taken_over_with_a_warning(tmp_path, caplog):
    process, holder = _hold(tmp_path, 60)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert read_owner(str(tmp_path)).run_id == holder  # left behind
    assert "is not running on this host" in stale_reason(read_owner(str(tmp_path)), stale_after=600)

    with caplog.at_level(logging.WARNING, logger="showtell.lock"):
        with FolderLock(str(tmp_path), stale_after=600) as lock:
            assert read_owner(str(tmp_path)).run_id == lock.run_id

    assert f"taking over the stale lock on {tmp_path}: run {holder}" in caplog.text
    assert not list(tmp_path.glob(f"{LOCK_FILE}.stale-*"))


def test_another_hosts_lock_is_stale_only_once_its_heartbeat_is_old(tmp_path):
    _write_owner(tmp_path, heartbeat=time.time() - 30)
    with pytest.raises(LockHeldError, match="run other .*pid 1 on elsewhere"):
        FolderLock(str(tmp_path), stale_after=60).acquire()

    _write_owner(tmp_path, heartbeat=time.time() - 120)
    assert "heartbeat is 120 s old (stale after 60 s)" in stale_reason(read_owner(str(tmp_path)), 60)
    with FolderLock(str(tmp_path), stale_after=60) as lock:
        assert read_owner(str(tmp_path)).run_id == lock.run_id


def test_the_heartbeat_keeps_a_held_lock_fresh(tmp_path):
    with FolderLock(str(tmp_path), stale_after=0.5) as lock:
        first = read_owner(str(tmp_path)).heartbeat
        time.sleep(0.8)
        later = read_owner(str(tmp_path)).heartbeat
        assert later > first
        assert stale_reason(read_owner(str(tmp_path)), 0.5) is None
        lock.check()


def test_a_lock_taken_over_by_another_run_is_reported_lost(tmp_path):
    lock = FolderLock(str(tmp_path), stale_after=0.5)
    lock.acquire()
    try:
        _write_owner(tmp_path, run_id="thief")
        time.sleep(0.5)
        with pytest.raises(LockLostError, match=r"lost the lock on .* to run thief"):
            lock.check()
    finally:
        lock.release()
    assert read_owner(str(tmp_path)).run_id == "thief"  # not ours to remove


def test_an_unreadable_lock_file_is_held_while_new_and_stale_when_old(tmp_path):
    (tmp_path / LOCK_FILE).write_text("")  # a writer killed between creating and filling it
    with pytest.raises(LockHeldError, match="an unreadable lock file"):
        FolderLock(str(tmp_path), stale_after=60).acquire()

    os.utime(tmp_path / LOCK_FILE, (time.time() - 120, time.time() - 120))
    with FolderLock(str(tmp_path), stale_after=60) as lock:
        assert read_owner(str(tmp_path)).run_id == lock.run_id


def test_locks_on_an_object_store_exclude_each_other_and_release():
    folder = f"memory://lock-{uuid.uuid4().hex}/run"
    with FolderLock(folder, stale_after=60, settle=0) as lock:
        assert read_owner(folder).run_id == lock.run_id
        with pytest.raises(LockHeldError, match=f"run {lock.run_id}"):
            FolderLock(folder, stale_after=60, settle=0).acquire()
    assert read_owner(folder) is None
    with FolderLock(folder, stale_after=60, settle=0):
        pass


def test_an_object_store_lock_of_a_dead_process_is_taken_over():
    folder = f"memory://lock-{uuid.uuid4().hex}/run"
    dead = FolderLock(folder, stale_after=60, settle=0)
    dead.acquire()
    dead._stop.set()  # as if its process had died: no heartbeat, no release
    time.sleep(0.3)
    with FolderLock(folder, stale_after=0.2, settle=0) as lock:
        assert read_owner(folder).run_id == lock.run_id != dead.run_id
