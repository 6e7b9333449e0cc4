"""A bounded local cache of remote shards: the next shards download in a background thread while
the current ones are read, and each is deleted once read (`train.shard_cache`).

TensorFlow 2.21's file layer has no s3:// (and tensorflow-io no build for it), so a shard on an
object store is read through fsspec into a local file, which `tf.data.TFRecordDataset` then reads
at local-disk speed:

    shards = stat_shards(["s3://bucket/data/train-00000-of-00256", ...])   # sizes, one listing
    cache = ShardCache(iter(shards), folder="/tmp", max_bytes=2 << 30)
    path = cache.path(0)         # blocks until the first shard (in the order given) is on disk
    ...                          # read it
    cache.release(path)          # deleted: room for the next download
    cache.close()                # stops the download thread, removes the folder

The shards on disk (downloaded, downloading and not yet released) never add up to more than
`max_bytes`; a shard larger than that is an error before anything downloads.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
import threading
from typing import Iterator, Optional, Sequence

import fsspec

from schemas.errors import ShowtellError, first_line
from schemas.storage import fresh_fs, is_local

MAX_BYTES_KEY = "train.shard_cache.max_bytes"


@dataclasses.dataclass(frozen=True)
class Shard:
    url: str  # as given: a local path or any fsspec URL
    size: int  # bytes, from the store's listing


def stat_shards(urls: Sequence[str]) -> list[Shard]:
    """Each shard with its size, from one listing per folder (not one request per shard);
    ShowtellError naming the URL when a shard is missing or its folder cannot be read."""
    listings: dict[str, dict[str, int]] = {}
    shards = []
    for url in urls:
        folder, _, name = url.rstrip("/").rpartition("/")
        if folder not in listings:
            try:
                fs, path = fresh_fs(folder)
                listings[folder] = {
                    entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry.get("size") or 0)
                    for entry in fs.ls(path, detail=True)
                    if entry.get("type") == "file"
                }
            except FileNotFoundError:
                listings[folder] = {}
            except (OSError, ValueError) as error:  # refused credentials, unreachable endpoint, bad bucket name
                raise ShowtellError(f"cannot read {url}: {first_line(error)}") from None
        if name not in listings[folder]:
            raise ShowtellError(f"cannot read {url}: no such shard")
        shards.append(Shard(url, listings[folder][name]))
    return shards


def check_bound(shards: Sequence[Shard], max_bytes: int, at_once: int) -> None:
    """ShowtellError naming `train.shard_cache.max_bytes` when it cannot hold the `at_once` shards
    read together plus the next one, at the largest shard's size (reading would stall forever)."""
    largest = max((shard.size for shard in shards), default=0)
    needed = (at_once + 1) * largest
    if needed > max_bytes:
        raise ShowtellError(
            f"{MAX_BYTES_KEY} is {max_bytes:,} bytes, less than the {at_once + 1} shards a reader holds at once "
            f"({at_once} read together and the next one) at up to {largest:,} bytes each: set it to at least {needed:,}"
        )


_process_high_water = [0]  # the most bytes any cache of this process has held on disk


def process_high_water_bytes() -> int:
    """The most bytes one shard cache of this process has held on disk (measured), for benchmarks."""
    return _process_high_water[0]


# The caches open in this process, by folder: `release_path` finds a path's cache here (tf.data
# calls it through tf.py_function with the path alone). A cache whose reader stopped short without
# closing it (an evaluation iterator dropped half read) goes at exit.
_OPEN: dict[str, "ShardCache"] = {}
_OPEN_LOCK = threading.Lock()


@atexit.register
def _remove_open_folders() -> None:
    for folder in list(_OPEN):
        shutil.rmtree(folder, ignore_errors=True)


class ShardCache:
    """Downloads `shards` in order into a fresh folder under `folder` (null: the temp folder),
    holding at most `max_bytes` of them on disk; `path(n)` is the n-th one's local file."""

    def __init__(self, shards: Iterator[Shard], folder: Optional[str], max_bytes: int):
        self.max_bytes = max_bytes
        self.folder = tempfile.mkdtemp(prefix=f"showtell-shards-{os.getpid()}-", dir=folder)
        self.high_water_bytes = 0  # the most bytes ever found in the folder (measured, partial files included)
        self._shards = shards
        self._held: dict[str, int] = {}  # local path -> bytes, from reservation to release
        self._paths: dict[int, str] = {}  # downloaded and not yet asked for: order number -> local path
        self._changed = threading.Condition()
        self._error: Optional[ShowtellError] = None  # the download that failed; no more follow it
        self._downloaded = 0  # shards downloaded so far
        self._all_downloaded = False
        self._stopped = False
        self._close_when_read = False
        with _OPEN_LOCK:
            _OPEN[self.folder] = self
        self._thread = threading.Thread(target=self._download_all, name="showtell-shard-cache", daemon=True)
        self._thread.start()

    def path(self, number: int) -> str:
        """The local file of the shard `number` (0, 1, ... in the order given), once it is on disk.
        ShowtellError naming the URL when it (or one before it) failed to download; IndexError
        past the last shard."""
        with self._changed:
            while number not in self._paths:
                if self._error is not None:
                    raise self._error
                if self._stopped or (self._all_downloaded and number >= self._downloaded):
                    raise IndexError(f"no shard {number} in {self.folder}")
                self._changed.wait()
            return self._paths.pop(number)

    def release(self, path: str) -> None:
        """`path` was read to its end: deletes it, making room for the next download (and, after
        `close_when_read`, the last one removes the folder)."""
        with self._changed:
            if self._held.pop(path, None) is None:
                return
            os.remove(path)
            self._measure()
            self._changed.notify_all()
        self._close_if_read()

    def close_when_read(self) -> None:
        """Every shard has been asked for: `close` once all are downloaded and released (the last
        ones are still being read, so the folder cannot go yet)."""
        with self._changed:
            self._close_when_read = True
        self._close_if_read()

    def _close_if_read(self) -> None:
        with self._changed:
            done = self._close_when_read and self._all_downloaded and not self._held
        if done:
            self.close()

    def close(self) -> None:
        """Stops downloading (after the shard in flight, if any) and removes the folder."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        with _OPEN_LOCK:
            _OPEN.pop(self.folder, None)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _measure(self) -> None:
        """Updates the high-water mark from what is in the folder now (called with the lock held)."""
        try:
            on_disk = sum(entry.stat().st_size for entry in os.scandir(self.folder) if entry.is_file())
        except FileNotFoundError:  # closed
            return
        self.high_water_bytes = max(self.high_water_bytes, on_disk)
        _process_high_water[0] = max(_process_high_water[0], on_disk)

    def _download_all(self) -> None:
        shard = None
        try:
            for number, shard in enumerate(self._shards):
                path = self._reserve(shard, number)
                if path is None:
                    return
                self._download(shard, path)
                with self._changed:
                    self._measure()
                    self._paths[number] = path
                    self._downloaded = number + 1
                    self._changed.notify_all()
        except Exception as error:  # noqa: BLE001 - handed to the reader, which raises it
            failure = error if isinstance(error, ShowtellError) else None
            url = shard.url if shard is not None else self.folder
            with self._changed:
                self._error = failure or ShowtellError(f"cannot read {url}: {first_line(error)}")
                self._changed.notify_all()
            return
        with self._changed:
            self._all_downloaded = True
            self._changed.notify_all()
        self._close_if_read()

    def _reserve(self, shard: Shard, number: int) -> Optional[str]:
        """Waits until `shard` fits beside the shards held; its local path (None once closed)."""
        with self._changed:
            while not self._stopped and self._held and sum(self._held.values()) + shard.size > self.max_bytes:
                self._changed.wait()
            if self._stopped:
                return None
            name = shard.url.rstrip("/").rsplit("/", 1)[-1]
            path = os.path.join(self.folder, f"{number:09d}-{name}")
            self._held[path] = shard.size
            return path

    def _download(self, shard: Shard, path: str) -> None:
        fs, remote = fsspec.core.url_to_fs(shard.url)
        partial = f"{path}.partial"
        try:
            fs.get_file(remote, partial)
        except FileNotFoundError:
            raise ShowtellError(f"cannot read {shard.url}: no such shard") from None
        os.replace(partial, path)


def wait_path(folder: bytes | str, number: int) -> str:
    """The local file of shard `number` of the cache in `folder` (from tf.data, through
    tf.py_function), once it is downloaded."""
    folder = folder.decode() if isinstance(folder, bytes) else folder
    with _OPEN_LOCK:
        cache = _OPEN.get(folder)
    if cache is None:
        raise ShowtellError(f"shard cache {folder} is closed")
    return cache.path(number)


def release_path(path: bytes | str) -> bool:
    """Releases a cached shard by its local path (from tf.data, through tf.py_function); False,
    for `Dataset.filter` to drop the end-of-shard marker that carried it."""
    path = path.decode() if isinstance(path, bytes) else path
    with _OPEN_LOCK:
        cache = _OPEN.get(os.path.dirname(path))
    if cache is not None:
        cache.release(path)
    return False


def all_local(urls: Sequence[str]) -> bool:
    return all(is_local(url) for url in urls)
