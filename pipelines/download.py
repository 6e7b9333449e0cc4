"""`showtell download`: mirror MSCOCO's three files from `data.source` to `data.mirror` with fsspec.

Sources and mirrors are local paths or any fsspec URL (file://, http(s)://, gs://, s3://, ...).
Each file is streamed in `download.chunk_bytes` chunks into `<dest>.partial`, hashed on the way,
verified (size, and a checksum where one is known) and only then moved to `<dest>`, so a partial
file never sits at the final path. A dropped connection, a timeout or a 5xx reopens the source at
the current offset (HTTP `Range: bytes=N-`) after an exponential backoff; a 4xx is final. A local
mirror's `<dest>.partial` left by a killed run is resumed from its size by the next run. After
verification `<dest>.verified.json` records what was mirrored, so a later run skips the file while
the source's size and version (ETag, else modification time) still match.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Callable, Iterator, Optional, TypeVar

import aiohttp
import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol
from tqdm import tqdm

from schemas.config import MSCOCO_FILES, Config, Download, join_url
from schemas.errors import ShowtellError

log = logging.getLogger("showtell.download")

T = TypeVar("T")
_HASHES = ("sha256", "md5")  # computed while streaming; sha256 is recorded, md5 matches stores' MD5s
_RETRIED_4XX = (408, 429)  # client-error statuses that mean "try again later"


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


class SourceNotFoundError(ShowtellError):
    """The source file does not exist (e.g. HTTP 404): retrying will not help."""


class _IncompleteRead(ConnectionError):
    """The source stream ended before the size the store reported: treated as a dropped connection."""


def mirror_dataset(config: Config, progress: bool = False) -> list[MirrorResult]:
    """Mirrors MSCOCO's three files from `config.data.source` to `config.data.mirror`.

    `source: sample` generates the sample set into the mirror instead (once per sample setting).
    """
    data = config.data
    mirror = data.mirror or join_url(config.run_root, "raw")
    if data.source == "sample":
        return _mirror_sample(config, mirror)
    unknown = sorted(set(data.checksums) - set(MSCOCO_FILES))
    if unknown:
        raise ShowtellError(f"data.checksums: unknown file(s) {unknown}; the files are {list(MSCOCO_FILES)}")
    results = []
    for relpath in MSCOCO_FILES:
        result = mirror_file(
            join_url(data.source, relpath),
            join_url(mirror, relpath),
            data.download,
            expected_checksum=data.checksums.get(relpath),
            progress=progress,
        )
        results.append(replace(result, relpath=relpath))
    return results


def mirror_file(
    source_url: str,
    dest_url: str,
    settings: Download,
    expected_checksum: str | None = None,
    progress: bool = False,
) -> MirrorResult:
    """Copies one file from `source_url` to `dest_url`, verified, resumable and atomic.

    `expected_checksum` is "sha256:<hex>" or "md5:<hex>". Raises ShowtellError naming the file on
    a missing source, an HTTP 4xx, a size or checksum mismatch, or when retries run out.
    """
    expected = _parse_checksum(expected_checksum, source_url)
    src = _Location(*url_to_fs(source_url, **_source_options(source_url, settings)), source_url)
    dst = _Location(*url_to_fs(dest_url), dest_url)
    try:
        info = _with_retries(lambda: _source_info(src), settings, source_url)
        record = _verified_record(dst, info, expected)
        if record is None:
            return _download(src, dst, info, settings, expected, progress)
    except SourceNotFoundError:
        _remove(dst.fs, dst.path + ".partial")  # a partial of a file that is gone is worth nothing
        raise
    if not progress:
        log.info("skipped %s: %s already verified (%d bytes)", source_url, dest_url, record["size"])
    return MirrorResult(_basename(dst.path), dest_url, "skipped", record["size"], record["sha256"])


def _download(
    src: _Location,
    dst: _Location,
    info: _SourceInfo,
    settings: Download,
    expected: Optional[tuple[str, str]],
    progress: bool,
) -> MirrorResult:
    """Streams the source into `<dest>.partial`, verifies it and moves it to `<dest>`."""
    partial = dst.path + ".partial"
    _remove(dst.fs, _sidecar_path(dst.path))
    dst.fs.makedirs(dst.fs._parent(dst.path), exist_ok=True)
    with _PartialFile(dst.fs, partial, info.size, settings.chunk_bytes) as sink:
        resumed_from = sink.offset
        bar = tqdm(
            total=info.size,
            initial=sink.offset,
            unit="B",
            unit_scale=True,
            desc=_basename(dst.path),
            disable=not progress,
        )
        with bar:
            _with_retries(
                lambda: _copy_once(src, sink, info.size, settings.chunk_bytes, bar),
                settings,
                src.url,
                position=lambda: sink.offset,
                kept=partial if sink.resumable else None,
            )
        digests, size = sink.digests(), sink.offset
    _verify(dst.fs, partial, src.url, info, size, digests, expected)
    dst.fs.mv(partial, dst.path)
    _write_sidecar(dst, src.url, info, size, digests)
    action = "resumed" if resumed_from else "downloaded"
    if not progress:
        log.info("%s %s -> %s (%d bytes, sha256 %s)", action, src.url, dst.url, size, digests["sha256"])
    return MirrorResult(_basename(dst.path), dst.url, action, size, digests["sha256"])


class _PartialFile:
    """`<dest>.partial` being written, with running hashes.

    On a local filesystem a partial left by an earlier run is resumed from its size and a failed
    one is kept for the next run; elsewhere (object stores cannot append) it starts afresh and a
    failed one is removed.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, size: Optional[int], chunk_bytes: int):
        self.fs, self.path, self.chunk_bytes = fs, path, chunk_bytes
        self.hashes = {name: hashlib.new(name) for name in _HASHES}
        self.offset = 0
        self.resumable = isinstance(fs, LocalFileSystem)
        if self.resumable and fs.exists(path) and (size is None or fs.size(path) <= size):
            self._hash_existing()
            self.handle = fs.open(path, "ab")
        else:
            self.handle = fs.open(path, "wb")

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
            _remove(self.fs, self.path)


def _copy_once(src: _Location, sink: _PartialFile, size: Optional[int], chunk_bytes: int, bar: tqdm) -> None:
    """One attempt: opens the source at `sink.offset` and streams it to the end into `sink`."""
    if size is not None and sink.offset == size:
        return
    with _open_source(src, sink.offset, size, chunk_bytes) as (stream, start):
        if start != sink.offset:
            log.warning("%s: the server ignored the Range request; restarting from byte 0", src.url)
            sink.restart()
            bar.reset(total=size)
        while chunk := stream.read(chunk_bytes):
            sink.write(chunk)
            bar.update(len(chunk))
    if size is not None and sink.offset < size:
        raise _IncompleteRead(f"the stream ended after {sink.offset} of {size} bytes")


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


def _with_retries(
    action: Callable[[], T],
    settings: Download,
    url: str,
    position: Callable[[], int] = lambda: 0,
    kept: Optional[str] = None,
) -> T:
    """Runs `action`, retrying transient failures with exponential backoff.

    Failures count from the last one after which `position()` moved on, so a long download that
    keeps making progress is not cut short by drops spread over hours.
    """
    failures, last_position = 0, position()
    while True:
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - classified below; non-transient errors re-raise
            if not _is_transient(error):
                user_error = _user_error(error, url)
                if user_error is error:
                    raise
                raise user_error from error
            if position() != last_position:
                failures, last_position = 0, position()
            if failures >= settings.retries:
                note = f"; {kept} is kept for the next run to resume" if kept else ""
                raise ShowtellError(
                    f"{url}: giving up after {failures + 1} failed attempt(s) in a row: {_describe(error)}{note}"
                ) from error
            delay = settings.backoff_seconds * 2**failures
            failures += 1
            resume = f" from byte {position()}" if position() else ""
            log.warning(
                "%s: %s; retry %d of %d%s in %.2fs", url, _describe(error), failures, settings.retries, resume, delay
            )
            time.sleep(delay)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and its causes, outermost first."""
    seen: set[int] = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _response_error(error: BaseException) -> Optional[aiohttp.ClientResponseError]:
    """The HTTP error response behind `error` (fsspec wraps some in FileNotFoundError), if there is one."""
    return next((item for item in _chain(error) if isinstance(item, aiohttp.ClientResponseError)), None)


def _http_status(error: BaseException) -> Optional[int]:
    """The HTTP status behind `error`, if there is one."""
    response = _response_error(error)
    return response.status if response is not None else None


def _is_transient(error: BaseException) -> bool:
    """A 5xx, 408, 429, timeout or dropped/refused connection: worth another attempt."""
    if isinstance(error, ShowtellError):
        return False
    status = _http_status(error)
    if status is not None:
        return status >= 500 or status in _RETRIED_4XX
    return any(isinstance(item, (aiohttp.ClientError, TimeoutError, ConnectionError)) for item in _chain(error))


def _describe(error: BaseException) -> str:
    """A short human account of a source failure."""
    response = _response_error(error)
    if response is not None:
        return f"HTTP {response.status} {response.message}".strip()
    if any(isinstance(item, TimeoutError) for item in _chain(error)):
        return "timed out waiting for data"
    # fsspec reports an unreachable HTTP server as FileNotFoundError: describe the cause instead.
    network = next((item for item in _chain(error) if isinstance(item, (aiohttp.ClientError, ConnectionError))), None)
    if network is not None:
        return str(network) or type(network).__name__
    if isinstance(error, FileNotFoundError):
        return "not found"
    return next((str(item) for item in _chain(error) if str(item)), type(error).__name__)


def _user_error(error: BaseException, url: str) -> Exception:
    """A ShowtellError naming `url` for failures a user can act on; other errors unchanged."""
    if isinstance(error, ShowtellError):
        return error
    status = _http_status(error)
    if status in (404, 410) or (status is None and isinstance(error, FileNotFoundError)):
        return SourceNotFoundError(f"{url}: {_describe(error)}")
    if status is not None:
        return ShowtellError(f"{url}: {_describe(error)}")
    return error


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
    fs: fsspec.AbstractFileSystem,
    partial: str,
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
        _remove(fs, partial)
        raise ShowtellError(f"{url}: {'; '.join(problems)}; nothing was written to the mirror")


def _sidecar_path(dst_path: str) -> str:
    return dst_path + ".verified.json"


def _verified_record(
    dst: _Location, info: _SourceInfo, expected: Optional[tuple[str, str]]
) -> Optional[dict[str, Any]]:
    """The sidecar of an already-mirrored file when it still matches the source, else None.

    It matches when the mirrored file still has the recorded size, the source has that size too,
    the source's ETag (else its modification time) is the recorded one, and a configured checksum
    is the recorded digest.
    """
    record = _read_json(dst.fs, _sidecar_path(dst.path))
    if record is None or not dst.fs.exists(dst.path):
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
    with dst.fs.open(_sidecar_path(dst.path), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)


def _mirror_sample(config: Config, mirror: str) -> list[MirrorResult]:
    """`source: sample`: generates the sample set into the mirror unless the same one is there."""
    from pipelines.sample_data import generate_sample_data

    settings = config.data.sample.model_dump()
    fs, root = url_to_fs(mirror)
    stamp = join_url(root, "sample.json")
    record = _read_json(fs, stamp)
    if record is not None and _sample_is_current(fs, root, record, settings):
        action = "skipped"
    else:
        _remove(fs, stamp)  # a stale stamp must not vouch for half-regenerated files
        generate_sample_data(mirror, **settings)
        files = {relpath: _hash_file(fs, join_url(root, relpath)) for relpath in MSCOCO_FILES}
        record = {"settings": settings, "files": files}
        with fs.open(stamp, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
        action = "generated"
    log.info("%s the sample set in %s (%s)", action, mirror, settings)
    return [
        MirrorResult(relpath, join_url(mirror, relpath), action, **record["files"][relpath]) for relpath in MSCOCO_FILES
    ]


def _sample_is_current(
    fs: fsspec.AbstractFileSystem, root: str, record: dict[str, Any], settings: dict[str, Any]
) -> bool:
    """Whether the stamp was written for these settings and its three files are there, their sizes unchanged."""
    if record.get("settings") != settings:
        return False
    for relpath in MSCOCO_FILES:
        path = join_url(root, relpath)
        entry = record.get("files", {}).get(relpath, {})
        if not fs.exists(path) or fs.size(path) != entry.get("size"):
            return False
    return True


def _hash_file(fs: fsspec.AbstractFileSystem, path: str, chunk_bytes: int = 1 << 20) -> dict[str, Any]:
    """{"size", "sha256"} of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> Optional[dict[str, Any]]:
    """A JSON file's object, or None if it is missing or unreadable."""
    try:
        with fs.open(path, "r", encoding="utf-8") as handle:
            value = json.load(handle)
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _source_options(url: str, settings: Download) -> dict[str, Any]:
    """fsspec storage options for a source: HTTP gets `download.timeout_seconds` as its socket timeouts."""
    if not _is_http(url):
        return {}
    seconds = settings.timeout_seconds
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds)
    return {"client_kwargs": {"timeout": timeout}}


def _is_http(url: str) -> bool:
    return get_protocol(url) in ("http", "https")


def _remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Deletes `path` if it exists."""
    if fs.exists(path):
        fs.rm_file(path)


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
