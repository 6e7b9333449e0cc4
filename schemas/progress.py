"""Progress displays: a long step's work done out of its total, with rate and time left, on the console.

The CLI says once where displays go; a step's driver opens one around its work; the processes
doing the work (the driver itself, Beam's DirectRunner worker processes, Ray's local workers)
report to it with `advance`:

    configure(console, bar=console.isatty(), every=30.0)      # once, in the CLI (None: no displays)

    with tracked("preprocess", total=500, unit="images") as spool:
        run_the_pipeline()              # in any process on this machine: advance() per image checked

    # a worker process, e.g. a DoFn:
    advance()                           # one more image checked
    advance(at=400, loss=2.31)          # the work is at 400 of its total (latest report wins), with a field

On a terminal (`bar=True`) the display is a tqdm bar. Off a terminal (cron, Kubeflow, a pipe) it
is a plain line at most once every `every` seconds, and a last one when the display closes
(unless the line before it showed the same counts):

    2025-05-01 12:00:30 preprocess: 250/500 images (50%), 8.33 images/s, 00:30 elapsed, 00:30 left

How counts travel: `tracked` makes a spool folder on local disk and names it in the environment
(`SPOOL_ENV`), which Beam's DirectRunner worker processes inherit when they start; Ray's workers
get it through their runtime_env (`tracked` yields the folder for that). `advance` keeps its
process's running total in memory and writes it to one file of its own in the spool at most every
`FLUSH_SECONDS` (the last write at most that long after the last call, from a background thread);
the driver reads the spool every `POLL_SECONDS` and shows the sum of the processes' counts, or the
latest position (`at=`), and the latest process's fields.

Where the spool is not reachable, `advance` does nothing, silently: a worker on another machine (a
Dataflow or Flink worker, a Ray worker on another node) or a process started before the display.
The display then shows elapsed time only. `advance` never fails the work it reports on.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator, Optional, TextIO, Union

from tqdm import tqdm

SPOOL_ENV = "SHOWTELL_PROGRESS_DIR"  # the spool folder of the display open on this machine
FLUSH_SECONDS = 0.5  # a process writes its counts to the spool at most this often
POLL_SECONDS = 0.5  # the display reads the spool this often

Field = Union[int, float, str]


class _Settings:
    stream: Optional[TextIO] = None  # None: displays are off
    bar: bool = False
    every: float = 30.0


_settings = _Settings()


def configure(stream: Optional[TextIO], *, bar: bool, every: float = 30.0) -> None:
    """Where this process's displays go from now on: `stream` (None: nowhere, e.g. for --quiet),
    as a tqdm bar (`bar=True`, for a terminal) or as plain lines at most one per `every` seconds
    plus a last one when a display closes. Until this is called, displays are off."""
    _settings.stream, _settings.bar, _settings.every = stream, bar, every


@contextmanager
def tracked(name: str, total: int, unit: str) -> Iterator[Optional[str]]:
    """Shows the progress of the block's work, `total` `unit`s in all, as `name`, while it runs.

    Yields the spool folder that worker processes report to (also in os.environ[SPOOL_ENV] for
    the block's duration, for the processes started in it), or None when displays are off.
    """
    stream = _settings.stream
    if stream is None:
        yield None
        return
    spool = tempfile.mkdtemp(prefix="showtell-progress-")
    before = os.environ.get(SPOOL_ENV)
    os.environ[SPOOL_ENV] = spool
    display = _Display(name, total, unit, stream, _settings.bar, _settings.every, spool)
    try:
        yield spool
    finally:
        display.close()
        if before is None:
            os.environ.pop(SPOOL_ENV, None)
        else:
            os.environ[SPOOL_ENV] = before
        shutil.rmtree(spool, ignore_errors=True)


def advance(n: int = 1, *, at: Optional[int] = None, **fields: Field) -> None:
    """Reports progress to the display open on this machine: `n` more units done by this process
    (the display sums every process's), or with `at`, that the work has reached `at` units of its
    total (the latest position reported by any process wins: a restarted worker may go back).
    `fields` (e.g. loss=2.31) replace the ones this process reported before and are shown as
    given (`**{"examples/s": 120.5}` for names that are no Python identifier).

    Does nothing where no display's spool is reachable (see the module docstring)."""
    spool = os.environ.get(SPOOL_ENV)
    if not spool:
        return
    outbox = _outbox_for(spool)
    if outbox is not None:
        outbox.add(n if at is None else 0, at, fields)


# ---------------------------------------------------------------------------------------------
# The reporting side: one outbox per process


_outbox: Optional["_Outbox"] = None
_outbox_lock = threading.Lock()


def _outbox_for(spool: str) -> Optional["_Outbox"]:
    """This process's outbox for `spool`; None when `spool` is no folder here."""
    global _outbox
    with _outbox_lock:
        current = _outbox
        if current is None or current.spool != spool or current.pid != os.getpid():
            current = _outbox = _Outbox(spool)
    return current if current.reachable else None


class _Outbox:
    """A process's running total for one spool, written to its own file there, whole each time."""

    def __init__(self, spool: str):
        self.spool, self.pid = spool, os.getpid()
        self.reachable = os.path.isdir(spool)
        self.path = os.path.join(spool, f"{self.pid}-{uuid.uuid4().hex[:8]}.json")
        self.done, self.at, self.fields = 0, None, {}
        self.dirty, self.flushed = False, 0.0
        self.lock = threading.Lock()
        self.flusher: Optional[threading.Thread] = None

    def add(self, n: int, at: Optional[int], fields: dict) -> None:
        with self.lock:
            self.done += n
            if at is not None:
                self.at = at
            if fields:
                self.fields = dict(fields)
            self.dirty = True
            if time.monotonic() - self.flushed >= FLUSH_SECONDS:
                self._write()
            elif self.flusher is None:
                self.flusher = threading.Thread(target=self._flush_later, name="progress-flush", daemon=True)
                self.flusher.start()

    def flush(self) -> None:
        with self.lock:
            if self.dirty and self.reachable:
                self._write()

    def _flush_later(self) -> None:
        while self.reachable and _outbox is self:
            time.sleep(FLUSH_SECONDS)
            self.flush()

    def _write(self) -> None:
        state = {"done": self.done, "at": self.at, "fields": self.fields, "time": time.time()}
        scratch = f"{self.path}.tmp"
        try:
            with open(scratch, "w", encoding="utf-8") as handle:
                json.dump(state, handle)
            os.replace(scratch, self.path)
        except OSError:  # the display closed and its spool is gone
            self.reachable = False
        self.dirty, self.flushed = False, time.monotonic()


def _flush_own() -> None:
    """Writes what this process reported and has not written yet."""
    if _outbox is not None and _outbox.pid == os.getpid():
        _outbox.flush()


atexit.register(_flush_own)


# ---------------------------------------------------------------------------------------------
# The display side


class _Bar(tqdm):
    """tqdm's bar with the display's rate (counted from the first report, not from the start)."""

    measured_rate: Optional[float] = None

    @property
    def format_dict(self) -> dict:
        return {**super().format_dict, "rate": self.measured_rate}


class _Display:
    """Reads the spool every POLL_SECONDS on a thread of its own and shows what it found.

    The rate counts from the first report read to the total's, so neither a slow start (a
    pipeline's set-up), work done before (a resumed training's steps) nor the work after the
    counted part (writing shards) is in it."""

    def __init__(self, name: str, total: int, unit: str, stream: TextIO, bar: bool, every: float, spool: str):
        self.name, self.total, self.unit, self.stream, self.every, self.spool = name, total, unit, stream, every, spool
        self.started = self.last_line = time.monotonic()
        self.done, self.fields = 0, {}
        self.shown: Optional[tuple[int, dict]] = None  # (done, fields) as the last line showed them
        self.first: Optional[tuple[float, int]] = None  # (when, done) at the first report read
        self.reached: Optional[float] = None  # when done first reached the total (the rate stops there)
        self.bar = _Bar(total=total, unit=unit, desc=name, file=stream, dynamic_ncols=True) if bar else None
        self.stop = threading.Event()
        self.poller = threading.Thread(target=self._poll, name=f"progress-{name}", daemon=True)
        self.poller.start()

    def close(self) -> None:
        self.stop.set()
        self.poller.join()
        _flush_own()
        self._read_spool()
        deadline = time.monotonic() + 2 * FLUSH_SECONDS
        while self.done < self.total and time.monotonic() < deadline:  # other processes' last writes
            time.sleep(POLL_SECONDS / 5)
            self._read_spool()
        if self.bar is not None:
            self._show_bar()
            self.bar.close()
        elif self.shown != (self.done, self.fields):  # else the last periodic line said it all
            self._write_line()

    def _poll(self) -> None:
        while not self.stop.wait(POLL_SECONDS):
            self._read_spool()
            if self.bar is not None:
                self._show_bar()
            elif time.monotonic() - self.last_line >= self.every:
                self._write_line()

    def _read_spool(self) -> None:
        reports = []
        for entry in os.listdir(self.spool):
            if entry.endswith(".json"):
                try:
                    with open(os.path.join(self.spool, entry), encoding="utf-8") as handle:
                        reports.append(json.load(handle))
                except (OSError, ValueError):  # replaced or removed as it was read: next poll
                    continue
        if not reports:
            return
        reports.sort(key=lambda report: report["time"])
        positions = [report["at"] for report in reports if report["at"] is not None]
        self.done = sum(report["done"] for report in reports) + (positions[-1] if positions else 0)
        self.fields = next((report["fields"] for report in reversed(reports) if report["fields"]), {})
        if self.first is None:
            self.first = (time.monotonic(), self.done)
        if self.reached is None and self.done >= self.total:
            self.reached = time.monotonic()

    def _rate(self) -> Optional[float]:
        """Units per second since the first report; None until there is one to go by. Work whose
        first report read already had it all done (a short one) is timed from the display's start."""
        if self.first is None:
            return None
        since, done_then = self.first
        if self.done == done_then and self.reached is not None:
            since, done_then = self.started, 0
        seconds = (self.reached or time.monotonic()) - since
        return (self.done - done_then) / seconds if seconds > 0 and self.done > done_then else None

    def _fields_text(self) -> str:
        return ", ".join(
            f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in self.fields.items()
        )

    def _show_bar(self) -> None:
        self.bar.n, self.bar.measured_rate = self.done, self._rate()
        self.bar.set_postfix_str(self._fields_text(), refresh=False)
        self.bar.refresh()

    def _write_line(self) -> None:
        now = time.monotonic()
        rate = self._rate()
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        speed = f"{rate:.3g} {self.unit}/s" if rate else f"? {self.unit}/s"
        left = tqdm.format_interval(max(self.total - self.done, 0) / rate) if rate else "?"
        line = (
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.name}: {self.done}/{self.total} {self.unit}{percent}, "
            f"{speed}, {tqdm.format_interval(now - self.started)} elapsed, {left} left"
        )
        fields = self._fields_text()
        self.stream.write(f"{line}; {fields}\n" if fields else f"{line}\n")
        self.stream.flush()
        self.last_line, self.shown = now, (self.done, self.fields)
