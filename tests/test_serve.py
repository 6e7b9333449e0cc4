"""inference/serve.py and `showtell serve`: the tiny export (tests/captioning.py) served by real Ray
Serve on 127.0.0.1, over real HTTP: captions as the model's own, every bad request answered with
its status and reason while the endpoint goes on captioning, concurrent requests sharing batches,
and the command line started and stopped from outside."""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pytest

from inference.captioner import Captioner, load_captioner
from inference.serve import ImageBatcher, ServeSettings, serving
from orchestration.cli import main as cli_main
from tests.captioning import export_tiny, image
from tests.s3_server import free_port

IMAGES = [image(0), image(1, "PNG"), image(2)]
LIMIT = 64 * 1024  # the fixture's max_request_bytes: small, so that a body over it is quick to send
# Long enough that requests sent together always meet in a batch; short enough for a test's few dozen requests.
BATCH_WAIT_S = 0.2
STARTS_WITHIN_S = 120  # `showtell serve` starts Ray, Serve and a replica that loads TensorFlow


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def http(
    url: str, method: str = "GET", body: bytes | Iterable[bytes] | None = None, content_type: str | None = None
) -> Reply:
    """One request, whatever its status; a body that is an iterable of chunks goes chunked (no Content-Length)."""
    request = urllib.request.Request(url, data=body, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


def post_image(url: str, data: bytes) -> Reply:
    return http(f"{url}/caption", "POST", data, "image/jpeg")


def post_json(url: str, document: object) -> Reply:
    return http(f"{url}/caption", "POST", json.dumps(document).encode(), "application/json")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_captions(reply: Reply, expected: list[list[tuple[str, float]]]) -> None:
    """A 200 whose images' captions are `expected` (Captioner.caption's): same sentences, same order, same p."""
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/json"
    served = reply.json()["images"]
    assert [[c["sentence"] for c in image["captions"]] for image in served] == [[s for s, _ in e] for e in expected]
    np.testing.assert_allclose(
        [[c["p"] for c in image["captions"]] for image in served], [[p for _, p in e] for e in expected], rtol=1e-5
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    return export_tiny(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def model(exported) -> Captioner:
    return load_captioner(exported)


@pytest.fixture(scope="module")
def expected(model) -> list[list[tuple[str, float]]]:
    """The model's own captions of IMAGES, with the export's `caption` settings (what serve uses)."""
    return model.caption(IMAGES, **dataclasses.asdict(model.default_search()))


@pytest.fixture(scope="module")
def settings(exported) -> ServeSettings:
    return ServeSettings(
        model=exported, port=free_port(), max_batch_size=8, batch_wait_timeout_s=BATCH_WAIT_S, max_request_bytes=LIMIT
    )


@pytest.fixture(scope="module")
def url(settings) -> Iterator[str]:
    with serving(settings) as served:
        yield served


def test_a_posted_image_gets_the_models_own_captions(url, expected):
    for data, captions in zip(IMAGES, expected):
        assert_captions(post_image(url, data), [captions])


def test_json_with_several_base64_images_gets_each_ones_captions_in_order(url, expected):
    assert_captions(post_json(url, {"images": [b64(data) for data in IMAGES]}), expected)
    assert_captions(post_json(url, {"images": [b64(IMAGES[2]), b64(IMAGES[0])]}), [expected[2], expected[0]])


def chunks(total: int, size: int = 8192) -> Iterator[bytes]:
    """`total` bytes in chunks: a body without Content-Length, whose size the server learns by reading it."""
    for start in range(0, total, size):
        yield b"\0" * min(size, total - start)


@dataclasses.dataclass(frozen=True)
class BadRequest:
    method: str
    path: str
    body: bytes | None
    content_type: str | None
    status: int
    error: str  # a pattern of the reply's {"error": ...}


JPEG, JSON = "image/jpeg", "application/json"
NOT_DECODED = r"not an image that can be decoded \(.+\)"  # with the decoder's reason in brackets
BAD_REQUESTS = {
    "not-an-image": BadRequest("POST", "/caption", b"hello, no photo", JPEG, 400, NOT_DECODED),
    "empty-body": BadRequest("POST", "/caption", b"", JPEG, 400, r"an empty body: POST an image, .+"),
    "json-not-json": BadRequest("POST", "/caption", b"{images:", JSON, 400, r"the body is not JSON \(.+\)"),
    "json-no-images": BadRequest(
        "POST", "/caption", b'{"photos": []}', JSON, 400, r'the JSON body should be \{"images": .+'
    ),
    "json-bad-base64": BadRequest(
        "POST", "/caption", json.dumps({"images": [b64(IMAGES[0]), "no base64!"]}).encode(), JSON,
        400, r"images\[1\] is not base64 \(.+\)",
    ),
    "json-not-an-image": BadRequest(
        "POST", "/caption", json.dumps({"images": [b64(IMAGES[0]), b64(b"GIF89a, cut short")]}).encode(), JSON,
        400, rf"images\[1\]: {NOT_DECODED}",
    ),
    "too-large": BadRequest(
        "POST", "/caption", b"\0" * (LIMIT + 1), JPEG, 413, f"the body has {LIMIT + 1} bytes, over the limit of {LIMIT}"
    ),
    # No Content-Length: the replica finds out while reading (the test sends it in chunks).
    "too-large-chunked": BadRequest(
        "POST", "/caption", None, JPEG, 413, f"the body is over the limit of {LIMIT} bytes"
    ),
    "get-caption": BadRequest("GET", "/caption", None, None, 405, r"/caption takes POST, not GET"),
    "post-healthz": BadRequest("POST", "/healthz", b"{}", JSON, 405, r"/healthz takes GET, not POST"),
    "put-page": BadRequest("PUT", "/", IMAGES[0], JPEG, 405, r"/ takes GET, not PUT"),
    "unknown-path": BadRequest("GET", "/captions", None, None, 404, r"no such path: /captions .+"),
}  # fmt: skip


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_a_bad_request_gets_its_status_and_reason_and_the_endpoint_goes_on_captioning(url, expected, name):
    bad = BAD_REQUESTS[name]
    body = chunks(LIMIT + 1) if name == "too-large-chunked" else bad.body

    reply = http(f"{url}{bad.path}", bad.method, body, bad.content_type)

    assert reply.status == bad.status, reply.body
    assert re.fullmatch(bad.error, reply.json()["error"]), reply.json()
    if bad.status == 405:
        assert reply.headers["allow"] == {"/caption": "POST"}.get(bad.path, "GET")
    assert_captions(post_image(url, IMAGES[1]), [expected[1]])


def test_healthz_reports_the_model_it_serves_and_its_batching(url, exported, settings):
    metadata = json.loads((Path(exported) / "showtell_export.json").read_text())

    reply = http(f"{url}/healthz")

    assert reply.status == 200
    health = reply.json()
    assert {key: health[key] for key in ("status", "model", "checkpoint", "step", "vocabulary_id", "search")} == {
        "status": "ok",
        "model": exported,
        "checkpoint": metadata["checkpoint"],
        "step": 7,
        "vocabulary_id": metadata["vocabulary_id"],
        "search": metadata["caption"],
    }
    assert health["replica"]
    assert health["batching"]["max_batch_size"] == 8 and health["batching"]["batch_wait_timeout_s"] == BATCH_WAIT_S


def test_concurrent_requests_ride_in_shared_batches_and_a_bad_image_among_them_fails_only_its_own(url, expected):
    before = http(f"{url}/healthz").json()["batching"]
    bodies = [IMAGES[i % len(IMAGES)] for i in range(10)] + [b"not a photo", b"\xff\xd8 a broken JPEG"]

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda data: post_image(url, data), bodies))

    for i, reply in enumerate(replies[:10]):
        assert_captions(reply, [expected[i % len(IMAGES)]])
    for reply in replies[10:]:
        assert reply.status == 400 and re.fullmatch(NOT_DECODED, reply.json()["error"])
    after = http(f"{url}/healthz").json()["batching"]
    batches, images = after["batches"] - before["batches"], after["images"] - before["images"]
    assert images == len(bodies)
    assert batches <= len(bodies) // 2, (batches, images)  # 12 images in 6 batches or fewer: 2 or more a batch
    assert 2 <= after["largest"] <= 8  # the fixture's max_batch_size


def test_images_that_arrive_while_a_batch_runs_go_together_in_the_next_batch_up_to_max_size():
    batches: list[list[bytes]] = []
    running, release = threading.Event(), threading.Event()

    def caption(images: list[bytes]) -> list[str]:
        batches.append(images)
        running.set()
        release.wait(30)  # the first batch runs until the test lets it finish
        if b"broken" in images:
            raise RuntimeError("the model failed")
        return [image.decode().upper() for image in images]

    async def scenario() -> tuple[ImageBatcher, list]:
        batcher = ImageBatcher(caption, max_size=3, wait_s=0)  # no waiting for company: only what queues
        first = asyncio.ensure_future(batcher.submit(b"a"))
        await asyncio.to_thread(running.wait, 30)
        later = [asyncio.ensure_future(batcher.submit(image)) for image in (b"b", b"c", b"d", b"broken", b"e")]
        await asyncio.sleep(0)  # they queue behind the running batch
        release.set()
        return batcher, await asyncio.gather(first, *later, return_exceptions=True)

    batcher, results = asyncio.run(scenario())

    assert batches == [[b"a"], [b"b", b"c", b"d"], [b"broken", b"e"]]
    assert results[:4] == ["A", "B", "C", "D"]
    assert [str(error) for error in results[4:]] == ["the model failed"] * 2  # that batch's requests only
    assert batcher.counts == {"batches": 3, "images": 6, "largest": 3}


def test_the_page_is_served_at_the_root_with_nothing_from_elsewhere(url):
    reply = http(f"{url}/")

    assert reply.status == 200 and reply.headers["content-type"] == "text/html; charset=utf-8"
    page = reply.body.decode()
    assert '<input type="file" id="photo"' in page and 'fetch("caption"' in page
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # no script, style or font from the network


def test_serve_refuses_a_missing_export_a_checkpoint_a_bad_flag_and_a_taken_port_in_one_line(
    exported, settings, tmp_path, capsys
):
    missing = str(tmp_path / "nothing")
    checkpoint = str(Path(exported).parent / "train" / "phase1" / "final")
    cases = [
        (["--model", missing], f"{missing}: not found"),
        (
            ["--model", checkpoint],
            f"{checkpoint}: a published final/ checkpoint; serve takes a `showtell export` folder "
            f"(showtell export --checkpoint {checkpoint} OUT)",
        ),
        (
            ["--model", exported, "--max-batch-size", "0"],
            "--max-batch-size: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            ["--model", exported, "--port", str(settings.port)],  # the module's server holds it
            f"cannot listen on 127.0.0.1:{settings.port} (Address already in use)",
        ),
    ]
    for args, error in cases:
        assert cli_main(["serve", *args]) == 2, args
        assert capsys.readouterr().err.strip().splitlines() == [f"showtell serve: error: {error}"]


def showtell_serve(*args: str) -> subprocess.Popen:
    """`showtell serve ARGS` in a new process, its stdout and stderr (the console) piped."""
    command = [str(Path(sys.executable).parent / "showtell"), "serve", *args]  # the installed command
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_up(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTS_WITHIN_S
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if http(f"{url}/healthz").status == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"showtell serve did not answer within {STARTS_WITHIN_S} s: {process.communicate()}")


def wait_until_serving(process: subprocess.Popen) -> list[str]:
    """The console's lines up to and with `showtell serve`'s "serving ..." line, which it logs once
    Serve's start returned: an operator's sign that Ctrl-C now stops it cleanly. (/healthz may
    answer a moment before, while Serve still polls the application's status.)"""
    lines: list[str] = []
    while not lines or "showtell.serve: serving " not in lines[-1]:
        line = process.stderr.readline()
        assert line, f"showtell serve ended before it logged that it serves: {''.join(lines)}"
        lines.append(line)
    return lines


@pytest.mark.parametrize(
    "stop",
    [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],  # a process manager's, Ctrl-C's
    ids=lambda stop: stop.name,
)
def test_the_cli_serves_until_a_signal_then_stops_cleanly_with_only_its_own_lines_on_the_console(
    exported, expected, stop
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = showtell_serve("--model", exported, "--port", str(port), "--max-batch-size", "4")
    try:
        wait_until_up(url, process)
        console = wait_until_serving(process)
        assert_captions(post_image(url, IMAGES[0]), [expected[0]])
        assert http(f"{url}/caption").status == 405

        process.send_signal(stop)
        out, err = process.communicate(timeout=60)
        err = "".join(console) + err
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 0, err
    assert out == ""
    lines = [re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "", line) for line in err.splitlines()]
    assert lines == [
        f"INFO showtell.serve: serving {exported} at {url} (1 replica, batches up to 4)",
        "INFO showtell.serve: stopping",
        "INFO showtell.serve: stopped",
    ]
    with pytest.raises(OSError):  # nothing listens on the port any more
        http(f"{url}/healthz")


@pytest.mark.slow
def test_the_cli_names_why_an_export_that_does_not_load_did_not_start(exported, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("word_counts.txt", "showtell_export.json"):
        (corrupt / name).write_bytes((Path(exported) / name).read_bytes())
    (corrupt / "saved_model.pb").write_bytes(b"\x08\x01 not a protocol buffer")

    process = showtell_serve("--model", str(corrupt), "--port", str(free_port()))
    out, err = process.communicate(timeout=STARTS_WITHIN_S)

    assert process.returncode == 2
    assert err.strip().splitlines() == [
        f"showtell serve: error: the replicas did not start: schemas.errors.ShowtellError: {corrupt}: cannot load "
        f"this SavedModel: Cannot parse file b'{corrupt}/saved_model.pb': Error parsing message with type "
        "'tensorflow.SavedModel'."
    ]
