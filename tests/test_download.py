"""`showtell download` against a real HTTP server on 127.0.0.1 with scripted faults.

The origin server speaks HTTP/1.1 with HEAD, GET, `Range: bytes=N-` (206 + Content-Range), ETag
and Last-Modified, and logs every request. Faults are scripted per file and consumed by GETs in
order: "drop" (headers with the full Content-Length, about half the body, then a TCP reset),
"503", "stall" (part of the body, then silence), "ignore-range" (200 with the whole file).
"""
from __future__ import annotations

import email.utils
import hashlib
import http.server
import json
import os
import random
import socket
import struct
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import fsspec
import pytest

from orchestration.cli import main
from pipelines.download import mirror_dataset, mirror_file
from schemas.config import ANNOTATIONS_ZIP, MSCOCO_FILES, TRAIN_IMAGES_ZIP, VAL_IMAGES_ZIP, Config, build_config
from schemas.errors import ShowtellError

SIZES = {ANNOTATIONS_ZIP: 200_000, TRAIN_IMAGES_ZIP: 400_000, VAL_IMAGES_ZIP: 300_000}
CHUNK = 16 << 10  # small chunks so a drop lands mid-file
FAST = {"retries": 3, "backoff_seconds": 0.01, "timeout_seconds": 2.0, "chunk_bytes": CHUNK}


@dataclass
class Request:
    method: str
    path: str  # relative to the served root, e.g. "zips/train2014.zip"
    range: Optional[str]  # the Range header, if any
    status: int
    fault: Optional[str] = None


class Origin:
    """A real ThreadingHTTPServer on 127.0.0.1 serving `root`, with faults and a request log."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[Request] = []
        self.faults: dict[str, list[str]] = {}
        self.release = threading.Event()  # ends "stall" faults early at teardown
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def requests_for(self, relpath: str, method: str = "GET") -> list[Request]:
        return [r for r in self.requests if r.path == relpath and r.method == method]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _handler_for(origin: Origin) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def _file(self) -> tuple[str, Optional[Path]]:
            relpath = self.path.lstrip("/")
            path = origin.root / relpath
            return relpath, path if path.is_file() else None

        def _log(self, relpath: str, status: int, fault: Optional[str] = None) -> None:
            origin.requests.append(Request(self.command, relpath, self.headers.get("Range"), status, fault))

        def _not_found(self, relpath: str) -> None:
            self._log(relpath, 404)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _entity_headers(self, path: Path) -> None:
            stat = path.stat()
            self.send_header("ETag", f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"')
            self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
            self.send_header("Accept-Ranges", "bytes")

        def do_HEAD(self) -> None:
            relpath, path = self._file()
            if path is None:
                return self._not_found(relpath)
            self._log(relpath, 200)
            self.send_response(200)
            self.send_header("Content-Length", str(path.stat().st_size))
            self._entity_headers(path)
            self.end_headers()

        def do_GET(self) -> None:
            relpath, path = self._file()
            if path is None:
                return self._not_found(relpath)
            queue = origin.faults.get(relpath, [])
            fault = queue.pop(0) if queue else None
            if fault == "503":
                self._log(relpath, 503, fault)
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = path.read_bytes()
            start = _range_start(self.headers.get("Range")) if fault != "ignore-range" else None
            status = 206 if start is not None else 200
            self._log(relpath, status, fault)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body) - (start or 0)))
            if start is not None:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self._entity_headers(path)
            self.end_headers()
            body = body[start or 0 :]
            if fault == "drop":
                self._drop(body[: len(body) // 2])
            elif fault == "stall":
                self.wfile.write(body[: len(body) // 4])
                self.wfile.flush()
                origin.release.wait(10)
                self.close_connection = True
            else:
                self.wfile.write(body)

        def _drop(self, first_half: bytes) -> None:
            self.wfile.write(first_half)
            self.wfile.flush()
            threading.Event().wait(0.2)  # let the client consume what was sent before the reset
            # SO_LINGER 0: close() sends a TCP RST, an abrupt drop rather than an orderly FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True

    return Handler


def _range_start(header: Optional[str]) -> Optional[int]:
    if not header:
        return None
    assert header.startswith("bytes=") and header.endswith("-"), f"unexpected Range {header!r}"
    return int(header[len("bytes=") : -1])


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A directory in MSCOCO's layout holding three files of random bytes."""
    root = tmp_path / "origin"
    rng = random.Random(0)
    for relpath, size in SIZES.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(rng.randbytes(size))
    return root


@pytest.fixture
def origin(dataset: Path) -> Iterator[Origin]:
    server = Origin(dataset)
    server.thread.start()
    yield server
    server.close()


def _config(tmp_path: Path, source: str, mirror: Optional[str] = None, **data: object) -> Config:
    tree = {
        "run_root": str(tmp_path / "run"),
        "data": {"source": source, "mirror": mirror or str(tmp_path / "mirror"), "download": dict(FAST), **data},
    }
    return build_config(tree)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _assert_mirrored(origin_root: Path, mirror: Path) -> None:
    for relpath in MSCOCO_FILES:
        assert (mirror / relpath).read_bytes() == (origin_root / relpath).read_bytes(), relpath
        assert not (mirror / f"{relpath}.partial").exists(), relpath
        sidecar = json.loads((mirror / f"{relpath}.verified.json").read_text())
        assert sidecar["size"] == SIZES[relpath]
        assert sidecar["sha256"] == _sha256((origin_root / relpath).read_bytes())


def test_acceptance_drop_resumes_with_range_and_503_is_retried(tmp_path: Path, dataset: Path, origin: Origin) -> None:
    for relpath in MSCOCO_FILES:
        origin.faults[relpath] = ["drop", "503"]

    results = mirror_dataset(_config(tmp_path, origin.url))

    _assert_mirrored(dataset, tmp_path / "mirror")
    assert [(r.relpath, r.action, r.size) for r in results] == [(p, "downloaded", SIZES[p]) for p in MSCOCO_FILES]
    assert [r.sha256 for r in results] == [_sha256((dataset / p).read_bytes()) for p in MSCOCO_FILES]
    for relpath in MSCOCO_FILES:
        dropped, refused, resumed = origin.requests_for(relpath)
        assert (dropped.range, dropped.status, dropped.fault) == (None, 200, "drop")
        assert (refused.status, refused.fault) == (503, "503")
        offset = _range_start(resumed.range)
        # The resume asks for the rest, not the whole file again, and the 503 was retried.
        assert offset is not None and 0 < offset <= SIZES[relpath] // 2
        assert refused.range == resumed.range and resumed.status == 206


def test_read_timeout_is_retried_from_the_current_offset(tmp_path: Path, dataset: Path, origin: Origin) -> None:
    origin.faults[ANNOTATIONS_ZIP] = ["stall"]
    settings = _config(tmp_path, origin.url, download={**FAST, "timeout_seconds": 0.3}).data.download
    dest = tmp_path / "mirror" / "ann.zip"

    result = mirror_file(origin.url + ANNOTATIONS_ZIP, str(dest), settings)

    assert dest.read_bytes() == (dataset / ANNOTATIONS_ZIP).read_bytes()
    assert result.action == "downloaded"
    stalled, resumed = origin.requests_for(ANNOTATIONS_ZIP)
    assert stalled.fault == "stall" and stalled.range is None
    assert 0 < _range_start(resumed.range) <= SIZES[ANNOTATIONS_ZIP] // 4


def test_server_that_ignores_range_restarts_from_zero(tmp_path: Path, dataset: Path, origin: Origin) -> None:
    origin.faults[TRAIN_IMAGES_ZIP] = ["drop", "ignore-range"]
    dest = tmp_path / "mirror" / "train.zip"

    mirror_file(origin.url + TRAIN_IMAGES_ZIP, str(dest), _config(tmp_path, origin.url).data.download)

    assert dest.read_bytes() == (dataset / TRAIN_IMAGES_ZIP).read_bytes()
    dropped, whole = origin.requests_for(TRAIN_IMAGES_ZIP)
    assert whole.range is not None and whole.status == 200  # asked to resume, got the whole file


def test_404_fails_clearly_without_retrying_or_leaving_files(
    tmp_path: Path, dataset: Path, origin: Origin, capsys: pytest.CaptureFixture[str]
) -> None:
    (dataset / VAL_IMAGES_ZIP).unlink()
    mirror = tmp_path / "mirror"
    stale_partial = mirror / f"{VAL_IMAGES_ZIP}.partial"
    stale_partial.parent.mkdir(parents=True)
    stale_partial.write_bytes(b"left by an earlier run")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"run_root: {tmp_path / 'run'}\ndata:\n  source: {origin.url}\n  mirror: {mirror}\n")

    code = main(["download", "--config", str(config_file), "--set", "data.download.backoff_seconds=0.01"])

    assert code != 0
    err = capsys.readouterr().err
    assert f"{origin.url}{VAL_IMAGES_ZIP}" in err and "404" in err, err
    assert not (mirror / VAL_IMAGES_ZIP).exists()
    assert not stale_partial.exists()
    assert len([r for r in origin.requests if r.path == VAL_IMAGES_ZIP]) <= 2  # fsspec's HEAD, then its GET fallback
    assert (mirror / ANNOTATIONS_ZIP).read_bytes() == (dataset / ANNOTATIONS_ZIP).read_bytes()


def test_second_run_skips_and_a_changed_origin_file_is_downloaded_again(
    tmp_path: Path, dataset: Path, origin: Origin
) -> None:
    config = _config(tmp_path, origin.url)
    mirror_dataset(config)
    origin.requests.clear()

    again = mirror_dataset(config)

    assert [r.action for r in again] == ["skipped"] * 3
    assert [r.sha256 for r in again] == [_sha256((dataset / p).read_bytes()) for p in MSCOCO_FILES]
    assert {r.method for r in origin.requests} == {"HEAD"}  # no body was fetched

    changed = dataset / TRAIN_IMAGES_ZIP
    changed.write_bytes(random.Random(1).randbytes(SIZES[TRAIN_IMAGES_ZIP]))  # same size, new bytes
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    origin.requests.clear()

    third = mirror_dataset(config)

    assert [r.action for r in third] == ["skipped", "downloaded", "skipped"]
    _assert_mirrored(dataset, tmp_path / "mirror")
    assert [r.path for r in origin.requests if r.method == "GET"] == [TRAIN_IMAGES_ZIP]


def test_checksums_are_verified(tmp_path: Path, dataset: Path, origin: Origin) -> None:
    ann = (dataset / ANNOTATIONS_ZIP).read_bytes()
    wrong = _config(tmp_path, origin.url, checksums={ANNOTATIONS_ZIP: "sha256:" + "0" * 64})

    with pytest.raises(ShowtellError, match=r"annotations_trainval2014\.zip: sha256 mismatch") as caught:
        mirror_dataset(wrong)

    assert _sha256(ann) in str(caught.value)
    assert not (tmp_path / "mirror" / ANNOTATIONS_ZIP).exists()
    assert not (tmp_path / "mirror" / f"{ANNOTATIONS_ZIP}.partial").exists()

    right = {
        ANNOTATIONS_ZIP: "sha256:" + _sha256(ann),
        TRAIN_IMAGES_ZIP: "md5:" + hashlib.md5((dataset / TRAIN_IMAGES_ZIP).read_bytes()).hexdigest(),
    }
    results = mirror_dataset(_config(tmp_path, origin.url, checksums=right))
    assert [r.action for r in results] == ["downloaded"] * 3
    _assert_mirrored(dataset, tmp_path / "mirror")


def test_malformed_or_unknown_checksum_is_a_config_error(tmp_path: Path, origin: Origin) -> None:
    with pytest.raises(ShowtellError, match="is not 'sha256:<64 hex>' or 'md5:<32 hex>'"):
        mirror_dataset(_config(tmp_path, origin.url, checksums={ANNOTATIONS_ZIP: "crc:1234"}))
    with pytest.raises(ShowtellError, match=r"data\.checksums: unknown file"):
        mirror_dataset(_config(tmp_path, origin.url, checksums={"zips/train2015.zip": "md5:" + "0" * 32}))
    assert origin.requests == []


@pytest.mark.parametrize("as_url", [False, True], ids=["local-path", "file-url"])
def test_local_sources(tmp_path: Path, dataset: Path, as_url: bool) -> None:
    source = dataset.as_uri() if as_url else str(dataset)
    config = _config(tmp_path, source)

    first = mirror_dataset(config)
    second = mirror_dataset(config)

    _assert_mirrored(dataset, tmp_path / "mirror")
    assert [r.action for r in first] == ["downloaded"] * 3
    assert [r.action for r in second] == ["skipped"] * 3


def test_object_store_style_source_and_mirror(tmp_path: Path, dataset: Path, origin: Origin) -> None:
    """memory:// has no local partials to append to: the partial is rewritten and moved with fs.mv."""
    name = uuid.uuid4().hex
    memory = fsspec.filesystem("memory")
    origin.faults[VAL_IMAGES_ZIP] = ["drop"]
    try:
        from_http = mirror_dataset(_config(tmp_path, origin.url, mirror=f"memory://{name}/a"))
        for relpath in MSCOCO_FILES:
            memory.pipe(f"/{name}/src/{relpath}", (dataset / relpath).read_bytes())
        from_memory = mirror_dataset(_config(tmp_path, f"memory://{name}/src", mirror=f"memory://{name}/b"))

        for relpath in MSCOCO_FILES:
            for copy in ("a", "b"):
                assert memory.cat(f"/{name}/{copy}/{relpath}") == (dataset / relpath).read_bytes()
                assert not memory.exists(f"/{name}/{copy}/{relpath}.partial")
        assert [r.action for r in from_http + from_memory] == ["downloaded"] * 6
        assert _range_start(origin.requests_for(VAL_IMAGES_ZIP)[-1].range) > 0
    finally:
        memory.rm(f"/{name}", recursive=True)


def test_leftover_partial_is_resumed_from_its_size(tmp_path: Path, dataset: Path, origin: Origin) -> None:
    body = (dataset / TRAIN_IMAGES_ZIP).read_bytes()
    partial = tmp_path / "mirror" / f"{TRAIN_IMAGES_ZIP}.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(body[:123_456])  # what a killed run left

    results = {r.relpath: r for r in mirror_dataset(_config(tmp_path, origin.url))}

    _assert_mirrored(dataset, tmp_path / "mirror")
    assert results[TRAIN_IMAGES_ZIP].action == "resumed"
    assert results[TRAIN_IMAGES_ZIP].sha256 == _sha256(body)  # the kept bytes were hashed too
    assert [r.range for r in origin.requests_for(TRAIN_IMAGES_ZIP)] == ["bytes=123456-"]


def test_a_run_that_gives_up_keeps_its_partial_for_the_next(tmp_path: Path, dataset: Path, origin: Origin) -> None:
    origin.faults[ANNOTATIONS_ZIP] = ["drop"]
    settings = _config(tmp_path, origin.url, download={**FAST, "retries": 0}).data.download
    dest = tmp_path / "mirror" / "ann.zip"

    with pytest.raises(ShowtellError, match="giving up after 1 failed attempt.*kept for the next run"):
        mirror_file(origin.url + ANNOTATIONS_ZIP, str(dest), settings)
    kept = Path(f"{dest}.partial").stat().st_size
    assert not dest.exists() and 0 < kept < SIZES[ANNOTATIONS_ZIP]

    result = mirror_file(origin.url + ANNOTATIONS_ZIP, str(dest), settings)

    assert result.action == "resumed" and dest.read_bytes() == (dataset / ANNOTATIONS_ZIP).read_bytes()
    assert origin.requests_for(ANNOTATIONS_ZIP)[-1].range == f"bytes={kept}-"


def test_sample_source_is_generated_once_per_setting(tmp_path: Path) -> None:
    sample = {"train_images": 2, "val_images": 2, "seed": 3, "image_size": 32}
    config = _config(tmp_path, "sample", sample=sample)

    first = mirror_dataset(config)
    second = mirror_dataset(config)

    assert [r.action for r in first] == ["generated"] * 3
    assert [r.action for r in second] == ["skipped"] * 3
    assert [(r.relpath, r.size, r.sha256) for r in first] == [(r.relpath, r.size, r.sha256) for r in second]
    for result in second:
        assert _sha256(Path(result.dest).read_bytes()) == result.sha256
    assert json.loads((tmp_path / "mirror" / "sample.json").read_text())["settings"] == sample

    reseeded = mirror_dataset(_config(tmp_path, "sample", sample={**sample, "seed": 4}))

    assert [r.action for r in reseeded] == ["generated"] * 3
    assert [r.sha256 for r in reseeded] != [r.sha256 for r in first]
