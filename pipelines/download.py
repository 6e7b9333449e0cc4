"""`showtell download`: mirror MSCOCO's three files from `data.source` to `data.mirror` with fsspec.

Sources and mirrors are local paths or any fsspec URL (file://, http(s)://, gs://, s3://, ...).
Each file is streamed in `download.chunk_bytes` chunks into `<dest>.partial`, hashed on the way,
verified (size, and a checksum where one is known) and only then moved to `<dest>`, so a partial
file never sits at the final path. A dropped connection, a timeout or a 5xx reopens the source at
the current offset (HTTP `Range: bytes=N-`) after an exponential backoff; a 4xx is final. A local
mirror's `<dest>.partial` left by a killed run is resumed from its size by the next run. After
verification `<dest>.verified.json` records what was mirrored, so a later run skips the file while
the source's size and version (ETag, else modification time) still match. Which failures are
retried, and how, is pipelines/retries.py's policy; `source: sample` is pipelines/sample_data.py's.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import posixpath
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Iterator, Optional

import aiohttp
import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol

from pipelines.retries import IncompleteRead, SourceNotFoundError, with_retries
from pipelines.sample_data import ensure_sample_data
from schemas import progress
from schemas.config import MSCOCO_FILES, Config, Download, join_url
from schemas.errors import ShowtellError
from schemas.storage import exists, read_json_object, remove, write_text

log = logging.getLogger("showtell.download")

_HASHES = ("sha256", "md5")  # computed while streaming; sha256 is recorded, md5 matches stores' MD5s
_PARTIAL = ".partial"  # `<dest>.partial`: the file while it streams in, before it is verified
_SIDECAR = ".verified.json"  # `<dest>.verified.json`: what was mirrored, from where, at which version


@dataclass(frozen=True)
class MirrorResult:
    """What happened to one mirrored file."""

    relpath: str  # the file's path relative to the source and the mirror
    dest: str  # where the verified file now is
    action: str  # "downloaded", "resumed" (a partial from an earlier run), "skipped" or "generated"
    size: int  # bytes in the file
    sha256: Optional[str]  # hex SHA-256 of the file's bytes, where known


@dataclass(frozen=True)
class _SourceInfo:
    """What the source store says about a file, from `fs.info`."""

    size: Optional[int]
    etag: Optional[str]
    mtime: Optional[str]
    md5: Optional[str]  # the store's own MD5 of the content, as hex


@dataclass(frozen=True)
class _Location:
    """A file as fsspec sees it: its filesystem, the path within it, and the URL the user gave."""

    fs: fsspec.AbstractFileSystem
    path: str
    url: str

    def suffixed(self, suffix: str) -> "_Location":
        """The file next to this one whose name is this one's plus `suffix` (".partial", ...)."""
        return _Location(self.fs, self.path + suffix, self.url + suffix)


def mirror_dataset(config: Config) -> list[MirrorResult]:
    """Mirrors MSCOCO's three files from `config.data.source` to `config.data.mirror`.

    `source: sample` generates the sample set into the mirror instead (once per sample setting).
    """
    data = config.data
    if data.source == "sample":
        action, files = ensure_sample_data(data.mirror, data.sample)
        return [
            MirrorResult(relpath, join_url(data.mirror, relpath), action, **files[relpath]) for relpath in MSCOCO_FILES
        ]
    unknown = sorted(set(data.checksums) - set(MSCOCO_FILES))
    if unknown:
        raise ShowtellError(f"data.checksums: unknown file(s) {unknown}; the files are {list(MSCOCO_FILES)}")
    results = []
    for relpath in MSCOCO_FILES:
        result = mirror_file(
            join_url(data.source, relpath),
            join_url(data.mirror, relpath),
            data.download,
            expected_checksum=data.checksums.get(relpath),
        )
        results.append(replace(result, relpath=relpath))
    return results


def mirror_file(
    source_url: str,
    dest_url: str,
    settings: Download,
    expected_checksum: str | None = None,
) -> MirrorResult:
    """Copies one file from `source_url` to `dest_url`, verified, resumable and atomic.

    `expected_checksum` is "sha256:<hex>" or "md5:<hex>". Raises ShowtellError naming the file on
    a missing source, an HTTP 4xx, a size or checksum mismatch, or when retries run out.
    """
    expected = _parse_checksum(expected_checksum, source_url)
    src = _Location(*url_to_fs(source_url, **_source_options(source_url, settings)), source_url)
    dst = _Location(*url_to_fs(dest_url), dest_url)
    try:
        info = with_retries(lambda: _source_info(src), settings, source_url)
        record = _verified_record(dst, info, expected)
        if record is None:
            return _download(src, dst, info, settings, expected)
    except SourceNotFoundError:
        remove(dst.suffixed(_PARTIAL).url)  # a partial of a file that is gone is worth nothing
        raise
    log.info("skipped %s: %s already verified (%d bytes)", source_url, dest_url, record["size"])
    return MirrorResult(posixpath.basename(dst.path), dest_url, "skipped", record["size"], record["sha256"])


def _download(
    src: _Location,
    dst: _Location,
    info: _SourceInfo,
    settings: Download,
    expected: Optional[tuple[str, str]],
) -> MirrorResult:
    """Streams the source into `<dest>.partial`, verifies it and moves it to `<dest>`, with a
    progress display of the bytes written (`schemas.progress`)."""
    partial = dst.suffixed(_PARTIAL)
    remove(dst.suffixed(_SIDECAR).url)
    dst.fs.makedirs(dst.fs._parent(dst.path), exist_ok=True)
    with _PartialFile(partial, info.size, settings.chunk_bytes) as sink:
        resumed_from = sink.offset
        with progress.tracked(f"download {posixpath.basename(dst.path)}", total=info.size or 0, unit="B"):
            progress.advance(at=sink.offset)
            with_retries(
                lambda: _copy_once(src, sink, info.size, settings.chunk_bytes),
                settings,
                src.url,
                position=lambda: sink.offset,
                kept=partial.path if sink.resumable else None,
            )
        digests, size = sink.digests(), sink.offset
    _verify(partial.url, src.url, info, size, digests, expected)
    dst.fs.mv(partial.path, dst.path)
    _write_sidecar(dst, src.url, info, size, digests)
    action = "resumed" if resumed_from else "downloaded"
    log.info("%s %s -> %s (%d bytes, sha256 %s)", action, src.url, dst.url, size, digests["sha256"])
    return MirrorResult(posixpath.basename(dst.path), dst.url, action, size, digests["sha256"])


class _PartialFile:
    """`<dest>.partial` being written, with running hashes.

    On a local filesystem a partial left by an earlier run is resumed from its size and a failed
    one is kept for the next run; elsewhere (object stores cannot append) it starts afresh and a
    failed one is removed.
    """

    def __init__(self, location: _Location, size: Optional[int], chunk_bytes: int):
        self.location, self.chunk_bytes = location, chunk_bytes
        self.fs, self.path = location.fs, location.path
        self.hashes = {name: hashlib.new(name) for name in _HASHES}
        self.offset = 0
        self.resumable = isinstance(self.fs, LocalFileSystem)
        if self.resumable and self.fs.exists(self.path) and (size is None or self.fs.size(self.path) <= size):
            self._hash_existing()
            self.handle = self.fs.open(self.path, "ab")
        else:
            self.handle = self.fs.open(self.path, "wb")

    def _hash_existing(self) -> None:
        with self.fs.open(self.path, "rb") as existing:
            while chunk := existing.read(self.chunk_bytes):
                self._account(chunk)
        log.info("resuming %s from byte %d", self.path, self.offset)

    def _account(self, chunk: bytes) -> None:
        for digest in self.hashes.values():
            digest.update(chunk)
        self.offset += len(chunk)

    def write(self, chunk: bytes) -> None:
        """Appends `chunk` and hashes it."""
        self.handle.write(chunk)
        self._account(chunk)

    def restart(self) -> None:
        """Throws away what was written: the source could not resume and starts again at byte 0."""
        self.handle.close()
        self.handle = self.fs.open(self.path, "wb")
        self.hashes = {name: hashlib.new(name) for name in _HASHES}
        self.offset = 0

    def digests(self) -> dict[str, str]:
        """Hex digests of everything written so far, by algorithm name."""
        return {name: digest.hexdigest() for name, digest in self.hashes.items()}

    def __enter__(self) -> "_PartialFile":
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        self.handle.close()
        if exc_type is not None and not self.resumable:
            remove(self.location.url)


def _copy_once(src: _Location, sink: _PartialFile, size: Optional[int], chunk_bytes: int) -> None:
    """One attempt: opens the source at `sink.offset` and streams it to the end into `sink`."""
    if size is not None and sink.offset == size:
        return
    with _open_source(src, sink.offset, size, chunk_bytes) as (stream, start):
        if start != sink.offset:
            log.warning("%s: the server ignored the Range request; restarting from byte 0", src.url)
            sink.restart()
        while chunk := stream.read(chunk_bytes):
            sink.write(chunk)
            progress.advance(at=sink.offset)
    if size is not None and sink.offset < size:
        raise IncompleteRead(f"the stream ended after {sink.offset} of {size} bytes")


@contextmanager
def _open_source(src: _Location, offset: int, size: Optional[int], chunk_bytes: int) -> Iterator[tuple[BinaryIO, int]]:
    """Opens the source for streaming from `offset`; yields the stream and the offset it really starts at.

    HTTP asks for `Range: bytes=N-`; a server that answers 200 instead of 206 starts at 0.
    """
    if _is_http(src.url):
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        # block_size=0: a streaming file whose `.r` is the aiohttp response; size= skips a HEAD.
        with src.fs.open(src.path, "rb", block_size=0, size=size, headers=headers) as stream:
            yield stream, _response_start(stream.r, src.url, offset)
    else:
        with src.fs.open(src.path, "rb", block_size=chunk_bytes) as stream:
            stream.seek(offset)
            yield stream, offset


def _response_start(response: aiohttp.ClientResponse, url: str, offset: int) -> int:
    """The byte offset an HTTP response body starts at: Content-Range's start for a 206, else 0."""
    if response.status != 206:
        return 0
    content_range = response.headers.get("Content-Range", "")
    try:
        start = int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        raise ShowtellError(f"{url}: 206 response with an unreadable Content-Range {content_range!r}") from None
    if start != offset:
        raise ShowtellError(f"{url}: asked for bytes from {offset}, the server sent them from {start}")
    return start


def _source_info(src: _Location) -> _SourceInfo:
    """Size, version and the store's MD5 of a source file (HTTP: a HEAD request)."""
    info = src.fs.info(src.path)
    if info.get("type") == "directory":
        raise ShowtellError(f"{src.url}: is a directory, expected a file")
    etag = info.get("ETag") or info.get("etag")
    mtime = info.get("Last-Modified") or info.get("LastModified") or info.get("updated") or info.get("mtime")
    size = info.get("size")
    return _SourceInfo(
        size=int(size) if size is not None else None,
        etag=str(etag) if etag else None,
        mtime=str(mtime) if mtime is not None else None,
        md5=_store_md5(info, src.fs),
    )


def _store_md5(info: dict[str, Any], fs: fsspec.AbstractFileSystem) -> Optional[str]:
    """The store's own MD5 as hex: GCS `md5Hash`, HTTP `Content-MD5` (base64), or an S3 ETag without '-'."""
    encoded = info.get("md5Hash") or info.get("Content-MD5")
    if encoded:
        try:
            return base64.b64decode(encoded, validate=True).hex()
        except (binascii.Error, ValueError):
            return None
    etag = str(info.get("ETag") or "").strip('"')
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "s3" in protocols and len(etag) == 32 and "-" not in etag:
        return etag.lower()
    return None


def _parse_checksum(text: Optional[str], url: str) -> Optional[tuple[str, str]]:
    """"sha256:<hex>" / "md5:<hex>" -> (algorithm, lower-case hex); None stays None."""
    if text is None:
        return None
    algorithm, _, digest = text.partition(":")
    algorithm, digest = algorithm.strip().lower(), digest.strip().lower()
    lengths = {"sha256": 64, "md5": 32}
    well_formed = algorithm in lengths and len(digest) == lengths[algorithm]
    if not well_formed or any(c not in "0123456789abcdef" for c in digest):
        raise ShowtellError(f"{url}: checksum {text!r} is not 'sha256:<64 hex>' or 'md5:<32 hex>'")
    return algorithm, digest


def _verify(
    partial_url: str,
    url: str,
    info: _SourceInfo,
    size: int,
    digests: dict[str, str],
    expected: Optional[tuple[str, str]],
) -> None:
    """Checks size, the configured checksum and the store's MD5; removes the partial on a mismatch."""
    problems = []
    if info.size is not None and size != info.size:
        problems.append(f"size mismatch: the source reports {info.size} bytes, got {size}")
    if expected is not None and digests[expected[0]] != expected[1]:
        problems.append(f"{expected[0]} mismatch: data.checksums says {expected[1]}, got {digests[expected[0]]}")
    if info.md5 is not None and digests["md5"] != info.md5:
        problems.append(f"md5 mismatch: the store says {info.md5}, got {digests['md5']}")
    if problems:
        remove(partial_url)
        raise ShowtellError(f"{url}: {'; '.join(problems)}; nothing was written to the mirror")


def _verified_record(
    dst: _Location, info: _SourceInfo, expected: Optional[tuple[str, str]]
) -> Optional[dict[str, Any]]:
    """The sidecar of an already-mirrored file when it still matches the source, else None.

    It matches when the mirrored file still has the recorded size, the source has that size too,
    the source's ETag (else its modification time) is the recorded one, and a configured checksum
    is the recorded digest.
    """
    record = read_json_object(dst.suffixed(_SIDECAR).url)
    if record is None or not exists(dst.url):
        return None
    dest_size = dst.fs.size(dst.path)
    matches = [
        record.get("size") == dest_size,
        info.size is None or record.get("size") == info.size,
        record.get("etag") == info.etag if info.etag else (info.mtime is None or record.get("mtime") == info.mtime),
        expected is None or record.get(expected[0]) == expected[1],
    ]
    return record if all(matches) else None


def _write_sidecar(dst: _Location, src_url: str, info: _SourceInfo, size: int, digests: dict[str, str]) -> None:
    """Records a verified file next to it: `<dest>.verified.json`."""
    record = {"size": size, **digests, "source": src_url, "etag": info.etag, "mtime": info.mtime}
    write_text(dst.suffixed(_SIDECAR).url, json.dumps(record, indent=2))


def _source_options(url: str, settings: Download) -> dict[str, Any]:
    """fsspec storage options for a source: HTTP gets `download.timeout_seconds` as its socket timeouts."""
    if not _is_http(url):
        return {}
    seconds = settings.timeout_seconds
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds)
    return {"client_kwargs": {"timeout": timeout}}


def _is_http(url: str) -> bool:
    return get_protocol(url) in ("http", "https")
