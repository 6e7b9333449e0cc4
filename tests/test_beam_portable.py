"""Preprocessing on Beam's portable path: `PortableRunner` against Beam's own local job service
(`apache_beam.runners.portability.local_job_service_main`), its SDK workers started as separate
processes by an external worker pool (`apache_beam.runners.worker.worker_pool_main`), as a Flink
or Spark job server would run them. The shards and word_counts.txt must be byte-identical to the
DirectRunner's.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from pipelines.preprocess import run_preprocess
from pipelines.sample_data import generate_sample_data
from schemas import records
from schemas.config import build_config
from schemas.vocabulary import WORD_COUNTS_FILE

pytestmark = pytest.mark.slow

SHARDS = {"train": 2, "val": 1, "test": 1}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"it exited with {process.returncode}: {log.read_text()[-2000:]}"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"nothing listened on {port} within {timeout:.0f} s: {log.read_text()}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def job_service(tmp_path_factory) -> Iterator[list[str]]:
    """Beam's local job service and an external worker pool on 127.0.0.1; yields the pipeline
    options that send a job to them. The pool starts each SDK worker as `python -c ...`, so this
    interpreter's folder goes first on its PATH."""
    folder = tmp_path_factory.mktemp("portable")
    job_port, pool_port = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    modules = {
        "job service": (["apache_beam.runners.portability.local_job_service_main", "--port", str(job_port)], job_port),
        "worker pool": (["apache_beam.runners.worker.worker_pool_main", "--service_port", str(pool_port)], pool_port),
    }
    started = []
    try:
        for name, (args, port) in modules.items():
            log = folder / f"{name.replace(' ', '_')}.log"
            with open(log, "w") as output:
                process = subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=output, stderr=output)
            started.append(process)
            _wait_for_port(port, process, log)
        yield [
            f"--job_endpoint=localhost:{job_port}",
            "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{pool_port}",
        ]
    finally:
        for process in started:
            process.terminate()
            process.wait(timeout=30)


def _preprocess(mirror: Path, run_root: Path, runner: str, options: list[str]) -> dict:
    tree = {
        "run_root": str(run_root),
        "data": {"mirror": str(mirror), "shards": SHARDS},
        "beam": {"runner": runner, "options": options, "direct_running_mode": "in_memory"},
    }
    return run_preprocess(build_config(tree, []))


def test_the_portable_runner_on_separate_worker_processes_writes_the_directrunners_bytes(job_service, tmp_path):
    mirror = tmp_path / "mirror"
    generate_sample_data(str(mirror), train_images=12, val_images=8, image_size=48)

    direct = _preprocess(mirror, tmp_path / "direct", "DirectRunner", [])
    portable = _preprocess(mirror, tmp_path / "portable", "PortableRunner", job_service)

    assert portable["records_written"] == direct["records_written"] > 0
    names = [name for split, n in SHARDS.items() for name in records.shard_names(split, n)] + [WORD_COUNTS_FILE]
    for name in names:
        assert (tmp_path / "portable/data" / name).read_bytes() == (tmp_path / "direct/data" / name).read_bytes(), name
