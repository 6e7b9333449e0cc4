"""Reading and writing small files at any fsspec URL (a local path, gs://, s3://, memory://),
shared by every stage."""
from __future__ import annotations

import json
import os
import uuid
from typing import Optional

import fsspec


def is_local(url: str) -> bool:
    return fsspec.utils.get_protocol(url) in ("file", "local")


def absolute(url: str) -> str:
    """A local path made absolute (Ray workers run in other folders); URLs stay as they are."""
    if not is_local(url):
        return url
    path = url[len("file://") :] if url.startswith("file://") else url
    return os.path.abspath(os.path.expanduser(path))


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def read_text(url: str) -> str:
    with fsspec.open(url, "r", encoding="utf-8") as handle:
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
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)

