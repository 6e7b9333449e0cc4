"""Fixtures shared by test files. `demo_run` is the demo itself (configs/local.yaml on its
sample data: download, preprocess, both training phases) run once per test session through the
CLI, for every test that needs a model trained as `make demo` trains it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from schemas.config import Config, load_config

DEMO_CONFIG = "configs/local.yaml"


@dataclasses.dataclass(frozen=True)
class DemoRun:
    config_path: str  # configs/local.yaml
    overrides: tuple[str, ...]  # `--set` values that point run_root at the test's folder

    @property
    def run_root(self) -> Path:
        return Path(self.config.run_root)

    @property
    def config(self) -> Config:
        return load_config(self.config_path, self.overrides)

    def cli_args(self) -> list[str]:
        """`--config C --set ...` for a `showtell` subcommand on this run."""
        return ["--config", self.config_path, *(arg for o in self.overrides for arg in ("--set", o))]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    from orchestration.cli import main as cli_main

    run = DemoRun(DEMO_CONFIG, (f"run_root={tmp_path_factory.mktemp('demo') / 'run'}",))
    for step in (["download"], ["preprocess"], ["train", "--phase", "1"], ["train", "--phase", "2"]):
        assert cli_main(["-q", *step, *run.cli_args()]) == 0, step
    return run
