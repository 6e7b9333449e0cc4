"""Preprocessing and evaluation on Beam's portable path: `PortableRunner` against Beam's own local
job service (`apache_beam.runners.portability.local_job_service_main`), its SDK workers started as
separate processes by an external worker pool (`apache_beam.runners.worker.worker_pool_main`), as a
Flink or Spark job server would run them. The shards and word_counts.txt must be byte-identical to
the DirectRunner's, and the evaluation's results the same.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from pipelines.evaluate import run_evaluate
from pipelines.preprocess import run_preprocess
from pipelines.sample_data import generate_sample_data
from schemas import records
from schemas.config import build_config
from schemas.layout import EVAL_REPORT_FILE
from schemas.vocabulary import WORD_COUNTS_FILE
from tests.captioning import MODEL, publish_tiny_final
from tests.s3_server import free_port

pytestmark = pytest.mark.slow

SHARDS = {"train": 2, "val": 1, "test": 1}


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
    job_port, pool_port = free_port(), free_port()
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


def _config(mirror: Path, run_root: Path, runner: str, options: list[str]):
    tree = {
        "run_root": str(run_root),
        "data": {"mirror": str(mirror), "shards": SHARDS},
        "model": MODEL,
        "beam": {"runner": runner, "options": options, "direct_running_mode": "in_memory"},
        "eval": {"checkpoints": "final", "max_images": 4, "report_images": 1},
    }
    return build_config(tree, [])


@pytest.fixture(scope="module")
def preprocessed(job_service, tmp_path_factory) -> Path:
    """The same sample set preprocessed on both runners, under `direct/` and `portable/`."""
    root = tmp_path_factory.mktemp("preprocessed")
    generate_sample_data(str(root / "mirror"), train_images=12, val_images=8, image_size=MODEL["image_size"])
    run_preprocess(_config(root / "mirror", root / "direct", "DirectRunner", []))
    run_preprocess(_config(root / "mirror", root / "portable", "PortableRunner", job_service))
    return root


def test_the_portable_runner_on_separate_worker_processes_writes_the_directrunners_bytes(preprocessed):
    names = [name for split, n in SHARDS.items() for name in records.shard_names(split, n)] + [WORD_COUNTS_FILE]
    for name in names:
        portable, direct = (preprocessed / run / "data" / name for run in ("portable", "direct"))
        assert portable.read_bytes() == direct.read_bytes() and direct.stat().st_size > 0, name


def test_the_portable_runner_evaluates_a_checkpoint_as_the_directrunner_does(preprocessed, job_service, tmp_path):
    reports = {}
    for runner, options in (("DirectRunner", []), ("PortableRunner", job_service)):
        run_root = tmp_path / runner
        shutil.copytree(preprocessed / "direct" / "data", run_root / "data")
        # An untrained phase 1 final/ over the data's vocabulary: evaluation needs only a checkpoint.
        publish_tiny_final(run_root, (run_root / "data" / WORD_COUNTS_FILE).read_text(encoding="utf-8"))
        run_evaluate(_config(preprocessed / "mirror", run_root, runner, options))
        reports[runner] = json.loads((run_root / "eval" / EVAL_REPORT_FILE).read_text())

    direct, portable = (_results(reports[runner]) for runner in ("DirectRunner", "PortableRunner"))
    assert portable == direct and len(direct) == 1 and direct[0][1] == "ok"


def _results(report: dict) -> list[tuple]:
    """Per checkpoint: phase, status, perplexity, metrics and captions (not the seconds it took)."""
    return [
        (c["phase"], c["status"], c["perplexity"], c["metrics"], [x["caption"] for x in c["captions"]])
        for c in report["checkpoints"]
    ]
