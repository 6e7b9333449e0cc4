"""`showtell run`, `showtell status` and a step subcommand from the command line
(orchestration/cli.py): one error line and exit 2 for a user's mistake, naming the step's log,
nothing on a quiet success, and `{date}` filled in from --date.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from orchestration.cli import main
from orchestration.steps import STEP_NAMES
from tests.run_table import REPO, config_file


def test_cli_run_with_an_unknown_step_exits_2_with_one_line_listing_the_steps(tmp_path, capsys):
    config = config_file(tmp_path, {"run_root": str(tmp_path / "run")})

    assert main(["run", "--config", str(config), "--until", "train"]) == 2

    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"showtell run: error: --until 'train': unknown step; the steps are {', '.join(STEP_NAMES)}"]


def test_cli_run_with_a_bad_date_exits_2(tmp_path, capsys):
    config = config_file(tmp_path, {"run_root": str(tmp_path / "runs/{date}")})

    assert main(["run", "--config", str(config), "--date", "31/01/2025"]) == 2
    assert "--date '31/01/2025': expected YYYY-MM-DD" in capsys.readouterr().err


def test_cli_status_on_a_fresh_dated_run_root_lists_every_step(tmp_path, capsys):
    config = config_file(tmp_path, {"run_root": str(tmp_path / "runs/{date}")})

    assert main(["status", "--config", str(config), "--date", "2025-01-31"]) == 0

    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"run_root: {tmp_path / 'runs/2025-01-31'}"
    for name in STEP_NAMES:
        assert any(line.startswith(name) and "run: not run before" in line for line in out.splitlines()), name
    assert not (tmp_path / "runs").exists()  # status writes nothing


def _showtell(*args: str) -> subprocess.CompletedProcess:
    """showtell as cron runs it: a subprocess whose console is a pipe."""
    command = [sys.executable, "-m", "orchestration.cli", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def _missing_source_config(tmp_path: Path) -> Path:
    data = {"source": str(tmp_path / "nowhere"), "mirror": str(tmp_path / "m")}
    return config_file(tmp_path, {"run_root": str(tmp_path / "run"), "data": data})


def test_a_quiet_run_whose_step_fails_by_a_users_mistake_prints_one_line_naming_the_log_and_exits_2(tmp_path):
    done = _showtell("run", "--quiet", "--config", str(_missing_source_config(tmp_path)))

    log = tmp_path / "run" / "logs" / "download.log"
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"showtell run: error: step download failed after {_seconds_in(done.stderr)} s: "
        f"{tmp_path / 'nowhere/annotations/annotations_trainval2014.zip'}: not found (log: {log})"
    ]
    assert "Traceback (most recent call last)" in log.read_text()  # the details are in the log
    report = (tmp_path / "run" / "report.html").read_text()
    assert "download" in report and "failed" in report and "logs/download.log" in report


def test_a_step_subcommand_run_alone_logs_under_run_root_and_fails_in_one_line_too(tmp_path):
    done = _showtell("-q", "download", "--config", str(_missing_source_config(tmp_path)))

    log = tmp_path / "run" / "logs" / "download.log"
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("showtell download: error: step download failed after ")
    assert done.stderr.endswith(f"(log: {log})\n") and len(done.stderr.splitlines()) == 1
    assert "SourceNotFoundError" in log.read_text()


def test_a_quiet_run_that_succeeds_prints_nothing_and_exits_0(tmp_path):
    tree = {"run_root": str(tmp_path / "run"), "data": {"source": "sample", "mirror": str(tmp_path / "m")}}
    config = config_file(tmp_path, {**tree, "data": {**tree["data"], "sample": {"train_images": 4, "val_images": 4}}})

    done = _showtell("run", "--config", str(config), "--until", "download", "-q")

    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert (tmp_path / "m" / "zips" / "train2014.zip").exists() and (tmp_path / "run" / "logs").is_dir()


def test_without_quiet_the_same_run_names_its_step_and_ends_with_a_summary(tmp_path):
    tree = {"run_root": str(tmp_path / "run"), "data": {"source": "sample", "mirror": str(tmp_path / "m")}}
    config = config_file(tmp_path, {**tree, "data": {**tree["data"], "sample": {"train_images": 4, "val_images": 4}}})

    done = _showtell("run", "--config", str(config), "--until", "download")

    assert done.returncode == 0
    ours = [line.split("showtell.run: ", 1)[1] for line in done.stderr.splitlines() if "showtell.run: " in line]
    assert ours[:2] == [
        "step download: start (not run before)",
        f"step download: done in {_seconds_in(done.stderr, 'done in ')} s",
    ]
    assert "download" in done.stdout
    assert done.stdout.splitlines()[-1] == f"run report: {tmp_path / 'run' / 'report.html'}"


def _seconds_in(text: str, after: str = "failed after ") -> str:
    """The seconds a console line states after `after`, as printed (e.g. "0.2")."""
    return re.search(re.escape(after) + r"([\d.]+) s", text).group(1)


def test_cli_promote_by_hand_needs_a_reason_and_a_reason_needs_rollback_or_force(tmp_path, capsys):
    config = str(config_file(tmp_path, {"run_root": str(tmp_path / "run")}))

    assert main(["promote", "--config", config, "--rollback"]) == 2
    assert main(["promote", "--config", config, "--force", "--reason", " "]) == 2
    assert main(["promote", "--config", config, "--reason", "why"]) == 2

    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "showtell promote: error: --rollback needs --reason TEXT, for the audit line",
        "showtell promote: error: --force needs --reason TEXT, for the audit line",
        "showtell promote: error: --reason goes with --rollback or --force",
    ]


def test_cli_rollback_restores_the_previous_model_and_says_which(tmp_path, capsys):
    from orchestration.promote import Gate, current_model, promote, read_history
    from tests.test_promote import _export

    models = tmp_path / "models"
    first = promote(_export(tmp_path, "night1", 0.5), str(models), Gate("CIDEr"))
    second = promote(_export(tmp_path, "night2", 0.6, current=first, current_cider=0.5), str(models), Gate("CIDEr"))
    config = config_file(tmp_path, {"run_root": str(tmp_path / "run"), "promote": {"models_root": str(models)}})

    assert main(["promote", "--config", str(config), "--rollback", "--reason", "night 2 is wrong"]) == 0

    out = capsys.readouterr().out.strip()
    assert out.startswith(f"rolled back: {models / 'current'} is model {first['id']} again")
    assert f"model {second['id']} is kept at {models / 'previous'}" in out
    assert current_model(str(models))["promotion"]["id"] == first["id"]
    assert read_history(str(models))[-1]["reason"].endswith(": night 2 is wrong")
