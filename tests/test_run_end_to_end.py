"""The real pipeline as `python -m orchestration.cli run` subprocesses on a tiny config (`slow`):
SIGKILLed during train-phase1 and resumed, refused while another run holds the lock, and re-run
after config changes.
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

import pytest

from orchestration.lock import LOCK_FILE
from orchestration.manifest import DONE, MANIFEST_FILE, RUNNING
from tests.console import ENGINE_INTERNALS
from tests.run_table import REPO, config_file

TINY = {
    "data": {
        "sample": {"train_images": 40, "val_images": 20, "image_size": 64},
        "shards": {"train": 2, "val": 1, "test": 1},
    },
    "beam": {"direct_running_mode": "in_memory", "direct_num_workers": 1},
    "model": {
        "encoder": "mobilenet_v3_small",
        "image_size": 64,
        "encoder_weights": "none",
        "embedding_size": 32,
        "num_lstm_units": 32,
    },
    "train": {
        "shuffle_buffer": 64,
        "phase1": {"steps": 60, "batch_size": 8, "checkpoint_every": 10, "checkpoints_kept": 2, "train_encoder": True},
        "phase2": {"steps": 4, "batch_size": 8, "checkpoint_every": 2, "checkpoints_kept": 2},
    },
    "ray": {"num_workers": 1},
    "eval": {"checkpoints": "final", "max_images": 6, "batch_size": 6, "report_images": 2},
}


PROGRESS_EVERY = 3  # seconds between the resumed run's progress lines (its console is a pipe)
PROGRESS_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (train phase \d|evaluate|preprocess): (\d+)/(\d+) ")


def _cli(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "orchestration.cli", "run", "--config", str(config), *args]


def run_env() -> dict[str, str]:
    """The environment of a `showtell run` subprocess here."""
    # Ray Train's controller polls every 2 s by default; these runs are seconds long.
    return {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _finish(config: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = _cli(config, *args)
    process = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)
    assert process.returncode == 0, process.stderr[-4000:]
    return process


def _wait_for(condition, timeout: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        ended = f"the run ended (rc {process.returncode}) before {what}"
        assert process.poll() is None, f"{ended}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {log.read_text()[-3000:]}"
        time.sleep(0.5)


def _step_state(root: Path, name: str) -> str | None:
    try:
        return json.loads((root / MANIFEST_FILE).read_text())["steps"].get(name, {}).get("state")
    except (FileNotFoundError, ValueError):
        return None


def _history_steps(root: Path, phase: int) -> list[tuple[int, int]]:
    lines = (root / "train" / f"phase{phase}" / "history.jsonl").read_text().splitlines()
    return [(row["step"], row["resumed_from_step"]) for row in map(json.loads, lines)]


def _started(stderr: str) -> list[str]:
    """The steps a run's log says it started, in order."""
    lines = [line for line in stderr.splitlines() if "showtell.run: step " in line and ": start (" in line]
    return [line.split("showtell.run: step ", 1)[1].split(":")[0] for line in lines]


@dataclasses.dataclass(frozen=True)
class KilledAndResumed:
    root: Path  # the run root
    config: Path  # the tiny config file
    refused: subprocess.CompletedProcess  # the second run, started while the first held the lock
    history_at_kill: list[tuple[int, int]]  # phase 1's (step, resumed_from_step) rows when the first run was killed
    manifest_at_kill: dict
    resumed: subprocess.CompletedProcess  # the run after the kill, to the end


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory) -> KilledAndResumed:
    """A run SIGKILLed (its whole process group, Ray included) once phase 1 has a checkpoint, a
    second run started meanwhile (refused: the first holds the lock), then a run to the end. The
    tests below go on from here in file order, each from the state the one before left."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    root = tmp_path / "run"
    config = config_file(tmp_path, {"run_root": str(root), **TINY})
    log = tmp_path / "killed-run.log"
    with open(log, "w") as output:
        first = subprocess.Popen(
            _cli(config), cwd=REPO, env=run_env(), stdout=output, stderr=output, start_new_session=True
        )
    try:
        checkpoints = root / "train" / "phase1"
        _wait_for(lambda: _step_state(root, "train-phase1") == RUNNING, 300, "train-phase1 to start", first, log)
        refused = subprocess.run(_cli(config), cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)

        def has_checkpoint() -> bool:
            # history.jsonl starts empty and gets a row once the checkpoint holding it is committed.
            history = checkpoints / "history.jsonl"
            return any(checkpoints.glob("checkpoint_0*")) and history.exists() and bool(history.read_text().strip())

        _wait_for(has_checkpoint, 300, "a phase 1 checkpoint", first, log)
        history_at_kill = _history_steps(root, 1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert _step_state(root, "train-phase1") == RUNNING and (root / LOCK_FILE).exists()
    manifest_at_kill = json.loads((root / MANIFEST_FILE).read_text())
    resumed = _finish(config, "--progress-every", str(PROGRESS_EVERY))
    return KilledAndResumed(root, config, refused, history_at_kill, manifest_at_kill, resumed)


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_holds_the_lock(killed_and_resumed):
    refused = killed_and_resumed.refused
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("showtell run: error:")]
    assert len(errors) == 1, refused.stderr[-2000:]
    assert "is locked by run" in errors[0] and "(showtell run, pid " in errors[0], refused.stderr[-2000:]


@pytest.mark.slow
def test_a_run_killed_in_train_phase1_resumes_there_skipping_the_steps_before(killed_and_resumed):
    run = killed_and_resumed
    root, history_at_kill, manifest_at_kill, resumed = run.root, run.history_at_kill, run.manifest_at_kill, run.resumed
    assert "taking over the stale lock" in resumed.stderr and "is not running on this host" in resumed.stderr
    assert "step download: skipped (up to date)" in resumed.stderr
    assert "step preprocess: skipped (up to date)" in resumed.stderr
    assert _started(resumed.stderr) == ["train-phase1", "train-phase2", "evaluate", "export", "promote"]
    assert "step train-phase1: start (resuming: run " in resumed.stderr
    # Phase 1 went on from its last checkpoint: its history continues, no step was reported twice.
    history = _history_steps(root, 1)
    steps = [step for step, _ in history]
    assert history[: len(history_at_kill)] == history_at_kill
    assert steps == sorted(set(steps)) and steps[-1] == 60
    assert max(resumed_from for _, resumed_from in history) >= history_at_kill[-1][0] > 0
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    for name in ("download", "preprocess"):
        assert manifest["steps"][name] == manifest_at_kill["steps"][name]
    assert all(record["state"] == DONE for record in manifest["steps"].values())
    assert not (root / LOCK_FILE).exists()


@pytest.mark.slow
def test_the_run_ends_with_the_evaluation_summary_and_the_promoted_model(killed_and_resumed):
    root, resumed = killed_and_resumed.root, killed_and_resumed.resumed
    out = resumed.stdout
    assert "evaluation report (" in out and "best by CIDEr" in out
    assert out.strip().splitlines()[-2:] == [
        f"promoted model: {root / 'models' / 'current'} (the first model)",
        f"run report: {root / 'report.html'}",
    ]
    assert (root / "models" / "current" / "saved_model.pb").exists()
    decision = json.loads((root / "promote.json").read_text())
    assert decision["decision"] == "promoted" and decision["previous_model"] is None
    best = json.loads((root / "eval" / "best.json").read_text())
    assert json.loads((root / "export" / "showtell_export.json").read_text())["step"] == best["checkpoint"]["step"]


@pytest.mark.slow
def test_the_console_shows_no_ray_or_tensorflow_internals_and_each_steps_log_holds_them(killed_and_resumed):
    root, resumed = killed_and_resumed.root, killed_and_resumed.resumed
    console = resumed.stdout.splitlines() + resumed.stderr.splitlines()

    assert [line for line in console if ENGINE_INTERNALS.search(line)] == []
    assert any("step train-phase1: start" in line for line in console)  # showtell's own lines are there
    logs = {path.name: path.read_text() for path in (root / "logs").glob("*.log")}
    assert {"train-phase1.log", "train-phase2.log", "evaluate.log", "export.log", "promote.log"} <= set(logs)
    for phase in ("train-phase1.log", "train-phase2.log"):
        assert ENGINE_INTERNALS.search(logs[phase]), logs[phase][-2000:]  # Ray's lines went to the log


@pytest.mark.slow
def test_piped_the_run_shows_each_long_steps_progress_in_plain_lines_at_a_bounded_rate(killed_and_resumed):
    root, resumed = killed_and_resumed.root, killed_and_resumed.resumed
    lines: dict[str, list[tuple[int, int]]] = {}
    for match in filter(None, map(PROGRESS_LINE.match, resumed.stderr.splitlines())):
        lines.setdefault(match[1], []).append((int(match[2]), int(match[3])))

    # The resumed run trained phase 1 on from its checkpoint, then phase 2, then evaluated.
    assert set(lines) == {"train phase 1", "train phase 2", "evaluate"}, resumed.stderr[-3000:]
    steps = json.loads((root / MANIFEST_FILE).read_text())["steps"]
    displays = {"train phase 1": "train-phase1", "train phase 2": "train-phase2", "evaluate": "evaluate"}
    for display, step in displays.items():
        bound = steps[step]["seconds"] / PROGRESS_EVERY + 1  # one per period, and the last one
        assert 1 <= len(lines[display]) <= bound, (display, lines[display], steps[step]["seconds"])
        done, total = lines[display][-1]
        assert done == total, lines[display]  # the last line shows the work complete
    assert lines["train phase 1"][-1][1] == 60 and lines["evaluate"][-1][1] == 2


@pytest.mark.slow
def test_a_changed_eval_key_reruns_evaluate_export_and_promote_only(killed_and_resumed):
    root, config = killed_and_resumed.root, killed_and_resumed.config

    rerun = _finish(config, "--set", "eval.beam_size=2")

    assert _started(rerun.stderr) == ["evaluate", "export", "promote"]
    assert "step evaluate: start (config eval.beam_size 3 -> 2)" in rerun.stderr
    history = [json.loads(line) for line in (root / "models" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[1]["decision"] in ("promoted", "held_back")
    assert (history[1]["decision"] == "promoted") == (history[1]["new_value"] >= history[1]["current_value"])


@pytest.mark.slow
def test_a_quiet_run_whose_promotion_is_held_back_prints_nothing_and_exits_0(killed_and_resumed):
    root, config = killed_and_resumed.root, killed_and_resumed.config
    current = root / "models" / "current" / "model.json"
    better = json.loads(current.read_text())  # as if another, better model had been promoted since
    better["metrics"]["CIDEr"], better["export_signature"] = 1000.0, "another model's"
    current.write_text(json.dumps(better))

    # As the previous test left it (eval.beam_size=2): only promote runs, forced.
    args = ("--set", "eval.beam_size=2", "--force", "promote", "--quiet")
    done = subprocess.run(_cli(config, *args), cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)

    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")  # cron mails nothing: the gate did its job
    decision = json.loads((root / "promote.json").read_text())
    assert decision["decision"] == "held_back" and decision["current_value"] == 1000.0


@pytest.mark.slow
def test_an_intermediate_best_checkpoint_is_published_whole_then_exported(killed_and_resumed):
    root, config = killed_and_resumed.root, killed_and_resumed.config
    kept = sorted((root / "train" / "phase1").glob("checkpoint_0*"))[-1]
    best = json.loads((root / "eval" / "best.json").read_text())
    best["checkpoint"] = {"phase": 1, "step": int(kept.name.split("_")[1]), "kind": "intermediate", "url": str(kept)}
    (root / "eval" / "best.json").write_text(json.dumps(best))

    # As the previous test left it (eval.beam_size=2), so evaluate is up to date and --from may start after it.
    rerun = _finish(config, "--set", "eval.beam_size=2", "--from", "export", "--until", "export")

    assert _started(rerun.stderr) == ["export"]
    published = root / "best" / "final"
    published_files = ["config.yaml", "model.weights.h5", "state.json", "word_counts.txt"]
    assert sorted(p.name for p in published.iterdir()) == published_files
    assert (published / "model.weights.h5").read_bytes() == (kept / "model.weights.h5").read_bytes()
    exported = json.loads((root / "export" / "showtell_export.json").read_text())
    exported_from = (exported["phase"], exported["step"], exported["checkpoint"])
    assert exported_from == (1, best["checkpoint"]["step"], str(published))


@pytest.mark.slow
def test_more_phase2_steps_train_phase2_on_from_its_checkpoint_and_not_phase1(killed_and_resumed):
    root, config = killed_and_resumed.root, killed_and_resumed.config
    phase1_final = (root / "train" / "phase1" / "final" / "state.json").read_text()

    rerun = _finish(config, "--set", "train.phase2.steps=6", "--until", "train-phase2")

    assert _started(rerun.stderr) == ["train-phase2"]
    assert "step train-phase2: start (config train.phase2.steps 4 -> 6)" in rerun.stderr
    assert _history_steps(root, 2) == [(2, 0), (4, 0), (6, 4)]  # went on from step 4
    assert (root / "train" / "phase1" / "final" / "state.json").read_text() == phase1_final


@pytest.mark.slow
def test_another_phase2_key_retrains_phase2_afresh(killed_and_resumed):
    root, config = killed_and_resumed.root, killed_and_resumed.config

    rerun = _finish(
        config, "--set", "train.phase2.steps=6", "--set", "train.phase2.learning_rate=0.001", "--until", "train-phase2"
    )

    assert _started(rerun.stderr) == ["train-phase2"]
    assert "step train-phase2: start (config train.phase2.learning_rate 0.0005 -> 0.001)" in rerun.stderr
    assert _history_steps(root, 2) == [(2, 0), (4, 0), (6, 0)]  # afresh: the old phase 2 was removed
    assert "removing " in rerun.stderr and "to train this phase afresh" in rerun.stderr
