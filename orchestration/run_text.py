"""The text `showtell run` and `showtell status` print: tables of what a run did and of where each
step stands, and the run's closing lines (the evaluation summary, the promoted model).

    result = run_pipeline(config)
    print(format_outcomes(result))
    # showtell run 3f2a9c81d0e4 (/runs/x/manifest.json):
    #   step          result   duration  why
    #   download      skipped  -         up to date
    #   preprocess    ran      12.3 s    config data.min_word_count 4 -> 2
    #   train-phase1  ran      4.2 min   preprocess re-ran; input data/word_counts.txt changed
    #   ...
    print(format_results(config, result))  # promoted model: /runs/x/models/current (the first model)
    print(format_status(config, step_status(config)))  # the lock, a row per step, then their outputs
"""
from __future__ import annotations

from typing import Optional, Sequence

from orchestration.lock import read_owner, stale_reason
from orchestration.manifest import FAILED
from orchestration.promote import HELD_BACK
from orchestration.run import RAN, RunResult, StepStatus
from orchestration.steps import decision_file
from pipelines.eval_report import summarize_report
from schemas.config import Config, join_url
from schemas.layout import CURRENT_DIR, EVAL_REPORT_FILE
from schemas.models_root import models_root_of
from schemas.storage import read_json


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)
    ]


def _when(iso: Optional[str]) -> str:
    """A manifest time as `2025-01-31 02:00:07` (UTC)."""
    return iso[:19].replace("T", " ") if iso else "-"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def format_outcomes(result: RunResult) -> str:
    """The end-of-run table: each step's result, duration and why it ran."""
    rows = [(o.name, o.result, _duration(o.seconds), o.reason) for o in result.outcomes]
    total = sum(o.seconds or 0.0 for o in result.outcomes)
    lines = [f"showtell run {result.run_id} ({result.manifest}):"]
    lines += ["  " + line for line in _table(("step", "result", "duration", "why"), rows)]
    lines.append(f"  {sum(o.result == RAN for o in result.outcomes)} steps ran in {_duration(total)}")
    if result.stopped:
        lines.append(f"  the run ended after {result.outcomes[-1].name}: {result.stopped}")
    return "\n".join(lines)


def format_status(config: Config, rows: Sequence[StepStatus]) -> str:
    """`showtell status`'s text: the lock, then one row per step, then each step's outputs."""
    holder = read_owner(config.run_root)
    if holder is None:
        lock_line = "free"
    else:
        stale = stale_reason(holder, config.run.lock_stale_seconds)
        lock_line = f"held by {holder.describe()}" + (f"; stale: {stale}" if stale else "")
    lines = [f"run_root: {config.run_root}", f"lock: {lock_line}"]
    table = [(r.name, r.state, _when(r.start), _duration(r.seconds), r.fingerprint, r.next_run) for r in rows]
    lines += _table(("step", "state", "started (UTC)", "duration", "fingerprint", "next run"), table)
    lines += [f"{r.name} failed: {r.error}" for r in rows if r.state == FAILED]
    lines.append("outputs:")
    for row in rows:
        for url, present in row.outputs:
            lines.append(f"  {row.name:<13} {url}{'' if present else '  (missing)'}")
    return "\n".join(lines)


def format_results(config: Config, result: RunResult) -> str:
    """What the run ends with: the evaluation summary and where the promoted model is, for the
    steps this run reached (run or skipped as up to date)."""
    reached = {outcome.name for outcome in result.outcomes}
    lines = []
    report = read_json(join_url(config.eval_dir, EVAL_REPORT_FILE)) if "evaluate" in reached else None
    if report is not None:
        lines.append(summarize_report(report))
    decision = read_json(decision_file(config)) if "promote" in reached else None
    if decision is not None:
        current = join_url(models_root_of(config), CURRENT_DIR)
        if decision["decision"] == HELD_BACK:
            lines.append(f"held back: {decision['export']} ({decision['reason']}); the promoted model stays {current}")
        else:
            lines.append(f"promoted model: {current} ({decision['reason']})")
    return "\n".join(lines)
