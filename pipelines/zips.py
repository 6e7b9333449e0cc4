"""Reading members straight out of zip files at any fsspec URL, without extracting them.

Nothing is ever written under a member's name, so a hostile member such as `../../x.jpg` cannot
place a file anywhere; members are only looked up by the names the annotations imply.
"""
from __future__ import annotations

import threading
import zipfile
from typing import BinaryIO

from schemas.errors import ShowtellError
from schemas.storage import fresh_fs

# What an object store's file (s3fs, gcsfs) reads ahead of each request into a zip. Members are
# read one at a time in no particular order, so one request should cover a member's header and a
# typical image (MSCOCO's average about 160 KB) and little more; s3fs's default, 50 MiB, would
# fetch that much for every image of a 13 GB train2014.zip.
READ_AHEAD_BYTES = 1 << 20

_local = threading.local()


def _open_zip(url: str) -> zipfile.ZipFile:
    """An open ZipFile for `url`, cached per thread (a ZipFile is not safe to share across threads)."""
    cache: dict[str, zipfile.ZipFile] = _local.__dict__.setdefault("zips", {})
    if url not in cache:
        fs, path = fresh_fs(url)
        handle: BinaryIO = fs.open(path, "rb", block_size=READ_AHEAD_BYTES)
        try:
            cache[url] = zipfile.ZipFile(handle)
        except zipfile.BadZipFile as error:  # a damaged input: the user's to replace, not a crash
            handle.close()
            raise ShowtellError(
                f"{url}: not a readable zip file ({error}); replace it, or remove it and its .verified.json "
                "to have `showtell download` fetch it again"
            ) from None
    return cache[url]


def read_member(url: str, member: str) -> bytes | None:
    """The bytes of `member` in the zip at `url`, or None if the zip has no such member."""
    archive = _open_zip(url)
    try:
        info = archive.getinfo(member)
    except KeyError:
        return None
    return archive.read(info)


def member_names(url: str) -> list[str]:
    return _open_zip(url).namelist()
