"""`showtell run` and `showtell status` (orchestration/run.py, orchestration/steps.py).

The first part runs the real runner over a table of small real steps that write files (each
logs its calls), to check every rule quickly: skip, re-run on a changed key or input, resume
after a failure or a kill, --until/--from/--force, the lock. The second part (`slow`) runs the
real pipeline as `python -m orchestration.cli run` subprocesses on a tiny config: SIGKILLed during
train-phase1 and resumed, refused while another run holds the lock, and re-run after config changes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestration import steps as real_steps
from orchestration.lock import LOCK_FILE, LockHeldError
from orchestration.manifest import DONE, FAILED, MANIFEST_FILE, RUNNING, Manifest, config_values
from orchestration.run import RAN, SKIPPED, StepFailedError, run_pipeline, step_status
from orchestration.run_text import format_outcomes, format_status
from orchestration.steps import STEP_NAMES, STEPS, Step
from schemas.config import build_config
from schemas.errors import ShowtellError

REPO = Path(__file__).resolve().parent.parent
CALLS = "calls.log"


# --- a table of small real steps ------------------------------------------------------------------


def _calls(root: Path) -> list[str]:
    path = root / CALLS
    return path.read_text().splitlines() if path.exists() else []


def _step(name: str, keys: tuple[str, ...], inputs: tuple[str, ...] = (), reset: bool = False, extendable=()) -> Step:
    """A step that writes `<run_root>/<name>.txt` from its config values and its inputs' text, and
    logs its call (and its reset) to calls.log; it fails while `<run_root>/fail-<name>` exists."""

    def url(config, file: str) -> str:
        return str(Path(config.run_root) / f"{file}.txt")

    def log_call(config, text: str) -> None:
        with open(Path(config.run_root) / CALLS, "a", encoding="utf-8") as handle:
            handle.write(text + "\n")

    def work(config, progress: bool) -> dict:
        if (Path(config.run_root) / f"fail-{name}").exists():
            raise ShowtellError(f"{name} was told to fail\nsecond line")
        log_call(config, name)
        parts = [json.dumps(config_values(config, keys))] + [Path(url(config, i)).read_text() for i in inputs]
        Path(url(config, name)).write_text(" | ".join(parts))
        return {"wrote": f"{name}.txt"}

    return Step(
        name,
        keys=lambda config: keys,
        inputs=lambda config: [url(config, i) for i in inputs],
        outputs=lambda config: [url(config, name)],
        work=work,
        reset=(lambda config: log_call(config, f"reset {name}")) if reset else None,
        extendable=extendable,
    )


TABLE = (
    _step("fetch", ("data.source",)),
    _step("prepare", ("data.min_word_count",), ("fetch",)),
    _step("train", ("train.phase1",), ("prepare",), reset=True, extendable=("train.phase1.steps",)),
    _step("score", ("eval.beam_size",), ("train",)),
)


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "run"


def _config(root: Path, *overrides: str):
    return build_config({"run_root": str(root)}, list(overrides))


def _run(root: Path, *overrides: str, **options):
    return run_pipeline(_config(root, *overrides), TABLE, **options)


def _results(result) -> dict[str, str]:
    return {outcome.name: outcome.result for outcome in result.outcomes}


def _manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST_FILE).read_text())


def test_a_first_run_runs_every_step_in_order_and_records_each(root):
    result = _run(root)

    assert _calls(root) == ["fetch", "prepare", "reset train", "train", "score"]  # never ran: train runs fresh
    assert _results(result) == dict.fromkeys(["fetch", "prepare", "train", "score"], RAN)
    steps = _manifest(root)["steps"]
    for name in ("fetch", "prepare", "train", "score"):
        record = steps[name]
        assert record["state"] == DONE and record["error"] is None and record["run_id"] == result.run_id
        assert record["start"] <= record["end"] and record["seconds"] >= 0 and len(record["fingerprint"]) == 64
        assert record["outputs"] == [str(root / f"{name}.txt")] and record["summary"] == {"wrote": f"{name}.txt"}
    assert steps["score"]["basis"]["config"] == {"eval.beam_size": 3}
    assert steps["score"]["basis"]["upstream"] == {"step": "train", "done": steps["train"]["end"]}
    assert not (root / LOCK_FILE).exists()


def test_a_second_run_skips_every_step_that_is_up_to_date(root, caplog):
    _run(root)
    caplog.set_level("INFO", logger="showtell.run")

    result = _run(root)

    assert _results(result) == dict.fromkeys(["fetch", "prepare", "train", "score"], SKIPPED)
    assert _calls(root) == ["fetch", "prepare", "reset train", "train", "score"]
    assert "step train: skipped (up to date)" in caplog.text
    assert "0 steps ran" in format_outcomes(result)


def test_a_changed_key_reruns_its_step_and_every_step_after_it(root, caplog):
    _run(root)
    caplog.set_level("INFO", logger="showtell.run")

    result = _run(root, "data.min_word_count=2")

    assert _results(result) == {"fetch": SKIPPED, "prepare": RAN, "train": RAN, "score": RAN}
    assert _calls(root)[5:] == ["prepare", "reset train", "train", "score"]  # train runs fresh: reset first
    assert "step prepare: start (config data.min_word_count 4 -> 2)" in caplog.text
    assert "step train: start (prepare re-ran; input prepare.txt changed)" in caplog.text
    assert "step score: done in" in caplog.text


def test_a_changed_key_of_the_last_step_reruns_only_that_step(root):
    _run(root)

    result = _run(root, "eval.beam_size=5")

    assert _results(result) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": SKIPPED, "score": RAN}


def test_more_steps_alone_let_a_step_go_on_from_its_last_attempt(root, caplog):
    _run(root)
    caplog.set_level("INFO", logger="showtell.run")

    result = _run(root, "train.phase1.steps=2000000")

    assert _results(result) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": RAN, "score": RAN}
    assert _calls(root)[5:] == ["train", "score"]  # no reset: it goes on
    assert "step train: start (config train.phase1.steps 1000000 -> 2000000)" in caplog.text


@pytest.mark.parametrize("overrides", [["train.phase1.steps=10"], ["train.phase1.steps=2000000", "train.phase1.batch_size=4"]])
def test_fewer_steps_or_other_changes_with_them_start_the_step_afresh(root, overrides):
    _run(root)

    _run(root, *overrides)

    assert _calls(root)[5:] == ["reset train", "train", "score"]


def test_an_input_changed_outside_the_run_reruns_the_steps_from_the_one_reading_it(root, caplog):
    _run(root)
    (root / "prepare.txt").write_text("edited by hand")
    caplog.set_level("INFO", logger="showtell.run")

    result = _run(root)

    assert _results(result) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": RAN, "score": RAN}
    assert "step train: start (input prepare.txt changed)" in caplog.text


def test_missing_outputs_are_checked_and_their_step_resumed_not_reset(root, caplog):
    _run(root)
    (root / "train.txt").unlink()
    caplog.set_level("INFO", logger="showtell.run")

    result = _run(root)

    assert _results(result) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": RAN, "score": RAN}
    assert _calls(root)[5:] == ["train", "score"]  # no "reset train": same inputs, same settings
    assert "step train: start (outputs missing: train.txt)" in caplog.text


def test_a_failed_step_is_recorded_and_the_next_run_continues_from_it(root):
    root.mkdir()
    (root / "fail-prepare").touch()

    with pytest.raises(StepFailedError, match=r"^step prepare: prepare was told to fail"):
        _run(root)

    steps = _manifest(root)["steps"]
    assert steps["fetch"]["state"] == DONE
    assert steps["prepare"]["state"] == FAILED and steps["prepare"]["error"] == "prepare was told to fail"
    assert steps["prepare"]["end"] and steps["prepare"]["seconds"] is not None
    assert "train" not in steps and not (root / LOCK_FILE).exists()

    (root / "fail-prepare").unlink()
    result = _run(root)

    assert _results(result) == {"fetch": SKIPPED, "prepare": RAN, "train": RAN, "score": RAN}
    assert result.outcomes[1].reason == "retrying: it failed (prepare was told to fail)"
    assert _calls(root) == ["fetch", "prepare", "reset train", "train", "score"]


def test_a_step_left_running_by_a_killed_run_is_resumed_not_reset(root):
    _run(root)
    manifest = Manifest.load(str(root))
    manifest.set_step("train", {**manifest.step("train"), "state": RUNNING, "end": None, "run_id": "killed"})

    result = _run(root)

    assert _results(result) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": RAN, "score": RAN}
    assert result.outcomes[2].reason.startswith("resuming: run killed started it at ")
    assert _calls(root)[5:] == ["train", "score"]


def test_until_stops_after_the_step_and_the_next_run_goes_on_from_there(root):
    result = _run(root, until="prepare")

    assert _results(result) == {"fetch": RAN, "prepare": RAN}
    assert set(_manifest(root)["steps"]) == {"fetch", "prepare"}

    assert _results(_run(root)) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": RAN, "score": RAN}


def test_force_reruns_the_step_and_every_step_after_it_fresh(root):
    _run(root)

    result = _run(root, force="train")

    assert _results(result) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": RAN, "score": RAN}
    assert result.outcomes[2].reason == "forced by --force train"
    assert _calls(root)[5:] == ["reset train", "train", "score"]


def test_force_brings_the_steps_before_it_up_to_date_first(root):
    _run(root, force="score")

    assert _calls(root) == ["fetch", "prepare", "reset train", "train", "score"]


def test_from_requires_the_steps_before_it_to_be_done_and_up_to_date(root):
    with pytest.raises(ShowtellError, match=r"--from train: step fetch before it is not done and up to date \(not run before\)"):
        _run(root, start="train")
    assert _calls(root) == []

    _run(root)
    with pytest.raises(ShowtellError, match=r"step prepare before it .*config data.min_word_count 4 -> 3"):
        _run(root, "data.min_word_count=3", start="train")

    result = _run(root, start="train")
    assert _results(result) == {"fetch": SKIPPED, "prepare": SKIPPED, "train": RAN, "score": RAN}


@pytest.mark.parametrize("option", ["until", "start", "force"])
def test_an_unknown_step_name_is_an_error_listing_the_steps(root, option):
    flag = {"until": "--until", "start": "--from", "force": "--force"}[option]

    with pytest.raises(ShowtellError, match=rf"^{flag} 'trian': unknown step; the steps are fetch, prepare, train, score$"):
        _run(root, **{option: "trian"})


def test_from_or_force_after_until_is_an_error(root):
    with pytest.raises(ShowtellError, match="--force score comes after --until prepare"):
        _run(root, until="prepare", force="score")
    with pytest.raises(ShowtellError, match="give one of them"):
        _run(root, start="train", force="score")


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
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(seconds)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def test_a_run_fails_at_once_naming_the_run_that_holds_the_lock(root):
    process, holder = _hold_lock(root, 30)
    try:
        with pytest.raises(LockHeldError) as caught:
            _run(root)
    finally:
        process.kill()
        process.wait()
    message = str(caught.value)
    assert f"{root} is locked by run {holder} (showtell run, pid {process.pid} on " in message
    assert "wait for it with --wait SECONDS" in message and "run.lock_stale_seconds" in message
    assert _calls(root) == [] and not (root / MANIFEST_FILE).exists()


def test_a_run_with_wait_proceeds_once_the_other_run_is_done(root):
    process, _ = _hold_lock(root, 2)

    result = _run(root, wait=60)

    assert process.wait(10) == 0
    assert _results(result) == dict.fromkeys(["fetch", "prepare", "train", "score"], RAN)


def test_a_run_that_lost_its_lock_stops_without_writing_the_manifest_again(root):
    from orchestration.lock import LockLostError

    def taken_over(config, progress):
        (Path(config.run_root) / LOCK_FILE).write_text(
            json.dumps(
                {"run_id": "thief", "host": "elsewhere", "boot_id": "", "pid": 1, "started": "t", "heartbeat": time.time(), "command": "x"}
            )
        )
        time.sleep(0.5)  # a few heartbeats: the lock is found lost
        (Path(config.run_root) / "steal.txt").write_text("done")

    table = (TABLE[0], Step("steal", lambda c: (), lambda c: [], lambda c: [str(root / "steal.txt")], taken_over))

    with pytest.raises(LockLostError, match="lost the lock on .* to run thief"):
        run_pipeline(_config(root, "run.lock_stale_seconds=0.5"), table)

    assert _manifest(root)["steps"]["steal"]["state"] == RUNNING  # as it was when the lock was lost
    assert json.loads((root / LOCK_FILE).read_text())["run_id"] == "thief"


def test_status_says_a_step_of_the_live_run_is_running_now(root):
    from orchestration.lock import FolderLock

    _run(root)
    with FolderLock(str(root), stale_after=60) as lock:
        manifest = Manifest.load(str(root))
        manifest.set_step("train", {**manifest.step("train"), "state": RUNNING, "run_id": lock.run_id})

        rows = {row.name: row for row in step_status(_config(root), TABLE)}
        text = format_status(_config(root), list(rows.values()))

    assert rows["train"].state == RUNNING and rows["train"].next_run == f"running now (run {lock.run_id})"
    assert f"lock: held by run {lock.run_id}" in text


def test_status_shows_each_steps_state_timing_staleness_and_outputs(root):
    _run(root, until="train")
    (root / "fetch.txt").unlink()
    config = _config(root, "data.min_word_count=2")

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
    _run(root)
    manifest = Manifest.load(str(root))
    manifest.set_step("train", {**manifest.step("train"), "state": RUNNING, "run_id": "gone"})

    rows = {row.name: row for row in step_status(_config(root), TABLE)}

    assert rows["train"].state == "interrupted" and rows["train"].next_run.startswith("run: resuming")
    assert rows["score"].next_run == "run: train is not done"


def test_status_shows_a_failed_steps_error(root):
    root.mkdir()
    (root / "fail-prepare").touch()
    with pytest.raises(StepFailedError):
        _run(root)

    rows = step_status(_config(root), TABLE)

    assert rows[1].state == FAILED and rows[1].next_run == "run: retrying: it failed (prepare was told to fail)"
    assert "prepare failed: prepare was told to fail" in format_status(_config(root), rows).splitlines()


def test_status_says_which_steps_follow_one_that_will_rerun(root):
    _run(root)

    rows = {row.name: row for row in step_status(_config(root, "data.min_word_count=2"), TABLE)}

    assert rows["fetch"].next_run == "skip"
    assert rows["train"].next_run == rows["score"].next_run == "run: after prepare re-runs"


# --- the real step table ------------------------------------------------------------------------


def _affected(*overrides: str) -> set[str]:
    """The real steps whose config values differ under `overrides` (the steps after them re-run too)."""
    base, changed = _config(Path("/runs/x")), _config(Path("/runs/x"), *overrides)
    return {
        step.name
        for step in STEPS
        if config_values(base, step.keys(base)) != config_values(changed, step.keys(changed))
    }


@pytest.mark.parametrize(
    "overrides, steps",
    [
        (["eval.beam_size=2"], {"evaluate"}),
        (["train.phase2.steps=7"], {"train-phase2"}),
        (["train.phase1.learning_rate=1.0"], {"train-phase1"}),
        (["model.num_lstm_units=64"], {"train-phase1", "train-phase2"}),
        (["ray.num_workers=4"], {"train-phase1", "train-phase2"}),
        (["data.min_word_count=2"], {"preprocess"}),
        (["data.sample.train_images=5"], {"download"}),
        (["promote.tolerance=0.1"], {"promote"}),
        # where and how things run, not what they produce:
        (["beam.runner=DataflowRunner", "beam.direct_num_workers=4", "ray.address=auto", "ray.max_failures=3"], set()),
        (["data.download.retries=9", "data.checksums={zips/val2014.zip: 'md5:00'}", "eval.batch_size=8"], set()),
        (["train.xla=true", "ray.use_gpu=true", "run.lock_stale_seconds=5"], set()),
    ],
)
def test_each_real_step_reads_the_keys_that_decide_what_it_produces(overrides, steps):
    assert _affected(*overrides) == steps


def test_a_real_source_makes_the_sample_settings_irrelevant():
    base = _config(Path("/runs/x"), "data.source=gs://b/mscoco")
    changed = _config(Path("/runs/x"), "data.source=gs://b/mscoco", "data.sample.train_images=5")
    download = STEPS[0]
    assert config_values(base, download.keys(base)) == config_values(changed, download.keys(changed))


def test_every_real_step_is_in_order_and_names_its_keys_inputs_and_outputs():
    config = _config(Path("/runs/x"))
    assert STEP_NAMES == ("download", "preprocess", "train-phase1", "train-phase2", "evaluate", "export", "promote")
    for step in STEPS:
        config_values(config, step.keys(config))  # every key exists in the schema
        assert step.outputs(config) and all(url.startswith("/runs/x") for url in step.outputs(config))
    assert STEPS[5].outputs(config) == ["/runs/x/export/showtell_export.json", "/runs/x/export/saved_model.pb"]
    assert real_steps.models_root(config) == "/runs/x/models"
    assert real_steps.models_root(_config(Path("/runs/x"), "promote.models_root=gs://b/models")) == "gs://b/models"


def _evaluated_and_exported(root: Path, cider: float) -> None:
    """eval/best.json, eval/report.json and export/ as the evaluate and export steps leave them."""
    checkpoint = {"phase": 2, "step": 4, "kind": "final", "url": str(root / "train/phase2/final")}
    (root / "eval").mkdir(parents=True, exist_ok=True)
    (root / "eval" / "best.json").write_text(json.dumps({"select_by": "CIDEr", "value": cider, "checkpoint": checkpoint}))
    report = {"eval": {"split": "test"}, "checkpoints": [{**checkpoint, "metrics": {"CIDEr": cider, "Bleu_4": 0.1}}]}
    (root / "eval" / "report.json").write_text(json.dumps(report))
    (root / "export").mkdir(exist_ok=True)
    (root / "export" / "saved_model.pb").write_text(f"model scoring {cider}")
    (root / "export" / "showtell_export.json").write_text("{}")


def test_the_promote_step_offers_the_export_with_its_best_metrics_and_records_the_decision(root):
    promote_step = STEPS[STEP_NAMES.index("promote")]
    _evaluated_and_exported(root, 0.5)
    config = _config(root)

    summary = promote_step.work(config, False)

    assert summary["decision"] == "promoted" and (summary["new_value"], summary["current_value"]) == (0.5, None)
    assert summary["model"] == str(root / "models" / "current")
    assert json.loads((root / "promote.json").read_text())["run_root"] == str(root)
    assert (root / "models" / "current" / "saved_model.pb").read_text() == "model scoring 0.5"

    _evaluated_and_exported(root, 0.4)
    assert promote_step.work(config, False)["decision"] == "held_back"


def test_the_promote_step_refuses_a_models_root_that_is_the_run_root(root):
    _evaluated_and_exported(root, 0.5)

    with pytest.raises(ShowtellError, match="is the run_root itself"):
        STEPS[-1].work(_config(root, f"promote.models_root={root}"), False)


# --- the CLI --------------------------------------------------------------------------------------


def _config_file(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def test_cli_run_with_an_unknown_step_exits_2_with_one_line_listing_the_steps(tmp_path, capsys):
    from orchestration.cli import main

    config = _config_file(tmp_path, {"run_root": str(tmp_path / "run")})

    assert main(["run", "--config", str(config), "--until", "train"]) == 2

    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"showtell run: error: --until 'train': unknown step; the steps are {', '.join(STEP_NAMES)}"]


def test_cli_run_with_a_bad_date_exits_2(tmp_path, capsys):
    from orchestration.cli import main

    config = _config_file(tmp_path, {"run_root": str(tmp_path / "runs/{date}")})

    assert main(["run", "--config", str(config), "--date", "31/01/2025"]) == 2
    assert "--date '31/01/2025': expected YYYY-MM-DD" in capsys.readouterr().err


def test_cli_status_on_a_fresh_dated_run_root_lists_every_step(tmp_path, capsys):
    from orchestration.cli import main

    config = _config_file(tmp_path, {"run_root": str(tmp_path / "runs/{date}")})

    assert main(["status", "--config", str(config), "--date", "2025-01-31"]) == 0

    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"run_root: {tmp_path / 'runs/2025-01-31'}"
    for name in STEP_NAMES:
        assert any(line.startswith(name) and "run: not run before" in line for line in out.splitlines()), name
    assert not (tmp_path / "runs").exists()  # status writes nothing


# --- the real pipeline, as subprocesses (slow) -----------------------------------------------------

TINY = {
    "data": {
        "sample": {"train_images": 40, "val_images": 20, "image_size": 64},
        "shards": {"train": 2, "val": 1, "test": 1},
    },
    "beam": {"direct_running_mode": "in_memory", "direct_num_workers": 1},
    "model": {"encoder": "mobilenet_v3_small", "image_size": 64, "encoder_weights": "none", "embedding_size": 32, "num_lstm_units": 32},
    "train": {
        "shuffle_buffer": 64,
        "phase1": {"steps": 60, "batch_size": 8, "checkpoint_every": 10, "checkpoints_kept": 2, "train_encoder": True},
        "phase2": {"steps": 4, "batch_size": 8, "checkpoint_every": 2, "checkpoints_kept": 2},
    },
    "ray": {"num_workers": 1},
    "eval": {"checkpoints": "final", "max_images": 6, "batch_size": 6, "report_images": 2},
}


def _cli(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "orchestration.cli", "run", "--config", str(config), *args]


def _env() -> dict[str, str]:
    # Ray Train's controller polls every 2 s by default; these runs are seconds long.
    return {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _finish(config: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    process = subprocess.run(_cli(config, *args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert process.returncode == 0, process.stderr[-4000:]
    return process


def _wait_for(condition, timeout: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (rc {process.returncode}) before {what}: {log.read_text()[-3000:]}"
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
    config = _config_file(tmp_path, {"run_root": str(root), **TINY})
    log = tmp_path / "killed-run.log"
    with open(log, "w") as output:
        first = subprocess.Popen(_cli(config), cwd=REPO, env=_env(), stdout=output, stderr=output, start_new_session=True)
    try:
        checkpoints = root / "train" / "phase1"
        _wait_for(lambda: _step_state(root, "train-phase1") == RUNNING, 300, "train-phase1 to start", first, log)
        refused = subprocess.run(_cli(config), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)

        def has_checkpoint() -> bool:
            return (checkpoints / "history.jsonl").exists() and any(checkpoints.glob("checkpoint_0*"))

        _wait_for(has_checkpoint, 300, "a phase 1 checkpoint", first, log)
        history_at_kill = _history_steps(root, 1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert _step_state(root, "train-phase1") == RUNNING and (root / LOCK_FILE).exists()
    manifest_at_kill = json.loads((root / MANIFEST_FILE).read_text())
    resumed = _finish(config)
    return KilledAndResumed(root, config, refused, history_at_kill, manifest_at_kill, resumed)


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_holds_the_lock(killed_and_resumed):
    refused = killed_and_resumed.refused
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("showtell run: error:")]
    assert len(errors) == 1 and "is locked by run" in errors[0] and "(showtell run, pid " in errors[0], refused.stderr[-2000:]


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
    assert out.strip().splitlines()[-1] == f"promoted model: {root / 'models' / 'current'} (the first model)"
    assert (root / "models" / "current" / "saved_model.pb").exists()
    decision = json.loads((root / "promote.json").read_text())
    assert decision["decision"] == "promoted" and decision["previous_model"] is None
    best = json.loads((root / "eval" / "best.json").read_text())
    assert json.loads((root / "export" / "showtell_export.json").read_text())["step"] == best["checkpoint"]["step"]


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
    assert sorted(p.name for p in published.iterdir()) == ["config.yaml", "model.weights.h5", "state.json", "word_counts.txt"]
    assert (published / "model.weights.h5").read_bytes() == (kept / "model.weights.h5").read_bytes()
    exported = json.loads((root / "export" / "showtell_export.json").read_text())
    assert (exported["phase"], exported["step"], exported["checkpoint"]) == (1, best["checkpoint"]["step"], str(published))


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

    rerun = _finish(config, "--set", "train.phase2.steps=6", "--set", "train.phase2.learning_rate=0.001", "--until", "train-phase2")

    assert _started(rerun.stderr) == ["train-phase2"]
    assert "step train-phase2: start (config train.phase2.learning_rate 0.0005 -> 0.001)" in rerun.stderr
    assert _history_steps(root, 2) == [(2, 0), (4, 0), (6, 0)]  # afresh: the old phase 2 was removed
    assert "removing " in rerun.stderr and "to train this phase afresh" in rerun.stderr
