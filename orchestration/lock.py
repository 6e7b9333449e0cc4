"""A lock on a folder (a run_root, a models_root) on a local disk or an object store.

    with FolderLock(run_root, stale_after=600, wait=0) as lock:
        ...                 # a heartbeat thread keeps the lock fresh meanwhile
        lock.check()        # LockLostError if another run took the lock over

The lock is the file `<folder>/.showtell.lock`, a JSON object naming its owner: run id, host,
boot id, pid, start time and heartbeat time. It is created only if absent: on a local disk with
`O_CREAT | O_EXCL`; on an object store with fsspec's `xb` mode (a conditional write on stores that
have one), or, where a store has none, by writing after an existence check. Either way the owner is
read back (after `settle` seconds on object stores) and the lock is ours only if it names us.

A lock is stale, and taken over with a warning, when its heartbeat is older than `stale_after`
seconds, or at once when its process is dead on this very host (same host name and boot id): so a
SIGKILLed run leaves a lock that the next run takes over. Heartbeats compare wall clocks, so hosts
sharing a lock on an object store need clocks within a fraction of `stale_after` of each other.

A taker-over first renames the stale lock aside (local disks) and checks that what it moved is the
lock it judged stale, putting back a fresh one it moved by mistake; on object stores it deletes the
lock only if it still holds the stale owner. Two runs taking over the same stale lock at the same
instant on an object store could both write theirs; the read-back leaves one owner, and the other
run's heartbeat finds the lock not its own and `check()` stops it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional

import fsspec

from schemas.config import join_url
from schemas.errors import ShowtellError
from schemas.storage import absolute, is_local, read_text, remove, write_text

log = logging.getLogger("showtell.lock")

LOCK_FILE = ".showtell.lock"
_UNREADABLE_RETRIES = 5  # a lock read mid-write (empty, half a JSON object) is read again this often
_RETRY_SECONDS = 0.2
_POLL_SECONDS = 1.0  # a waiting run looks at the lock this often
UNREADABLE = "unreadable"  # the run id of a lock file that cannot be read


class LockHeldError(ShowtellError):
    """Another live run holds the lock (and we were not to wait, or waited long enough)."""


class LockLostError(ShowtellError):
    """Our lock was taken over by another run (it judged ours stale)."""


@dataclasses.dataclass(frozen=True)
class LockOwner:
    """Who holds a lock, as written in the lock file."""

    run_id: str  # unique per acquisition
    host: str  # socket.gethostname()
    boot_id: str  # the kernel's boot id where there is one: same host name and boot id = same machine, same pid space
    pid: int  # the holding process
    started: str  # when the lock was taken, ISO 8601 UTC
    heartbeat: float  # last refresh, seconds since the epoch
    command: str  # what holds it, e.g. `showtell run`

    def describe(self) -> str:
        """`run 1a2b3c (showtell run, pid 123 on host, started ..., heartbeat 4 s ago)`."""
        age = time.time() - self.heartbeat
        return (
            f"run {self.run_id} ({self.command}, pid {self.pid} on {self.host}, started {self.started}, "
            f"heartbeat {age:.0f} s ago)"
        )


def lock_url(folder: str) -> str:
    """The lock file of `folder`."""
    return join_url(folder, LOCK_FILE)


def read_owner(folder: str) -> Optional[LockOwner]:
    """The owner of `folder`'s lock, or None when it is not locked. A lock file that stays
    unreadable (a writer killed between creating and filling it) is an owner with no pid whose
    heartbeat is the file's modification time."""
    url = lock_url(folder)
    for _ in range(_UNREADABLE_RETRIES):
        try:
            return LockOwner(**json.loads(read_text(url)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            time.sleep(_RETRY_SECONDS)
    fs, path = fsspec.core.url_to_fs(url)
    try:
        modified = fs.modified(path).timestamp()
    except FileNotFoundError:
        return None
    except (NotImplementedError, OSError):
        modified = 0.0  # no modification time: old enough to be stale
    return LockOwner(UNREADABLE, "unknown", "", 0, "unknown", modified, "an unreadable lock file")


def stale_reason(owner: LockOwner, stale_after: float) -> Optional[str]:
    """Why `owner`'s lock is stale, or None while it is live."""
    if owner.host == socket.gethostname() and owner.boot_id == _boot_id() and owner.pid and not _pid_alive(owner.pid):
        return f"its process {owner.pid} is not running on this host"
    age = time.time() - owner.heartbeat
    if age > stale_after:
        return f"its heartbeat is {age:.0f} s old (stale after {stale_after:.0f} s)"
    return None


class FolderLock:
    """An exclusive lock on a folder, held from `acquire` (or `with`) to `release`."""

    def __init__(
        self,
        folder: str,
        stale_after: float,
        wait: float = 0.0,
        command: str = "showtell",
        hint: str = "",
        settle: Optional[float] = None,
    ):
        """`wait`: seconds to wait for a live holder before LockHeldError; `hint`: appended to that
        error (what the user can do); `settle`: seconds between writing the lock on an object store
        and reading it back (default 1; local disks need none)."""
        if stale_after <= 0 or wait < 0:
            raise ValueError("stale_after must be > 0 and wait >= 0")
        self.folder, self.url = folder, lock_url(folder)
        self.stale_after, self.wait, self.hint = stale_after, wait, hint
        self.settle = (0.0 if is_local(folder) else 1.0) if settle is None else settle
        self.owner = LockOwner(
            run_id=uuid.uuid4().hex[:12],
            host=socket.gethostname(),
            boot_id=_boot_id(),
            pid=os.getpid(),
            started=_iso(time.time()),
            heartbeat=time.time(),
            command=command,
        )
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lost: Optional[str] = None

    @property
    def run_id(self) -> str:
        return self.owner.run_id

    # --- acquiring -----------------------------------------------------------------------------

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one and waiting up to `wait` seconds for a live
        holder; LockHeldError naming the holder when it is still held after that."""
        deadline = time.monotonic() + self.wait
        announced = False
        while True:
            self.owner = dataclasses.replace(self.owner, heartbeat=time.time())
            if self._create() and self._verify():
                break
            holder = read_owner(self.folder)
            if holder is None or holder.run_id == self.run_id:
                continue  # released meanwhile, or our write lost a race and another replaced it: try again
            reason = stale_reason(holder, self.stale_after)
            if reason:
                log.warning("taking over the stale lock on %s: %s; %s", self.folder, holder.describe(), reason)
                self._break(holder)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockHeldError(f"{self.folder} is locked by {holder.describe()}{self.hint}")
            if not announced:
                log.info(
                    "waiting up to %.0f s for the lock on %s, held by %s", self.wait, self.folder, holder.describe()
                )
                announced = True
            time.sleep(min(left, _POLL_SECONDS))
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeats, name=f"lock-heartbeat-{self.run_id}", daemon=True)
        self._thread.start()

    def _create(self) -> bool:
        """Writes our owner to the lock file if there is none; False if there is one."""
        text = json.dumps(dataclasses.asdict(self.owner), indent=1)
        if is_local(self.url):
            path = absolute(self.url)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(handle, text.encode("utf-8"))
                os.fsync(handle)
            finally:
                os.close(handle)
            return True
        fs, path = fsspec.core.url_to_fs(self.url)
        fs.makedirs(fs._parent(path), exist_ok=True)
        try:
            with fs.open(path, "xb") as handle:  # a conditional write where the store has one
                handle.write(text.encode("utf-8"))
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):  # no `x` mode here: check, then write
            if fs.exists(path):
                return False
            write_text(self.url, text)
        return True

    def _verify(self) -> bool:
        """Whether the lock file names us, read back after `settle` seconds."""
        if self.settle:
            time.sleep(self.settle)
        holder = read_owner(self.folder)
        return holder is not None and holder.run_id == self.run_id

    def _break(self, stale: LockOwner) -> None:
        """Removes `stale`'s lock file, and only that one (see the module's docstring)."""
        if not is_local(self.url):
            holder = read_owner(self.folder)
            if holder == stale:
                remove(self.url)
            return
        path = absolute(self.url)
        aside = f"{path}.stale-{self.run_id}"
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return  # another run took it over first
        moved = _read_owner_file(aside)
        if moved == stale or (moved is None and stale.run_id == UNREADABLE):
            os.remove(aside)
            return
        try:  # we moved a fresh lock that another run had just taken: put it back
            os.link(aside, path)
        except FileExistsError:
            log.warning(
                "lock on %s: a third run took it meanwhile; the run that held %s will find it lost", self.folder, aside
            )
        os.remove(aside)

    # --- holding -----------------------------------------------------------------------------

    def _heartbeats(self) -> None:
        interval = self.stale_after / 5
        while not self._stop.wait(interval):
            try:
                holder = read_owner(self.folder)
                if holder is None or holder.run_id != self.run_id:
                    self._lost = holder.describe() if holder else "nobody (the lock file was removed)"
                    log.error("lost the lock on %s: it is now held by %s", self.folder, self._lost)
                    return
                self.owner = dataclasses.replace(self.owner, heartbeat=time.time())
                write_text(self.url, json.dumps(dataclasses.asdict(self.owner), indent=1))
            except OSError as error:  # a store's hiccup: the next beat tries again
                log.warning("lock on %s: heartbeat failed (%s); retrying in %.0f s", self.folder, error, interval)

    def check(self) -> None:
        """LockLostError when another run has taken the lock over."""
        if self._lost is not None:
            raise LockLostError(f"lost the lock on {self.folder} to {self._lost}; stopping")

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = read_owner(self.folder)
        if holder is not None and holder.run_id == self.run_id:
            remove(self.url)

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _read_owner_file(path: str) -> Optional[LockOwner]:
    """The owner in a local lock file, or None if it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            return LockOwner(**json.load(handle))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): os.kill said it exists


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")
