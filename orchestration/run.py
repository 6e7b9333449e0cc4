"""`showtell run` and `showtell status`: the whole pipeline as one resumable command.

    config = load_run_config("configs/local.yaml", overrides, date=None)   # `{date}` filled in
    result = run_pipeline(config, until=None, start=None, force=None, wait=0.0)
    print(format_outcomes(result))
    print(format_status(config, step_status(config)))

The steps (`orchestration.steps.STEPS`) run in order under a lock on run_root
(`orchestration.lock`). Before each step its fingerprint (its config keys, its input files and
when the step before it was last done; `orchestration.manifest`) is compared with the one the
manifest recorded. A step is skipped when it is `done`, its fingerprint is unchanged and its
outputs exist. Otherwise it runs, in one of two ways:

- resumed: its fingerprint is unchanged but it was left `running` (a killed run), `failed`, or its
  outputs are gone; or the only change is that one of its `extendable` keys grew (a phase's
  `steps`). Its work picks up from where it was (a training phase from Ray's latest checkpoint,
  a download from its `.partial` files).
- fresh: its fingerprint changed, it never ran, or it is forced. An earlier attempt is cleared
  first (a training phase's Ray run folder). Because the next step's fingerprint holds when this
  one was done, every step after it runs fresh too.

`--until STEP` stops after STEP; `--force STEP` runs STEP and every step after it fresh, bringing
the steps before it up to date as usual; `--from STEP` does the same but requires the steps
before STEP to be done and up to date already.

Every string value of a config may hold `{date}`: `showtell run` and `showtell status` replace it
with the UTC date (YYYY-MM-DD) when they start, or with `--date` (to look at, or finish, another
day's run). Other subcommands do not expand it.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import time
from typing import Any, Optional, Sequence

from orchestration.lock import FolderLock, read_owner, stale_reason
from orchestration.manifest import (
    DONE,
    FAILED,
    RUNNING,
    Manifest,
    config_values,
    describe_change,
    fingerprint,
    make_basis,
    missing,
    now_iso,
    only_grown,
    relative,
    upstream_token,
)
from orchestration.promote import HELD_BACK
from orchestration.steps import STEPS, Step, decision_file, models_root
from pipelines.report import summarize_report
from schemas.config import Config, build_config, join_url, load_config
from schemas.errors import ShowtellError
from schemas.layout import CURRENT_DIR, EVAL_REPORT_FILE
from schemas.storage import read_json

log = logging.getLogger("showtell.run")

DATE_FIELD = "{date}"
RAN, SKIPPED = "ran", "skipped"  # what a run did with a step


# --- config -------------------------------------------------------------------------------------


def load_run_config(path: str, overrides: Sequence[str] = (), date: Optional[str] = None) -> Config:
    """`load_config` with `{date}` in any string value replaced by the UTC day of `date`
    (YYYY-MM-DD, or an ISO 8601 time such as a Kubeflow job's creation time,
    2025-01-31T02:00:07Z; default: today, UTC)."""
    config = load_config(path, overrides)
    tree = config.model_dump(mode="json")
    day = run_day(date)
    if DATE_FIELD not in json.dumps(tree):
        return config
    return build_config(_fill_date(tree, day), origin=str(path))


def run_day(date: Optional[str]) -> str:
    """YYYY-MM-DD (UTC) of `date`: a day, an ISO 8601 time (converted to UTC), or None for today."""
    if date is None:
        return datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    try:
        return datetime.date.fromisoformat(date).isoformat()
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(date.replace("Z", "+00:00"))  # Python 3.10 reads no "Z"
    except ValueError:
        raise ShowtellError(f"--date {date!r}: expected YYYY-MM-DD or an ISO 8601 time, e.g. 2025-01-31") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.timezone.utc)
    return moment.date().isoformat()


def _fill_date(node: Any, day: str) -> Any:
    if isinstance(node, str):
        return node.replace(DATE_FIELD, day)
    if isinstance(node, dict):
        return {key: _fill_date(value, day) for key, value in node.items()}
    if isinstance(node, list):
        return [_fill_date(value, day) for value in node]
    return node


# --- deciding -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Assessment:
    """Whether a step is up to date, and if not, why and how it would run."""

    basis: dict[str, Any]  # what its fingerprint is made of, now
    fingerprint: str
    record: Optional[dict[str, Any]]  # its manifest record
    reason: Optional[str]  # why it must run; None when it is up to date
    resume: bool  # run it resumed (an earlier attempt of the same inputs) rather than fresh


def step_index(name: str, steps: Sequence[Step], flag: str) -> int:
    """The position of step `name`; ShowtellError listing the step names when there is none."""
    names = [step.name for step in steps]
    if name not in names:
        raise ShowtellError(f"{flag} {name!r}: unknown step; the steps are {', '.join(names)}")
    return names.index(name)


def assess(config: Config, steps: Sequence[Step], index: int, manifest: Manifest) -> Assessment:
    """Step `index` against its manifest record (the steps before it as they are recorded now)."""
    step = steps[index]
    upstream = upstream_token(steps[index - 1].name, manifest.step(steps[index - 1].name)) if index else None
    basis = make_basis(config_values(config, step.keys(config)), step.inputs(config), upstream)
    fingerprint_now = fingerprint(basis)
    record = manifest.step(step.name)
    if record is None:
        return Assessment(basis, fingerprint_now, None, "not run before", resume=False)
    if record.get("fingerprint") != fingerprint_now:
        reason = describe_change(record.get("basis"), basis, config.run_root)
        extended = only_grown(record.get("basis"), basis, step.extendable)
        return Assessment(basis, fingerprint_now, record, reason, resume=extended)
    if record["state"] == RUNNING:
        reason = f"resuming: run {record['run_id']} started it at {record['start']} and was interrupted"
        return Assessment(basis, fingerprint_now, record, reason, resume=True)
    if record["state"] == FAILED:
        return Assessment(basis, fingerprint_now, record, f"retrying: it failed ({record['error']})", resume=True)
    absent = missing(step.outputs(config))
    if absent:
        names = ", ".join(relative(url, config.run_root) for url in absent)
        return Assessment(basis, fingerprint_now, record, f"outputs missing: {names}", resume=True)
    return Assessment(basis, fingerprint_now, record, None, resume=False)


# --- running ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """What `showtell run` did with one step."""

    name: str
    result: str  # RAN or SKIPPED (a failed step raises)
    reason: str  # why it ran ("up to date" when skipped)
    seconds: Optional[float]  # how long it ran, None when skipped


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one `showtell run` did."""

    run_id: str  # the run's id, as in the lock and the manifest
    manifest: str  # the manifest's URL
    outcomes: list[StepOutcome]


class StepFailedError(ShowtellError):
    """A step raised a ShowtellError; the message names the step."""


def run_pipeline(
    config: Config,
    steps: Sequence[Step] = STEPS,
    *,
    until: Optional[str] = None,
    start: Optional[str] = None,
    force: Optional[str] = None,
    wait: float = 0.0,
    progress: bool = False,
) -> RunResult:
    """Runs the steps that are not up to date, in order, under the run_root lock (see the module's
    docstring); returns what happened to each. A failing step is recorded `failed` and its error
    raised (a ShowtellError as StepFailedError naming the step)."""
    if start and force:
        raise ShowtellError("--from and --force: give one of them")
    last = step_index(until, steps, "--until") if until else len(steps) - 1
    flag, forced_name = ("--from", start) if start else ("--force", force)
    first_forced = step_index(forced_name, steps, flag) if forced_name else None
    if first_forced is not None and first_forced > last:
        raise ShowtellError(f"{flag} {forced_name} comes after --until {until}: nothing would run")
    lock = FolderLock(
        config.run_root,
        stale_after=config.run.lock_stale_seconds,
        wait=wait,
        command="showtell run",
        hint=(
            "; wait for it with --wait SECONDS. If that run is gone, its lock is taken over once its process is "
            f"seen dead on its host or its heartbeat is {config.run.lock_stale_seconds:.0f} s old (run.lock_stale_seconds)"
        ),
    )
    outcomes: list[StepOutcome] = []
    with lock:
        manifest = Manifest.load(config.run_root, guard=lock.check)
        manifest.set_run(
            {
                "run_id": lock.run_id,
                "started": now_iso(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "until": until,
                "from": start,
                "force": force,
            }
        )
        if start:
            _require_done_before(config, steps, first_forced, manifest)
        for index, step in enumerate(steps[: last + 1]):
            lock.check()
            assessment = assess(config, steps, index, manifest)
            forced = first_forced is not None and index >= first_forced
            if not forced and assessment.reason is None:
                log.info("step %s: skipped (up to date)", step.name)
                outcomes.append(StepOutcome(step.name, SKIPPED, "up to date", None))
                continue
            reason = f"forced by {flag} {forced_name}" if forced else assessment.reason
            fresh = forced or not assessment.resume
            outcomes.append(_run_step(config, step, manifest, assessment, reason, fresh, lock.run_id, progress))
    return RunResult(lock.run_id, manifest.url, outcomes)


def _require_done_before(config: Config, steps: Sequence[Step], first: int, manifest: Manifest) -> None:
    for index in range(first):
        reason = assess(config, steps, index, manifest).reason
        if reason is not None:
            raise ShowtellError(
                f"--from {steps[first].name}: step {steps[index].name} before it is not done and up to date ({reason}); "
                f"run without --from, or with --force {steps[first].name}"
            )


def _run_step(
    config: Config,
    step: Step,
    manifest: Manifest,
    assessment: Assessment,
    reason: str,
    fresh: bool,
    run_id: str,
    progress: bool,
) -> StepOutcome:
    if fresh and step.reset is not None:
        step.reset(config)
    outputs = step.outputs(config)
    record = {
        "state": RUNNING,
        "run_id": run_id,
        "reason": reason,
        "start": now_iso(),
        "end": None,
        "seconds": None,
        "fingerprint": assessment.fingerprint,
        "basis": assessment.basis,
        "outputs": outputs,
        "error": None,
        "summary": None,
    }
    manifest.set_step(step.name, record)
    log.info("step %s: start (%s)", step.name, reason)
    started = time.monotonic()
    try:
        summary = step.work(config, progress)
        absent = missing(outputs)
        if absent:
            raise ShowtellError(f"finished without writing {', '.join(absent)}")
    except BaseException as error:
        seconds = round(time.monotonic() - started, 3)
        line = _error_line(error)
        manifest.set_step(step.name, {**record, "state": FAILED, "end": now_iso(), "seconds": seconds, "error": line})
        log.error("step %s: failed after %.1f s: %s", step.name, seconds, line)
        if isinstance(error, ShowtellError):
            raise StepFailedError(f"step {step.name}: {error}") from error
        raise
    seconds = round(time.monotonic() - started, 3)
    manifest.set_step(step.name, {**record, "state": DONE, "end": now_iso(), "seconds": seconds, "summary": summary})
    log.info("step %s: done in %.1f s", step.name, seconds)
    return StepOutcome(step.name, RAN, reason, seconds)


def _error_line(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return text if isinstance(error, ShowtellError) else f"{type(error).__name__}: {text}".rstrip(": ")


# --- status -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepStatus:
    """One row of `showtell status`."""

    name: str
    state: str  # done, running, interrupted, failed, or "-" (never started)
    start: Optional[str]
    seconds: Optional[float]
    fingerprint: str  # "current", "stale" (config or inputs changed since), or "-" (never started)
    next_run: str  # what `showtell run` would do now: "skip", or "run: <why>"; "running now" while it runs
    outputs: list[tuple[str, bool]]  # (url, exists)
    error: Optional[str]  # the error line of a failed step


def step_status(config: Config, steps: Sequence[Step] = STEPS) -> list[StepStatus]:
    """Each step's state, timing, outputs and what a run would do now; reads, changes nothing."""
    manifest = Manifest.load(config.run_root)
    holder = read_owner(config.run_root)
    live_run = holder.run_id if holder and not stale_reason(holder, config.run.lock_stale_seconds) else None
    rows, first_to_run = [], None
    for index, step in enumerate(steps):
        assessment = assess(config, steps, index, manifest)
        record = assessment.record or {}
        state = record.get("state", "-")
        if state == RUNNING and record.get("run_id") != live_run:
            state = "interrupted"
        if record:
            match = "current" if record.get("fingerprint") == assessment.fingerprint else "stale"
        else:
            match = "-"
        if state == RUNNING:
            next_run = f"running now (run {live_run})"
            first_to_run = first_to_run or step.name
        elif assessment.reason is not None:
            next_run = f"run: {assessment.reason}"
            first_to_run = first_to_run or step.name
        elif first_to_run is not None:
            next_run = f"run: after {first_to_run} re-runs"
        else:
            next_run = "skip"
        outputs = [(url, not missing([url])) for url in step.outputs(config)]
        rows.append(
            StepStatus(
                step.name, state, record.get("start"), record.get("seconds"), match, next_run, outputs, record.get("error")
            )
        )
    return rows


# --- text ---------------------------------------------------------------------------------------


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
        current = join_url(models_root(config), CURRENT_DIR)
        if decision["current_value"] is None:
            comparison = "the first model"
        else:
            comparison = (
                f"{decision['metric']} {decision['new_value']:.4f} vs the current model's "
                f"{decision['current_value']:.4f} - tolerance {decision['tolerance']:g}"
            )
        if decision["decision"] == HELD_BACK:
            lines.append(f"held back: {decision['export']} ({comparison}); the promoted model stays {current}")
        else:
            lines.append(f"promoted model: {current} ({comparison})")
    return "\n".join(lines)
