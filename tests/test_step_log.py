"""orchestration/step_log.py: while a step runs, what its code, its libraries and its child
processes print goes to the step's log, and showtell's own console lines still reach the terminal."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

from orchestration.step_log import step_output
from schemas.storage import read_text
from tests.run_table import REPO

STEP = textwrap.dedent(
    """
    import logging, os, subprocess, sys
    from orchestration.step_log import open_console, step_output
    logging.basicConfig(stream=open_console(), level=logging.INFO, format="%(message)s")
    log_url = sys.argv[1]
    for attempt in (1, 2):
        logging.info("showtell: step %d starts", attempt)
        with step_output(log_url, echo_to=open_console() if "--verbose" in sys.argv else None):
            print(f"python print {attempt}")
            print(f"python stderr {attempt}", file=sys.stderr)
            os.write(2, f"C-level write {attempt}\\n".encode())  # as TensorFlow's C++ logging writes
            subprocess.run(["sh", "-c", f"echo child process {attempt}; echo child stderr {attempt} >&2"])
            logging.info("showtell: step %d is working", attempt)
        logging.info("showtell: step %d done", attempt)
    print("the run's summary")
    """
)
ENGINE_LINES = ["python print", "python stderr", "C-level write", "child process", "child stderr"]


def _run_step_script(log_url: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", STEP, log_url, *flags], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_a_steps_engine_output_goes_to_its_log_and_showtells_lines_to_the_console(tmp_path):
    log = tmp_path / "logs" / "train-phase1.log"

    done = _run_step_script(str(log))

    assert done.returncode == 0, done.stderr
    console = done.stdout.splitlines() + done.stderr.splitlines()
    assert sorted(console) == sorted(
        [f"showtell: step {n} {what}" for n in (1, 2) for what in ("starts", "is working", "done")]
        + ["the run's summary"]
    )
    logged = log.read_text().splitlines()
    # Both attempts, the second appended: a resumed step keeps its first attempt's log.
    assert sorted(logged) == sorted(f"{line} {n}" for n in (1, 2) for line in ENGINE_LINES)


def test_verbose_also_streams_the_log_to_the_console(tmp_path):
    log = tmp_path / "step.log"

    done = _run_step_script(str(log), "--verbose")

    assert done.returncode == 0, done.stderr
    for line in ENGINE_LINES:
        assert f"{line} 2" in done.stderr and f"{line} 2" in log.read_text()


def test_a_log_on_an_object_store_gets_the_steps_output_appended():
    log_url = f"memory://step-log-{uuid.uuid4().hex}/logs/evaluate.log"

    for attempt in (1, 2):
        with step_output(log_url):
            os.write(1, f"engine line {attempt}\n".encode())

    assert read_text(log_url) == "engine line 1\nengine line 2\n"
