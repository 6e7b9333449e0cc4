"""`showtell run` and `showtell status`: the whole pipeline as one resumable command.

    config = load_dated_config("configs/local.yaml", overrides, date=None)  # schemas.config: `{date}` filled in
    result = run_pipeline(config, until=None, start=None, force=None, wait=0.0)
    rows = step_status(config)  # what `showtell status` shows
    # orchestration.run_text turns result and rows into text: format_outcomes, format_status

The steps (`orchestration.steps.STEPS`) run in order under a lock on run_root
(`orchestration.lock`). Before each step its fingerprint (its config keys, its input files and
when the step before it was last done; `orchestration.manifest`) is compared with the one the
manifest recorded. A fingerprint does not depend on how run_root is spelled, nor on where the
run folder lies: a folder reached by a relative or an absolute path, or copied to another place
or store, is up to date wherever its content is unchanged. A step is skipped when it is `done`,
its fingerprint is unchanged and its outputs exist. Otherwise it runs, in one of two ways:

- resumed: its fingerprint is unchanged but it was left `running` (a killed run), `failed`, or its
  outputs are gone; or the only change is that one of its `extendable` keys grew (a phase's
  `steps`). Its work picks up from where it was (a training phase from Ray's latest checkpoint,
  a download from its `.partial` files).
- fresh: its fingerprint changed, it never ran, or it is forced. An earlier attempt is cleared
  first (a training phase's Ray run folder). Because the next step's fingerprint holds when this
  one was done, every step after it runs fresh too.

A step may end the run early and successfully once it is done or up to date (its `stop`: the
baseline step when the data is what the promoted model was trained on); the result says why
(`RunResult.stopped`). A forced step is not asked, so `--force baseline` trains anyway.

`--until STEP` stops after STEP; `--force STEP` runs STEP and every step after it fresh, bringing
the steps before it up to date as usual; `--from STEP` does the same but requires the steps
before STEP to be done and up to date already.

Every string value of a config may hold `{date}`: `showtell run` and `showtell status` load their
config with `schemas.config.load_dated_config`, which replaces it with the UTC date (YYYY-MM-DD)
when they start, or with `--date` (to look at, or finish, another day's run). Other subcommands
do not expand it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from typing import Any, Optional, Sequence, TextIO

from orchestration.lock import FolderLock, read_owner, stale_reason
from orchestration.manifest import (
    DONE,
    FAILED,
    RUNNING,
    Manifest,
    Places,
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
from orchestration.step_log import StepFailedError, error_line, logged_step
from orchestration.steps import STEPS, Step
from schemas.config import Config, join_url
from schemas.errors import ShowtellError
from schemas.layout import LOGS_DIR

log = logging.getLogger("showtell.run")

RAN, SKIPPED = "ran", "skipped"  # what a run did with a step


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
    values = config_values(config, step.keys(config))
    basis = make_basis(values, step.inputs(config), upstream, Places.of(config), manifest.signer)
    fingerprint_now = fingerprint(basis)
    record = manifest.step(step.name)
    if record is None:
        return Assessment(basis, fingerprint_now, None, "not run before", resume=False)
    if record.get("fingerprint") != fingerprint_now:
        reason = describe_change(record.get("basis"), basis)
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
    stopped: Optional[str] = None  # why the run ended early, successfully (a step's `stop`), or None


def run_pipeline(
    config: Config,
    steps: Sequence[Step] = STEPS,
    *,
    until: Optional[str] = None,
    start: Optional[str] = None,
    force: Optional[str] = None,
    wait: float = 0.0,
    echo_to: Optional[TextIO] = None,
) -> RunResult:
    """Runs the steps that are not up to date, in order, under the run_root lock (see the module's
    docstring); returns what happened to each. A failing step is recorded `failed` and raises a
    StepFailedError naming the step, its cause and its log (exit code 2 when the cause is a
    user's mistake, 1 otherwise); the traceback is in the log.

    What a step's engines print goes to `<run_root>/logs/<step>.log` (`orchestration.step_log`),
    and to `echo_to` as well when it is given (`showtell run --verbose`)."""
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
            f"seen dead on its host or its heartbeat is {config.run.lock_stale_seconds:.0f} s old "
            "(run.lock_stale_seconds)"
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
        stopped = None
        for index, step in enumerate(steps[: last + 1]):
            lock.check()
            assessment = assess(config, steps, index, manifest)
            forced = first_forced is not None and index >= first_forced
            if not forced and assessment.reason is None:
                log.info("step %s: skipped (up to date)", step.name)
                outcomes.append(StepOutcome(step.name, SKIPPED, "up to date", None))
            else:
                reason = f"forced by {flag} {forced_name}" if forced else assessment.reason
                fresh = forced or not assessment.resume
                outcomes.append(
                    _run_step(config, step, manifest, assessment, reason, fresh, lock.run_id, echo_to)
                )
            stopped = step.stop(config) if step.stop is not None and not forced else None
            if stopped:
                log.info("the run ends after step %s: %s", step.name, stopped)
                break
        if manifest.signer.updated:  # big files hashed for steps skipped since the last save
            manifest.save()
    return RunResult(lock.run_id, manifest.url, outcomes, stopped)


def _require_done_before(config: Config, steps: Sequence[Step], first: int, manifest: Manifest) -> None:
    for index in range(first):
        reason = assess(config, steps, index, manifest).reason
        if reason is not None:
            raise ShowtellError(
                f"--from {steps[first].name}: step {steps[index].name} before it is not done and up to date "
                f"({reason}); run without --from, or with --force {steps[first].name}"
            )


def _run_step(
    config: Config,
    step: Step,
    manifest: Manifest,
    assessment: Assessment,
    reason: str,
    fresh: bool,
    run_id: str,
    echo_to: Optional[TextIO],
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
        with logged_step(step.name, step_log_url(config, step.name), echo_to):
            summary = step.work(config)
            absent = missing(outputs)
            if absent:
                raise ShowtellError(f"finished without writing {', '.join(absent)}")
    except BaseException as error:
        failed = error if isinstance(error, StepFailedError) else None
        seconds = failed.seconds if failed else round(time.monotonic() - started, 3)
        line = failed.cause if failed else error_line(error)
        manifest.set_step(step.name, {**record, "state": FAILED, "end": now_iso(), "seconds": seconds, "error": line})
        raise
    seconds = round(time.monotonic() - started, 3)
    manifest.set_step(step.name, {**record, "state": DONE, "end": now_iso(), "seconds": seconds, "summary": summary})
    log.info("step %s: done in %.1f s", step.name, seconds)
    return StepOutcome(step.name, RAN, reason, seconds)


def step_log_url(config: Config, step: str) -> str:
    """Where step `step`'s engine output goes: `<run_root>/logs/<step>.log`."""
    return join_url(config.run_root, LOGS_DIR, f"{step}.log")


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
        start, seconds, error = record.get("start"), record.get("seconds"), record.get("error")
        rows.append(StepStatus(step.name, state, start, seconds, match, next_run, outputs, error))
    return rows
