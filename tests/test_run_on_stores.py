"""`showtell run` end to end with everything on an object store: `run_root`, `data.source`,
`data.mirror` and `promote.models_root` on s3:// (moto's server) and on gs:// (gcp-storage-emulator),
both on 127.0.0.1. The run is SIGKILLed (its whole process group, Ray included) once phase 1 has a
checkpoint on the store, then run again to the end; its records and `word_counts.txt` are compared
byte for byte with a local run of the same config on the same source files (`slow`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from orchestration.cli import main as cli_main
from orchestration.lock import LOCK_FILE
from orchestration.manifest import DONE, MANIFEST_FILE, RUNNING
from schemas.config import MSCOCO_FILES
from schemas.vocabulary import WORD_COUNTS_FILE
from tests.console import ENGINE_INTERNALS
from tests.gcs_server import gcs_fixture
from tests.run_table import REPO, config_file
from tests.s3_server import s3_fixture
from tests.test_run_end_to_end import TINY, run_env

pytestmark = pytest.mark.slow

BUCKET = "showtell-runs"
SAMPLE = ["--train-images", str(TINY["data"]["sample"]["train_images"]), "--val-images", "20", "--image-size", "64"]

s3 = s3_fixture(BUCKET)  # a moto S3 server on 127.0.0.1 with BUCKET; an s3fs file system on it
gcs = gcs_fixture(BUCKET)  # the GCS emulator on 127.0.0.1 with BUCKET; a gcsfs file system on it

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ ([\w.]+): ")  # a logger's line; group 1: its name

# The emulator answers 501 to gcsfs's moveTo (a rename), which gcsfs retries for about 30 s before it
# copies and deletes instead; the run's own processes skip those retries as the tests' process does
# (tests/gcs_server.py). Real GCS answers moveTo.
CLI = "import sys, gcsfs.retry; gcsfs.retry.errs -= {501, '501'}; from orchestration.cli import main; sys.exit(main())"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """MSCOCO's three files in their layout, as `showtell sample-data` writes them."""
    folder = tmp_path_factory.mktemp("source")
    assert cli_main(["-q", "sample-data", str(folder), *SAMPLE]) == 0
    return folder


def _data_files(fs: fsspec.AbstractFileSystem, data: str) -> dict[str, bytes]:
    """The published records and word_counts.txt under the data folder `data` (a path of `fs`)."""
    fs.invalidate_cache()
    names = [path.rsplit("/", 1)[1] for path in fs.ls(data, detail=False)]
    chosen = [name for name in names if "-of-" in name or name == WORD_COUNTS_FILE]
    return {name: fs.cat_file(f"{data}/{name}") for name in chosen}


@pytest.fixture(scope="module")
def local_data(source, tmp_path_factory) -> dict[str, bytes]:
    """A local run of the same config, to its published records."""
    folder = tmp_path_factory.mktemp("local")
    config = config_file(
        folder, {**TINY, "run_root": str(folder / "run"), "data": {**TINY["data"], "source": str(source)}}
    )
    assert cli_main(["-q", "run", "--config", str(config), "--until", "preprocess"]) == 0
    return _data_files(fsspec.filesystem("file"), str(folder / "run" / "data"))


@dataclasses.dataclass(frozen=True)
class StoreRun:
    fs: fsspec.AbstractFileSystem  # the store's file system
    run_root: str  # its URL
    history_at_kill: list[dict]  # phase 1's history rows when the first run was killed
    manifest_at_kill: dict
    resumed: subprocess.CompletedProcess  # the run after the kill, to the end


def _cli(config: Path) -> list[str]:
    return [sys.executable, "-c", CLI, "run", "--config", str(config), "--progress-every", "5"]


def _read_json(fs: fsspec.AbstractFileSystem, path: str):
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


def _history(fs: fsspec.AbstractFileSystem, root: str) -> list[dict]:
    try:
        return [json.loads(line) for line in fs.cat_file(f"{root}/train/phase1/history.jsonl").decode().splitlines()]
    except FileNotFoundError:
        return []


@pytest.fixture(scope="module", params=["s3", "gs"])
def store_run(request, source, tmp_path_factory) -> StoreRun:
    """`showtell run` with everything on the store, SIGKILLed once phase 1 has a checkpoint there,
    then run again to the end."""
    scheme = request.param
    fs = request.getfixturevalue("s3" if scheme == "s3" else "gcs")
    bucket_root = f"{BUCKET}/{scheme}"
    fs.put(str(source), f"{bucket_root}/src", recursive=True)
    assert {path.rsplit("/", 1)[1] for path in fs.find(f"{bucket_root}/src")} == {
        name.rsplit("/", 1)[1] for name in MSCOCO_FILES
    }
    url = f"{scheme}://{bucket_root}"
    folder = tmp_path_factory.mktemp(f"on-{scheme}")
    data = {**TINY["data"], "source": f"{url}/src", "mirror": f"{url}/mirror"}
    config = config_file(
        folder, {**TINY, "run_root": f"{url}/run", "data": data, "promote": {"models_root": f"{url}/models"}}
    )
    root = f"{bucket_root}/run"

    def step_state(name: str):
        fs.invalidate_cache()
        manifest = _read_json(fs, f"{root}/{MANIFEST_FILE}") or {"steps": {}}
        return manifest["steps"].get(name, {}).get("state")

    log = folder / "killed-run.log"
    with open(log, "w") as output:
        first = subprocess.Popen(
            _cli(config), cwd=REPO, env=run_env(), stdout=output, stderr=output, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 600
        while not (step_state("train-phase1") == RUNNING and _history(fs, root)):
            assert first.poll() is None, f"the run ended (rc {first.returncode}) early: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no phase 1 checkpoint on {scheme}: {log.read_text()[-3000:]}"
            time.sleep(1)
        history_at_kill = _history(fs, root)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    fs.invalidate_cache()
    manifest_at_kill = _read_json(fs, f"{root}/{MANIFEST_FILE}")
    assert fs.exists(f"{root}/{LOCK_FILE}")
    resumed = subprocess.run(_cli(config), cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    fs.invalidate_cache()
    return StoreRun(fs, f"{url}/run", history_at_kill, manifest_at_kill, resumed)


def test_the_records_and_word_counts_on_the_store_are_byte_identical_to_a_local_runs(store_run, local_data):
    on_store = _data_files(store_run.fs, store_run.run_root.partition("://")[2] + "/data")
    assert sorted(on_store) == sorted(local_data) and len(local_data) == 1 + sum(TINY["data"]["shards"].values())
    assert on_store == local_data


def test_the_killed_run_resumed_phase_1_from_its_checkpoint_on_the_store(store_run):
    fs, root, resumed = store_run.fs, store_run.run_root.partition("://")[2], store_run.resumed
    assert "step download: skipped (up to date)" in resumed.stderr
    assert "step preprocess: skipped (up to date)" in resumed.stderr
    assert "step train-phase1: start (resuming: run " in resumed.stderr
    history = _history(fs, root)
    at_kill = store_run.history_at_kill
    assert history[: len(at_kill)] == at_kill  # kept on the store through the kill
    steps = [row["step"] for row in history]
    assert steps == sorted(set(steps)) and steps[-1] == TINY["train"]["phase1"]["steps"]
    assert max(row["resumed_from_step"] for row in history) >= at_kill[-1]["step"] > 0
    manifest = _read_json(fs, f"{root}/{MANIFEST_FILE}")
    for name in ("download", "preprocess"):
        assert manifest["steps"][name] == store_run.manifest_at_kill["steps"][name]
    assert all(record["state"] == DONE for record in manifest["steps"].values())
    assert not fs.exists(f"{root}/{LOCK_FILE}")


def test_the_console_holds_showtells_own_lines_and_no_store_clients_or_engines(store_run):
    console = store_run.resumed.stdout.splitlines() + store_run.resumed.stderr.splitlines()
    others = [line for line in console if LOG_LINE.match(line) and not LOG_LINE.match(line)[1].startswith("showtell")]
    assert others == [] and [line for line in console if ENGINE_INTERNALS.search(line)] == []


def test_the_mirror_the_final_checkpoints_and_the_promoted_model_are_on_the_store(store_run):
    fs, url = store_run.fs, store_run.run_root.rsplit("/", 1)[0]
    base = url.partition("://")[2]
    assert {path.rsplit("/", 1)[1] for path in fs.find(f"{base}/mirror") if not path.endswith(".json")} == {
        name.rsplit("/", 1)[1] for name in MSCOCO_FILES
    }
    for phase in (1, 2):
        assert fs.exists(f"{base}/run/train/phase{phase}/final/model.weights.h5")
    assert fs.exists(f"{base}/models/current/saved_model.pb")
    decision = _read_json(fs, f"{base}/run/promote.json")
    assert decision["decision"] == "promoted"
    assert store_run.resumed.stdout.strip().splitlines()[-2:] == [
        f"promoted model: {url}/models/current (the first model)",
        f"run report: {url}/run/report.html",
    ]
