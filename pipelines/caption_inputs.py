"""What `showtell caption-batch --input` names, as the list of image URLs to caption (each read
with `schemas.storage.read_bytes`). Pure listing: nothing is read or decoded here.

    list_images("s3://bucket/photos/**.jpg")     # a glob (fsspec's, or gsutil's `**.jpg` for any
                                                 # depth): every file that matches, sorted
    # ["s3://bucket/photos/2024/a.jpg", "s3://bucket/photos/b.jpg", ...]
    list_images("gs://bucket/photos")            # a folder: every file under it, sorted
    list_images("runs/local/raw/zips/val2014.zip")   # a zip: every file member, sorted
    # ["zip://val2014/COCO_val2014_000000000042.jpg::runs/local/raw/zips/val2014.zip", ...]
    list_images("todo.txt")                      # a text file of URLs or paths, one per line, in
                                                 # its order (blank lines and # comments left out)

Every listed URL opens with `fsspec.open`, a zip member's too (fsspec's chained `zip://` URL), so
an output line's `path` is something a person can open again. An input that lists nothing is a
ShowtellError naming it.
"""
from __future__ import annotations

import re
import zipfile

import fsspec

from schemas.errors import ShowtellError
from schemas.storage import exists

ZIP_SUFFIX = ".zip"  # --input ending so: the zip's members
LIST_SUFFIX = ".txt"  # --input ending so: a text file of URLs
GLOB_CHARACTERS = "*?["  # fsspec's glob syntax, `**` for any depth


def list_images(source: str) -> list[str]:
    """The URLs `source` names (see the module docstring); ShowtellError when it is missing or
    names no file."""
    if not any(character in source for character in GLOB_CHARACTERS) and not exists(source):
        raise ShowtellError(f"--input {source}: not found")
    lowered = source.lower()
    if lowered.endswith(ZIP_SUFFIX):
        urls = _zip_members(source)
    elif lowered.endswith(LIST_SUFFIX):
        urls = _listed(source)
    else:
        urls = _matches(source)
    if not urls:
        raise ShowtellError(f"--input {source}: no files to caption there")
    return urls


def _matches(source: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(source)
    if not any(character in source for character in GLOB_CHARACTERS):
        if not fs.isdir(path):
            return [source]  # one file
        paths = fs.find(path)
    else:
        # gsutil's `photos/**.jpg` (any depth) is fsspec's `photos/**/*.jpg`.
        pattern = re.sub(r"\*\*(?=[^/])", "**/*", path)
        paths = [match for match in fs.glob(pattern) if not fs.isdir(match)]
    return sorted(fs.unstrip_protocol(match) if "://" in source else match for match in paths)


def _zip_members(source: str) -> list[str]:
    try:
        with fsspec.open(source, "rb") as handle, zipfile.ZipFile(handle) as archive:
            members = [info.filename for info in archive.infolist() if not info.is_dir()]
    except zipfile.BadZipFile:
        raise ShowtellError(f"--input {source}: not a zip file") from None
    return [f"zip://{member}::{source}" for member in sorted(members)]


def _listed(source: str) -> list[str]:
    with fsspec.open(source, "r", encoding="utf-8") as handle:
        lines = [line.strip() for line in handle]
    return [line for line in lines if line and not line.startswith("#")]
