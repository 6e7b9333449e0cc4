"""`showtell train` end to end: real Ray Train (local cluster, 2 CPU workers), real TensorFlow
MultiWorkerMirroredStrategy, a tiny MobileNet captioner on generated sample records.

One sample set is preprocessed for the module. The first two tests start their own Ray cluster
through the CLI (as `ray.address: null` does); the rest share one cluster started here, which the
launcher uses as it finds it, and one run root that goes through a worker kill, a resume and both
phases (`two_phases`), to keep the file near 3-4 minutes on a 2-core machine.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import pytest
import yaml

from orchestration.cli import main as cli_main
from schemas import progress
from schemas.config import load_config
from schemas.vocabulary import parse_word_counts
from trainer import checkpoints as ckpt

pytestmark = pytest.mark.slow

MODEL = {
    "encoder": "mobilenet_v3_small",
    "image_size": 64,
    "encoder_weights": "none",
    "embedding_size": 32,
    "num_lstm_units": 32,
}


@pytest.fixture(autouse=True)
def _fast_ray_polls(monkeypatch):
    # Ray Train's controller polls its workers every 2 s; every run here is a few seconds long.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return preprocess_sample(tmp_path_factory.mktemp("prep"))


def preprocess_sample(root: Path, train_images: int = 40, val_images: int = 20) -> Path:
    """40 + 20 generated sample images preprocessed into 4 / 1 / 1 shards; returns `root/data`."""
    from pipelines.preprocess import run_preprocess
    from pipelines.sample_data import generate_sample_data
    from schemas.config import build_config

    generate_sample_data(str(root / "raw"), train_images=train_images, val_images=val_images, seed=0, image_size=64)
    config = build_config(
        {
            "run_root": str(root),
            "data": {"shards": {"train": 4, "val": 1, "test": 1}},
            "beam": {"direct_running_mode": "in_memory", "direct_num_workers": 1},
        }
    )
    run_preprocess(config)
    return root / "data"


def _run_root(tmp_path: Path, data_dir: Path) -> Path:
    run_root = tmp_path / "run"
    shutil.copytree(data_dir, run_root / "data")
    return run_root


def _config_file(tmp_path: Path, run_root: Path, phase1: dict, phase2: dict | None = None, **ray) -> Path:
    tree = {
        "run_root": str(run_root),
        "model": MODEL,
        "train": {
            "shuffle_buffer": 64,
            "phase1": {"batch_size": 8, "checkpoints_kept": 2, **phase1},
            "phase2": {"batch_size": 8, "checkpoints_kept": 2, **(phase2 or {"steps": 2})},
        },
        "ray": {"num_workers": 2, **ray},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def _train(config: Path, phase: int, *overrides: str) -> int:
    args = ["train", "--config", str(config), "--phase", str(phase)]
    for override in overrides:
        args += ["--set", override]
    return cli_main(args)


def _history(run_root: Path, phase: int) -> list[dict]:
    lines = (run_root / "train" / f"phase{phase}" / "history.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _final(run_root: Path, phase: int) -> Path:
    return run_root / "train" / f"phase{phase}" / "final"


def _summary(out: str) -> dict:
    """The CLI's JSON summary out of stdout (Ray may have forwarded worker lines around it)."""
    lines = out.splitlines()
    start = lines.index("{")
    return json.loads("\n".join(lines[start : lines.index("}", start) + 1]))


def _error_line(captured) -> str:
    lines = [line for line in captured.err.splitlines() if line.startswith("showtell train: error:")]
    assert len(lines) == 1, captured.err[-2000:]
    return lines[0]


# --- no Ray cluster needed, or one started by the CLI -------------------------------------------


def test_phase2_without_phase1_is_a_clear_error(tmp_path, data_dir, capsys):
    run_root = _run_root(tmp_path, data_dir)
    config = _config_file(tmp_path, run_root, {"steps": 2})

    assert _train(config, 2) != 0

    line = _error_line(capsys.readouterr())
    assert "phase 1" in line and "run `showtell train --phase 1` first" in line
    assert not (run_root / "train" / "phase2").exists()


def test_a_nan_loss_stops_the_phase_naming_the_step_and_publishes_nothing(tmp_path, data_dir, capsys):
    import ray

    run_root = _run_root(tmp_path, data_dir)
    # SGD at 1e38 overflows the weights on the first update, so step 2's loss is not finite.
    config = _config_file(tmp_path, run_root, {"steps": 6, "checkpoint_every": 1, "learning_rate": 1.0e38})

    assert _train(config, 1) != 0

    line = _error_line(capsys.readouterr())
    assert "phase 1: loss is" in line and "at step 2" in line
    phase_dir = run_root / "train" / "phase1"
    assert not _final(run_root, 1).exists()
    # Step 1 was finite and reported; nothing of step 2 (NaN weights) reached Ray's storage.
    assert sorted(p.name for p in phase_dir.glob("checkpoint_0*")) == ["checkpoint_000000001"]
    assert [row["step"] for row in _history(run_root, 1)] == [1]
    assert not ray.is_initialized()  # the CLI's own local cluster was shut down


# --- killing a training worker from outside, as an operator or the OOM killer would ---------------

RAY_TRAIN_WORKER_TITLE = b"ray::RayTrainWorker"  # the process title Ray gives each Ray Train worker
CHECKPOINT_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train v2's record of its commits
WAIT_LIMIT_S = 600.0  # the longest the killer waits for the commit (TensorFlow's start is slow here)


class WorkerKiller:
    """While its `with` block trains a phase, SIGKILLs rank 1 once, as soon as Ray Train has committed
    `checkpoint` and before it commits the next one: the phase must resume from `checkpoint`. A
    subclass kills something else (a node: tests/test_ray_cluster.py) by overriding `_kill`.

    Ray Train v2 commits a report when its controller polls the workers (every 2 s) and rewrites
    `checkpoint_manager_snapshot.json` then. A poll takes one report per worker (a worker's result
    queue holds one), so the next checkpoint's commit is at least one poll later, however fast the
    steps in between are, and the kill lands within it. On leaving the block it fails, saying why,
    if it killed nothing.
    """

    def __init__(self, phase_dir: Path, checkpoint: str):
        self.phase_dir, self.checkpoint = phase_dir, checkpoint
        self.killed_pid: Optional[int] = None
        self._error = "the killer is still waiting"
        self._training_done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-killer", daemon=True)

    def __enter__(self) -> "WorkerKiller":
        self._thread.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._training_done.set()
        self._thread.join(timeout=30)
        if exc_type is None:
            assert self.killed_pid is not None, f"no training worker was killed: {self._error}"

    def _run(self) -> None:
        try:
            self._wait_for_commit()
            self.killed_pid = self._kill()
        except Exception as error:  # reported by __exit__, on the test's thread
            self._error = str(error)

    def _wait_for_commit(self) -> None:
        deadline = time.monotonic() + WAIT_LIMIT_S
        while (latest := _latest_committed(self.phase_dir)) != self.checkpoint:
            if latest is not None and latest > self.checkpoint:
                raise RuntimeError(f"Ray had committed {latest} before the killer saw {self.checkpoint}")
            if self._training_done.is_set():
                raise RuntimeError(f"the phase ended before Ray committed {self.checkpoint}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray did not commit {self.checkpoint} within {WAIT_LIMIT_S:.0f} s")
            time.sleep(0.02)

    def _kill(self) -> int:
        """SIGKILLs rank 1 and returns its pid."""
        workers = _training_workers()
        others = workers - _tensorboard_writer_pids(self.phase_dir)  # rank 0 writes TensorBoard's events
        if len(others) != 1:
            raise RuntimeError(f"expected one training worker besides rank 0, found {sorted(others)} of {workers}")
        pid = others.pop()
        os.kill(pid, signal.SIGKILL)
        return pid


def _latest_committed(phase_dir: Path) -> Optional[str]:
    """The folder name of the latest checkpoint Ray Train has committed for the phase, if any."""
    try:
        snapshot = json.loads((phase_dir / CHECKPOINT_SNAPSHOT_FILE).read_text())
    except (OSError, ValueError):  # not written yet, or being rewritten
        return None
    return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")


def _training_workers() -> set[int]:
    """Pids of this test's Ray Train workers: processes titled `ray::RayTrainWorker` that descend from
    this process (ray.init started the raylet as its child, and the raylet starts the workers).
    Other Ray clusters on the machine are not this test's to kill."""
    parents, titles = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path("/proc", entry, "stat").read_text()
            titles[int(entry)] = Path("/proc", entry, "cmdline").read_bytes()
        except OSError:  # the process exited meanwhile
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])  # `pid (name) state ppid ...`

    def descends_from_here(pid: int) -> bool:
        while pid in parents and pid != os.getpid():
            pid = parents[pid]
        return pid == os.getpid()

    workers = {pid for pid, title in titles.items() if title.startswith(RAY_TRAIN_WORKER_TITLE)}
    return set(filter(descends_from_here, workers))


def _tensorboard_writer_pids(phase_dir: Path) -> set[int]:
    """Pids of the processes that wrote the phase's TensorBoard events (rank 0 of each attempt):
    TensorFlow names each file `events.out.tfevents.<time>.<host>.<pid>.<n>.v2`."""
    return {int(path.name.split(".")[-3]) for path in (phase_dir / "tensorboard").glob("events.out.tfevents.*")}


# --- on a shared local cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def display() -> io.StringIO:
    """What `two_phases`' progress displays printed for parts 2 and 3: plain lines, as off a terminal."""
    return io.StringIO()


@pytest.fixture(scope="module")
def two_phases(ray_cluster, data_dir, display, tmp_path_factory):
    """The whole story on one run root, each part asserted by a test below:

    1. phase 1 to 6 steps, with rank 1 SIGKILLed from outside (`WorkerKiller`) once Ray has
       committed the first checkpoint (step 3), and `ray.max_failures: 1`: Ray replaces the worker
       group, training resumes from step 3;
    2. phase 1 re-run with `steps: 9`: a half-finished phase resumes from step 6;
    3. phase 2 (4 steps) from phase 1's final checkpoint.

    Parts 2 and 3 run through `run_phase` with the progress display on `display`.
    """
    from trainer.launcher import run_phase

    tmp_path = tmp_path_factory.mktemp("two_phases")
    run_root = _run_root(tmp_path, data_dir)
    config = _config_file(
        tmp_path, run_root, {"steps": 9, "checkpoint_every": 3}, {"steps": 4, "checkpoint_every": 2}, max_failures=1
    )
    with WorkerKiller(run_root / "train" / "phase1", "checkpoint_000000003") as killer:
        assert _train(config, 1, "train.phase1.steps=6") == 0
    first_final = json.loads((_final(run_root, 1) / "state.json").read_text())
    progress.configure(display, bar=False, every=60.0)
    try:
        assert run_phase(load_config(str(config)), 1)["ran"]
        assert run_phase(load_config(str(config)), 2)["ran"]
    finally:
        progress.configure(None, bar=False)
    return run_root, config, first_final, killer.killed_pid


def test_phase1_publishes_a_complete_final_checkpoint(two_phases, data_dir):
    run_root = two_phases[0]
    final = _final(run_root, 1)
    assert sorted(p.name for p in final.iterdir()) == [
        "config.yaml", "model.weights.h5", "state.json", "word_counts.txt"
    ]
    assert (final / "word_counts.txt").read_bytes() == (data_dir / "word_counts.txt").read_bytes()
    config = yaml.safe_load((final / "config.yaml").read_text())
    assert config["model"] == {**config["model"], **MODEL} and config["train"]["phase1"]["steps"] == 9
    state = json.loads((final / "state.json").read_text())
    assert state["phase"] == 1 and state["step"] == 9 and len(state["fingerprint"]) == 64
    assert state["vocabulary_id"] == parse_word_counts((data_dir / "word_counts.txt").read_text()).id
    assert not list(final.parent.glob("final.*"))  # no staging or old copies left behind
    # Ray keeps `checkpoints_kept` of them.
    kept = sorted(p.name for p in final.parent.glob("checkpoint_0*"))
    assert kept == ["checkpoint_000000006", "checkpoint_000000009"]


def test_history_has_each_report_once_in_order_across_resumes_and_loss_falls(two_phases):
    run_root, _, first_final, _ = two_phases
    history = _history(run_root, 1)
    assert [row["step"] for row in history] == [3, 6, 9]
    assert [row["resumed_from_step"] for row in history] == [0, 3, 6]  # after the kill; the re-run
    assert first_final["step"] == 6
    for row in history:
        assert set(ckpt.HISTORY_COLUMNS) <= set(row)
        assert row["examples_per_sec"] > 0 and row["learning_rate"] == 2.0
    assert history[-1]["loss"] < history[0]["loss"]
    assert [row["step"] for row in _history(run_root, 2)] == [2, 4]
    assert _history(run_root, 2)[0]["learning_rate"] == 0.0005


def test_tensorboard_has_loss_perplexity_and_learning_rate(two_phases):
    import tensorflow as tf

    run_root = two_phases[0]
    for phase in (1, 2):
        files = list((run_root / "train" / f"phase{phase}" / "tensorboard").glob("events.out.tfevents.*"))
        assert files, phase
        tags = {
            value.tag
            for path in files
            for event in tf.compat.v1.train.summary_iterator(str(path))
            for value in event.summary.value
        }
        assert {"loss", "perplexity", "learning_rate"} <= tags


def test_phase2_starts_from_phase1s_final_weights_and_trains_the_encoder(two_phases):
    from schemas.config import Model
    from trainer.model import build_model

    run_root = two_phases[0]
    phase1 = json.loads((_final(run_root, 1) / "state.json").read_text())
    phase2 = json.loads((_final(run_root, 2) / "state.json").read_text())
    assert phase2["step"] == 4
    # Phase 2's workers fingerprinted their weights right after restoring: phase 1's final ones.
    model = build_model(Model(**MODEL), phase1["vocab_size"])
    model.load_weights(str(_final(run_root, 1) / "model.weights.h5"))
    assert phase2["init_fingerprint"] == ckpt.weights_fingerprint(model) == phase1["fingerprint"]
    encoder_before = [w.numpy().copy() for w in model.encoder.trainable_weights]
    model.load_weights(str(_final(run_root, 2) / "model.weights.h5"))
    assert any((a != w.numpy()).any() for a, w in zip(encoder_before, model.encoder.trainable_weights))


def test_rerunning_a_finished_phase_is_a_fast_no_op_that_keeps_final(two_phases, capsys):
    run_root, config = two_phases[:2]
    final = _final(run_root, 1)
    before = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    capsys.readouterr()

    started = time.time()
    assert _train(config, 1) == 0

    assert time.time() - started < 10
    summary = _summary(capsys.readouterr().out)
    assert summary["ran"] is False and summary["step"] == 9
    assert {p.name: p.stat().st_mtime_ns for p in final.iterdir()} == before


def test_a_worker_killed_after_the_first_checkpoint_is_replaced_and_the_phase_resumes(two_phases):
    run_root, _, first_final, killed_pid = two_phases
    assert killed_pid not in _training_workers()  # the fixture SIGKILLed rank 1, once; it is gone
    # The run went on to its 6 steps from the step-3 checkpoint: the first history rows say so.
    assert first_final["step"] == 6
    assert [(row["step"], row["resumed_from_step"]) for row in _history(run_root, 1)[:2]] == [(3, 0), (6, 3)]


def test_a_worker_killed_with_no_failures_allowed_fails_the_phase_with_exit_1_and_one_line_naming_the_log(
    two_phases, data_dir, tmp_path, capsys
):
    run_root = _run_root(tmp_path, data_dir)
    config = _config_file(tmp_path, run_root, {"steps": 6, "checkpoint_every": 3}, max_failures=0)
    capsys.readouterr()

    with WorkerKiller(run_root / "train" / "phase1", "checkpoint_000000003"):
        code = _train(config, 1)

    log = run_root / "logs" / "train-phase1.log"
    line = _error_line(capsys.readouterr())
    assert code == 1  # a dead worker is not the user's mistake (that is 2)
    assert re.fullmatch(
        rf"showtell train: error: step train-phase1 failed after [\d.]+ s: TrainingFailed: phase 1: "
        rf"training failed \(.+\) \(log: {re.escape(str(log))}\)",
        line,
    ), line
    assert "Traceback (most recent call last)" in log.read_text() and not _final(run_root, 1).exists()


def test_rank_0s_steps_loss_and_examples_per_sec_reach_the_drivers_display(two_phases, display):
    lines = display.getvalue().splitlines()  # every=60: each phase's display closed with one line
    assert len(lines) == 2, lines
    phase1, phase2 = lines
    assert " train phase 1: 9/9 steps (100%), " in phase1  # resumed at step 6: the rate counts from there
    assert " train phase 2: 4/4 steps (100%), " in phase2
    for line in lines:
        fields = dict(field.rsplit(" ", 1) for field in line.split("; ", 1)[1].split(", "))
        assert set(fields) == {"loss", "examples/s"} and float(fields["examples/s"]) > 0, line
        assert 0 < float(fields["loss"]) < 10, line


def test_progress_line_formats_a_report():
    from trainer.launcher import ProgressLine, format_progress

    row = {"step": 20, "loss": 3.21234, "perplexity": 24.83, "learning_rate": 2.0, "examples_per_sec": 51.26}
    assert format_progress(1, 100, row) == (
        "phase 1 step 20/100  loss 3.2123  perplexity 24.83  lr 2  51.3 examples/s"
    )
    ProgressLine(1, 100).after_report(None, [row, row], None)  # prints; must not raise


# --- warm starts and the vocabulary contract ---------------------------------------------------


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    """48 + 24 sample images: the words of `data_dir`, counted in another order (another vocabulary)."""
    return preprocess_sample(tmp_path_factory.mktemp("prep_other"), train_images=48, val_images=24)


def test_phase2_refuses_a_phase1_final_trained_on_another_vocabulary(two_phases, other_data, tmp_path, capsys):
    run_root = _run_root(tmp_path, other_data)
    shutil.copytree(_final(two_phases[0], 1), _final(run_root, 1))
    config = _config_file(tmp_path, run_root, {"steps": 9})
    capsys.readouterr()

    assert _train(config, 2) == 2

    line = _error_line(capsys.readouterr())
    theirs = json.loads((_final(run_root, 1) / "state.json").read_text())["vocabulary_id"]
    ours = parse_word_counts((other_data / "word_counts.txt").read_text()).id
    assert f"whose vocabulary {theirs} is not the data's ({ours}" in line and theirs != ours
    assert not (run_root / "train" / "phase2").exists()


def test_a_warm_start_remaps_a_final_to_the_data_then_phase2_stops_at_max_minutes_and_publishes(
    two_phases, other_data, tmp_path
):
    from trainer.launcher import run_phase

    run_root = _run_root(tmp_path, other_data)
    init = _final(two_phases[0], 2)
    config = load_config(
        str(_config_file(tmp_path, run_root, {"steps": 9})),
        [f"train.init_from={init}", "train.warm_start_steps=40", "train.max_minutes=0.001"],
    )

    prepared = run_phase(config, 1)
    phase2 = run_phase(config, 2)

    warm = json.loads((run_root / "train" / "warm_start" / "state.json").read_text())
    words = len((other_data / "word_counts.txt").read_text().splitlines())
    assert prepared["warm_start"]["remap"] == {"kept": words, "added": 0, "dropped": 0}
    assert prepared["warm_start"]["init_vocabulary_id"] != warm["vocabulary_id"]
    assert not (run_root / "train" / "phase1").exists()  # phase 1 trained nothing
    state = json.loads((_final(run_root, 2) / "state.json").read_text())
    assert state["init_fingerprint"] == warm["fingerprint"]  # phase 2 started from the remapped weights
    # Past the 0.06 s limit at once: every worker stopped after step 1, which was published.
    assert (phase2["step"], phase2["stopped"], state["stopped"]) == (1, "max_minutes", "max_minutes")
    assert run_phase(config, 1)["ran"] is False  # the warm start is kept for the same model and data
