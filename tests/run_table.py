"""A table of small real steps for the tests of `showtell run` and `showtell status`
(orchestration/run.py), and the helpers those tests share.

Each step of TABLE writes `<run_root>/<name>.txt` from its config values and its inputs' text and
logs its call to calls.log, so a test reads what ran, in which order, and whether it was reset:

    run_table(root)                          # a first run: every step runs
    run_table(root, "data.min_word_count=2")  # prepare's key changed: prepare, train, score re-run
    logged_calls(root)  # ["fetch", "prepare", "reset train", "train", "score", "prepare", "reset train", ...]
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from orchestration.manifest import MANIFEST_FILE, config_values
from orchestration.run import RunResult, run_pipeline
from orchestration.steps import STEPS, Step
from schemas.config import Config, build_config
from schemas.errors import ShowtellError

REPO = Path(__file__).resolve().parent.parent
CALLS = "calls.log"


def logged_calls(root: Path) -> list[str]:
    """The calls TABLE's steps logged under `root`, in order: a step's name, or `reset <name>`."""
    path = root / CALLS
    return path.read_text().splitlines() if path.exists() else []


def table_step(
    name: str, keys: tuple[str, ...], inputs: tuple[str, ...] = (), reset: bool = False, extendable=()
) -> Step:
    """A step that writes `<run_root>/<name>.txt` from its config values and its inputs' text, and
    logs its call (and its reset) to calls.log. It fails as a user's mistake (a ShowtellError)
    while `<run_root>/fail-<name>` exists, and crashes (a RuntimeError, as a bug or a dead worker
    would) while `<run_root>/crash-<name>` exists."""

    def url(config, file: str) -> str:
        return str(Path(config.run_root) / f"{file}.txt")

    def log_call(config, text: str) -> None:
        with open(Path(config.run_root) / CALLS, "a", encoding="utf-8") as handle:
            handle.write(text + "\n")

    def work(config) -> dict:
        if (Path(config.run_root) / f"fail-{name}").exists():
            raise ShowtellError(f"{name} was told to fail\nsecond line")
        if (Path(config.run_root) / f"crash-{name}").exists():
            os.write(2, f"{name}: an engine line before the crash\n".encode())  # as Ray or TensorFlow writes
            raise RuntimeError(f"{name} crashed")
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
    table_step("fetch", ("data.source",)),
    table_step("prepare", ("data.min_word_count",), ("fetch",)),
    table_step("train", ("train.phase1",), ("prepare",), reset=True, extendable=("train.phase1.steps",)),
    table_step("score", ("eval.beam_size",), ("train",)),
)


def run_config(root: Path, *overrides: str) -> Config:
    """The default config with run_root `root` and `overrides` (`a.b=value`) applied."""
    return build_config({"run_root": str(root)}, list(overrides))


def run_table(root: Path, *overrides: str, **options) -> RunResult:
    """`run_pipeline` over TABLE; `options` are its keyword arguments (until, start, force, wait)."""
    return run_pipeline(run_config(root, *overrides), TABLE, **options)


def step_results(result: RunResult) -> dict[str, str]:
    """What the run did with each step it reached, by name: RAN or SKIPPED."""
    return {outcome.name: outcome.result for outcome in result.outcomes}


def step_reasons(result: RunResult) -> dict[str, str]:
    """Why the run ran each step it reached, by name ("up to date" for a skipped one)."""
    return {outcome.name: outcome.reason for outcome in result.outcomes}


def manifest_json(root: Path) -> dict:
    """The manifest under `root`, as JSON."""
    return json.loads((root / MANIFEST_FILE).read_text())


def real_step(name: str) -> Step:
    """The step of `showtell run` (orchestration.steps.STEPS) called `name`; KeyError for none."""
    return {step.name: step for step in STEPS}[name]


def config_file(folder: Path, tree: dict) -> Path:
    """`tree` written as `<folder>/config.yaml`."""
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path
