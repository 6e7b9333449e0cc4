"""`showtell run` and `showtell status` from the command line (orchestration/cli.py): one error
line and exit 2 for a user's mistake, and `{date}` filled in from --date.
"""
from __future__ import annotations

from orchestration.cli import main
from orchestration.steps import STEP_NAMES
from tests.run_table import config_file


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
