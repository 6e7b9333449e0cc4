"""Where a step's output goes: showtell's own lines to the console, everything else to the step's log.

While `showtell run` runs a step, Ray's driver, controller and worker lines, TensorFlow's C++ and
absl logs and Beam's workers write to this process's stdout and stderr, and its child processes
(Ray's raylet, Beam's worker processes) inherit them. `step_output` points both file descriptors
at `<run_root>/logs/<step>.log` for the step's duration, on any store:

    console = open_console()                 # once, before any step: the terminal, for showtell's lines
    with step_output("runs/x/logs/train-phase1.log", echo_to=None):
        run_phase(config, 1)                 # Ray's and TensorFlow's lines land in the log only

showtell's logger writes to `open_console()`'s stream, so its lines (a step starting and ending,
warnings a user can act on) still reach the terminal. With `echo_to` (`-v/--verbose`), the log's
lines are copied to the console as well. A step that runs again (a resumed or retried one)
appends to its log.

`logged_step` is `step_output` for a whole step, as `showtell run` and the subcommands run alone
(`showtell train`, ...) use it: a failure's traceback goes to the log, and what reaches the caller
is a `StepFailedError` with one line that names the step, its cause and its log:

    with logged_step("train-phase1", "runs/x/logs/train-phase1.log"):
        run_phase(config, 1)
    # StepFailedError: step train-phase1 failed after 12.3 s: rank 1: ... (log: runs/x/logs/train-phase1.log)
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Iterator, Optional, TextIO

from schemas.errors import OTHER_FAILURE, ShowtellError
from schemas.storage import absolute, exists, is_local, read_text, write_text

_READ_BYTES = 1 << 16
_DRAIN_SECONDS = 10.0  # how long the end of a step waits for its output to be written out


_console: Optional[TextIO] = None  # this process's console, once opened


def open_console() -> TextIO:
    """The terminal as it was when first asked for (a duplicate of stderr), line-buffered: what
    showtell's own lines are written to, whatever a step later does to stdout and stderr."""
    global _console
    if _console is None:
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # a stream in memory (a test's capture): it is no terminal
            return sys.stderr
        sys.stderr.flush()
        _console = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
    return _console


class StepFailedError(ShowtellError):
    """A step failed. Its exit code is 2 when the cause was a user's mistake (a ShowtellError),
    1 when it was anything else (a crashed worker, a lost node, a bug)."""

    def __init__(self, step: str, cause: BaseException, seconds: float, log_url: str):
        self.step, self.seconds, self.log_url = step, seconds, log_url
        self.cause = error_line(cause)  # one line: what went wrong
        self.exit_code = cause.exit_code if isinstance(cause, ShowtellError) else OTHER_FAILURE
        super().__init__(f"step {step} failed after {seconds:.1f} s: {self.cause} (log: {log_url})")


def error_line(error: BaseException) -> str:
    """The one line that says what went wrong: a ShowtellError's message as is, anything else
    with its type, e.g. "RuntimeError: worker died"."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return text if isinstance(error, ShowtellError) else f"{type(error).__name__}: {text}".rstrip(": ")


@contextmanager
def logged_step(step: str, log_url: str, echo_to: Optional[TextIO] = None) -> Iterator[None]:
    """`step_output` for a whole step: an exception's traceback is written to the log, and the
    exception comes out as a StepFailedError (exit code 2 for a user's mistake, 1 otherwise)."""
    started = time.monotonic()
    try:
        with step_output(log_url, echo_to):
            try:
                yield
            except Exception:
                os.write(2, traceback.format_exc().encode())  # into the log (fd 2 is it): the console gets one line
                raise
    except Exception as error:
        raise StepFailedError(step, error, round(time.monotonic() - started, 3), log_url) from error


@contextmanager
def step_output(log_url: str, echo_to: Optional[TextIO] = None) -> Iterator[None]:
    """For the block's duration, this process's stdout and stderr (and its new child processes')
    go to the log at `log_url` (any fsspec URL; appended to), and to `echo_to` too when given."""
    local_log = absolute(log_url) if is_local(log_url) else None
    with tempfile.TemporaryDirectory(prefix="showtell-log-") as scratch:
        path = local_log or os.path.join(scratch, "step.log")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "ab") as log:
            with _descriptors_into(log, echo_to):
                yield
        if local_log is None:
            earlier = read_text(log_url) if exists(log_url) else ""
            with open(path, encoding="utf-8", errors="replace") as handle:
                write_text(log_url, earlier + handle.read())


@contextmanager
def _descriptors_into(log, echo_to: Optional[TextIO]) -> Iterator[None]:
    """File descriptors 1 and 2 write into a pipe while the block runs; a thread copies the pipe
    into `log` (and `echo_to`)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    read_end, write_end = os.pipe()
    echo_fd = echo_to.fileno() if echo_to is not None else None
    copier = threading.Thread(target=_copy, args=(read_end, log, echo_fd), name="step-log", daemon=True)
    copier.start()
    try:
        for fd in (1, 2):
            os.dup2(write_end, fd)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, original in saved.items():
            os.dup2(original, fd)
            os.close(original)
        os.close(write_end)
        # The copier ends when every writer is gone; a child process that outlives the step (a
        # lingering worker) keeps the pipe open, and the copier then goes on without us.
        copier.join(_DRAIN_SECONDS)


def _copy(read_end: int, log, echo_fd: Optional[int]) -> None:
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(_READ_BYTES):
            try:
                log.write(chunk)
                log.flush()
                if echo_fd is not None:
                    os.write(echo_fd, chunk)
            except (ValueError, OSError):  # the step ended long ago and its log is closed
                return
