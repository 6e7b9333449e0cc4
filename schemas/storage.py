"""Reading and writing small files at any fsspec URL (a local path, gs://, s3://, memory://),
reading an image file under a byte limit (`read_bytes`), and publishing whole folders, shared by
every stage.

Publishing a folder atomically is the project's central promise: data/, final/, eval/, an export
and a promoted model are each either the old folder or the new one, never a mix, whatever kills
the process. `publish_dir` is the one way to do it:

    with publish_dir("runs/x/eval", marker="report.json") as staging:
        write_text(join_url(staging, "report.json"), text)      # ... and the rest of the folder
    # runs/x/eval/ is now the new folder; had the block raised, it would be the old one
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from typing import Iterator, Optional

import fsspec

from schemas.errors import ShowtellError


def is_local(url: str) -> bool:
    return fsspec.utils.get_protocol(url) in ("file", "local")


def absolute(url: str) -> str:
    """A local path made absolute (Ray workers run in other folders); URLs stay as they are."""
    if not is_local(url):
        return url
    path = url[len("file://") :] if url.startswith("file://") else url
    return os.path.abspath(os.path.expanduser(path))


def fresh_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system and path of `url`, with what it cached about the path dropped.

    fsspec keeps one file system per store and process, and object stores' (s3fs, gcsfs) cache
    folder listings, from which they answer `exists` and the size an open file reads to. A file
    another process wrote since (a Beam worker, another `showtell` run) could then look missing,
    or read cut short; every call here that asks about a path the store shares asks afresh.
    """
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)
    return fs, path


def exists(url: str) -> bool:
    fs, path = fresh_fs(url)
    return fs.exists(path)


def read_text(url: str) -> str:
    fs, path = fresh_fs(url)
    with fs.open(path, "r", encoding="utf-8") as handle:
        return handle.read()


def write_text(url: str, text: str) -> None:
    """Writes a whole small file; on a local disk through a temp file + rename, so readers never
    see a half-written one (object stores publish an object only when it is complete)."""
    if is_local(url):
        path = absolute(url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, path)
        return
    with fsspec.open(url, "w", encoding="utf-8") as handle:
        handle.write(text)


def read_json(url: str) -> Optional[dict]:
    """The JSON document at `url`, or None when there is none."""
    if not exists(url):
        return None
    return json.loads(read_text(url))


def remove(url: str) -> None:
    """Removes a file or a folder tree, if there is one."""
    fs, path = fresh_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def replace_dir(source: str, dest: str, marker: Optional[str] = None) -> None:
    """Puts folder `source` in the place of folder `dest`.

    On a local disk by renames: an old `dest` steps aside first, so `dest` is never missing
    and never a mix. On object stores, where a folder "rename" is copy + delete, the old `dest`
    is removed and `source` copied file by file with `marker` (a file name) last, so its
    presence marks a complete `dest`. The caller removes what is left of `source`.
    """
    fs, source_path = fresh_fs(source)
    _, dest_path = fresh_fs(dest)
    if is_local(source):
        old = None
        if os.path.exists(dest_path):
            old = f"{dest_path}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dest_path, old)
        os.replace(source_path, dest_path)
        if old:
            fs.rm(old, recursive=True)
        return
    if fs.exists(dest_path):
        fs.rm(dest_path, recursive=True)
    files = sorted(fs.find(source_path), key=lambda path: marker is not None and path.endswith(f"/{marker}"))
    for path in files:
        fs.copy(path, dest_path + path[len(source_path.rstrip("/")) :])


@contextmanager
def publish_dir(dest: str, marker: Optional[str] = None) -> Iterator[str]:
    """Yields an empty staging folder, `<dest>.staging-<id>` beside `dest`, to write the new folder
    into; when the block ends without an error, the staging folder takes the place of `dest`
    (`replace_dir`, `marker` last on object stores). Whether the block succeeds or raises, no
    staging folder is left behind, and on an error `dest` is as it was.

    A process killed inside the block leaves `dest` as it was too, and its staging folder behind
    (nothing runs after SIGKILL): it is never read, and its name says what it is.
    """
    dest = absolute(dest)
    staging = f"{dest.rstrip('/')}.staging-{uuid.uuid4().hex[:8]}"
    fs, staging_path = fresh_fs(staging)
    fs.makedirs(staging_path, exist_ok=True)
    try:
        yield staging
        replace_dir(staging, dest, marker=marker)
    finally:
        remove(staging)


def copy_dir(source: str, dest: str, marker: Optional[str] = None) -> None:
    """Copies every file under folder `source` to the same place under `dest`, which may be on
    another store (a local export into a gs:// models root); `marker` (a file name) goes last, so
    its presence marks a complete copy. Empty folders are not copied."""
    source_fs, source_path = fresh_fs(source)
    dest_fs, dest_path = fsspec.core.url_to_fs(dest)
    root = source_path.rstrip("/")
    files = sorted(source_fs.find(root), key=lambda path: marker is not None and path.endswith(f"/{marker}"))
    for path in files:
        target = dest_path.rstrip("/") + path[len(root) :]
        dest_fs.makedirs(dest_fs._parent(target), exist_ok=True)
        with source_fs.open(path, "rb") as reader, dest_fs.open(target, "wb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)


def read_json_object(url: str) -> Optional[dict]:
    """The JSON object at `url`, or None when there is none or what is there is not one.

    For records a run rebuilds when they are missing (a download's `.verified.json`, the sample's
    stamp): one left damaged, by hand or by an older writer, is rebuilt rather than fatal.
    """
    try:
        value = read_json(url)
    except ValueError:  # not UTF-8, or not JSON
        return None
    return value if isinstance(value, dict) else None


UNREADABLE = "unreadable"  # ImageReadError reasons: missing, a folder, a store error
TOO_LARGE = "too_large"  # over the byte limit (never read whole)


class ImageReadError(ShowtellError):
    """One listed file that could not be read: `reason` is UNREADABLE or TOO_LARGE, the message
    says why in words."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def read_bytes(url: str, max_bytes: int | None = None) -> bytes:
    """The file's bytes; ImageReadError "not found", "a folder, ...", "cannot read it (...)", or, for a
    file over `max_bytes` (None: no limit), "too large (N bytes, over the limit of M)", found before
    reading it. How `showtell caption` and `caption-batch` read the images they are given."""
    try:
        with fsspec.open(url, "rb") as handle:
            size = getattr(handle, "size", None)
            if max_bytes is None:
                return handle.read()
            if size is not None and size > max_bytes:
                raise ImageReadError(TOO_LARGE, f"too large ({size:,d} bytes, over the limit of {max_bytes:,d})")
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageReadError(UNREADABLE, "not found") from None
    except IsADirectoryError:
        raise ImageReadError(UNREADABLE, "a folder, not an image file") from None
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or error
        raise ImageReadError(UNREADABLE, f"cannot read it ({reason})") from None
    if len(data) > max_bytes:
        raise ImageReadError(TOO_LARGE, f"too large (over the limit of {max_bytes:,d} bytes)")
    return data
