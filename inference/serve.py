"""`showtell serve`: an export's captions over HTTP, from Ray Serve replicas that batch single images
across requests into one call of the export's `caption` signature (dynamic batching: ImageBatcher).

    with serving(ServeSettings(model="exports/showtell", port=8000)) as url:
        ...  # http://127.0.0.1:8000 serves until the block ends; then Serve (and Ray, if it started it) stop

Routes (errors are JSON too: {"error": "what was wrong"}):

    POST /caption   body: one encoded image (JPEG, PNG, ...), with any Content-Type but JSON's;
                    or JSON {"images": ["<base64>", ...]} with Content-Type: application/json
                    200 {"images": [{"captions": [{"sentence": "a red circle on a white background", "p": 0.04},
                                                  ...]}, ...]}
                        one entry per image in the request's order, its captions best first
                        (the export's beam_size of them, `p` their probability)
                    400 a body that is no image, bad JSON or bad base64: the reason, naming the image
                    413 a body over max_request_bytes
    GET  /healthz   200 {"status": "ok", "model", "checkpoint", "step", "vocabulary_id", "search",
                         "replica", "batching": {settings, and this replica's "batches", "images", "largest"}}
    GET  /          the page (serve_page.html): pick a photo, see it and its captions
    any other method on these paths: 405 with an Allow header; any other path: 404

Each replica loads the export once (`load_captioner`) and captions each batch in one call; a batch
that holds an image the graph cannot decode is split: each image is checked on its own
(`Captioner.caption_each`), the bad ones are their requests' 400s and the others are captioned, so
a bad image never fails another request (checking every image up front instead would cost each
request an eager decode, as much CPU as its share of the batch). A request that fails in any
other way is Ray Serve's 500 for that request: the replica goes on serving.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.schema import LoggingConfig
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from inference.captioner import SAVED_MODEL, load_captioner, source_kind
from schemas.config import join_url
from schemas.errors import ShowtellError
from schemas.layout import EXPORT_METADATA_FILE
from schemas.storage import absolute, read_json

log = logging.getLogger("showtell.serve")

Captions = list[tuple[str, float]]  # one image's, as (sentence, probability), best first

APP_NAME = "showtell"  # the Ray Serve application's name
PAGE = Path(__file__).with_name("serve_page.html")  # GET /
JSON_TYPE = "application/json"  # POST /caption's Content-Type for {"images": [base64, ...]}
# TensorFlow's C++ lines (warnings about CUDA on a CPU machine, ...) kept out of the replicas' logs.
REPLICA_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
# Requests a replica takes at once, at least (2 * max_batch_size when that is more, so that a full
# batch queues while one runs): a batch is made of the requests inside the replica, and Ray Serve's
# default, 5, would cap it at 5. The requests over the limit wait in Serve's proxy, whose router
# retries a full replica after growing sleeps and leaves it idle meanwhile (at batch size 1 and 32
# clients, a quarter of the throughput), so even without batching they are better queued inside.
MIN_ONGOING_REQUESTS = 64
# Ray Serve's own lines (its controller, proxy and replicas): warnings and errors only, no line per
# request. They go to Ray's log folder and to the driver's stderr (`showtell serve`: its log file).
SERVE_LOGGING = LoggingConfig(log_level="WARNING", enable_access_log=False)


class ServeSettings(BaseModel):
    """What `showtell serve` serves and how; each field is the flag of the same name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str  # a `showtell export` folder (local path or fsspec URL)
    host: str = "127.0.0.1"  # the address the HTTP proxy listens on (0.0.0.0: every interface)
    port: int = Field(8000, ge=1, le=65535)  # its port
    replicas: int = Field(1, ge=1)  # model replicas, each a Ray actor that reserves one CPU
    # The most images one `caption` signature call takes; 1 turns dynamic batching off.
    max_batch_size: int = Field(32, ge=1)
    # How long a batch's first image waits for others, in seconds. 0: not at all; under load the
    # batches fill anyway, with the images that queue while the one before runs (ImageBatcher).
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    max_request_bytes: int = Field(10 * 2**20, ge=1)  # a POST body over this is refused with 413

    def describe(self) -> str:
        """'2 replicas, batches up to 32' (or 'no batching')."""
        batching = f"batches up to {self.max_batch_size}" if self.max_batch_size > 1 else "no batching"
        return f"{self.replicas} replica{'s' if self.replicas > 1 else ''}, {batching}"


class RequestError(Exception):
    """A client's mistake: answered with `status` and the message, the replica unharmed."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ImageBatcher:
    """Dynamic batching: single images from concurrent requests, captioned together in one call.

    The first image waits up to `wait_s` for others to join it; then the batch runs in a worker
    thread (the replica's event loop goes on taking requests), and the images that arrive
    meanwhile queue up and go together in the next batch, up to `max_size`. So the busier the
    replica, the larger its batches, and a lone request waits `wait_s` at most.

    Ray Serve's own `@serve.batch` closes each batch `wait_s` after its first item, whether or not
    the batch before it is still running, so under load a replica runs one small batch after
    another: 3 images a batch on average at 32 clients on 2 cores, and 2.1x the throughput of
    batch size 1 (wait_s 0.01; 1.2x at 0) where this batcher gives 3.6x (benchmarks/serve_bench.py).
    """

    def __init__(self, caption: Callable[[list[bytes]], list[Any]], max_size: int, wait_s: float):
        self.caption = caption  # images -> one result per image; runs in a worker thread
        self.max_size = max_size
        self.wait_s = wait_s
        self.queue: asyncio.Queue[tuple[bytes, asyncio.Future]] = asyncio.Queue()
        self.runner: asyncio.Task | None = None  # the batching loop, started by the first image
        self.counts = {"batches": 0, "images": 0, "largest": 0}  # what it has captioned so far

    async def submit(self, image: bytes) -> Any:
        """`caption`'s result for `image`, once the batch it rode in has run."""
        loop = asyncio.get_running_loop()
        if self.runner is None:
            self.runner = loop.create_task(self._run())
        result = loop.create_future()
        self.queue.put_nowait((image, result))
        return await result

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            self.counts["batches"] += 1
            self.counts["images"] += len(batch)
            self.counts["largest"] = max(self.counts["largest"], len(batch))
            futures = [future for _, future in batch]
            try:
                results = await asyncio.to_thread(self.caption, [image for image, _ in batch])
            except Exception as error:  # a bug, a broken model: the batch's requests fail with it (500), not the loop
                for future in futures:
                    if not future.done():
                        future.set_exception(error)
                continue
            for future, result in zip(futures, results):
                if not future.done():  # done already: cancelled, its client gone
                    future.set_result(result)

    async def _next_batch(self) -> list[tuple[bytes, asyncio.Future]]:
        """The waiting images, up to max_size; the first one waits up to wait_s for company."""
        batch = [await self.queue.get()]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch


@serve.deployment(
    # A constructor that fails (an export that does not load) fails the deployment at once: the
    # same export would fail again.
    max_constructor_retry_count=1,
    logging_config=SERVE_LOGGING,
)
class CaptionServer:
    """One replica: the export loaded once, its HTTP routes, and the batch of images it captions next."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.captioner = load_captioner(settings.model)
        self.search = dataclasses.asdict(self.captioner.default_search())  # the export's `caption` settings
        metadata = read_json(join_url(settings.model, EXPORT_METADATA_FILE)) or {}
        self.identity = {
            "model": settings.model,
            "checkpoint": metadata.get("checkpoint"),
            "step": metadata.get("step"),
            "vocabulary_id": metadata.get("vocabulary_id"),
            "search": self.search,
            "replica": serve.get_replica_context().replica_id.unique_id,
        }
        self.batcher = ImageBatcher(self.caption_batch, settings.max_batch_size, settings.batch_wait_timeout_s)
        self.page = PAGE.read_bytes()
        self.routes = {  # path -> (its one method, its handler)
            "/": ("GET", self.get_page),
            "/healthz": ("GET", self.get_health),
            "/caption": ("POST", self.post_caption),
        }

    async def __call__(self, request: Request) -> Response:
        path = request.scope["path"][len(request.scope.get("root_path", "")) :] or "/"  # under the route prefix
        if path not in self.routes:
            return _error(404, f"no such path: {path} (POST /caption, GET /healthz, GET /)")
        method, handler = self.routes[path]
        if request.method != method:
            return _error(405, f"{path} takes {method}, not {request.method}", headers={"Allow": method})
        try:
            return await handler(request)
        except RequestError as error:
            return _error(error.status, str(error))

    async def get_page(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8")

    async def get_health(self, request: Request) -> Response:
        batching = {
            "max_batch_size": self.settings.max_batch_size,
            "batch_wait_timeout_s": self.settings.batch_wait_timeout_s,
            **self.batcher.counts,
        }
        return JSONResponse({"status": "ok", **self.identity, "batching": batching})

    async def post_caption(self, request: Request) -> Response:
        body = await self.read_body(request)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type == JSON_TYPE:
            images = _json_images(body)
            names = [f"images[{i}]" for i in range(len(images))]
        else:
            images, names = [body], [""]  # the error names no image: there is one
        captions = await asyncio.gather(*(self.batcher.submit(data) for data in images))
        for name, image_captions in zip(names, captions):
            if isinstance(image_captions, ShowtellError):
                raise RequestError(400, f"{name}: {image_captions}" if name else str(image_captions))
        return JSONResponse(
            {"images": [{"captions": [{"sentence": s, "p": p} for s, p in image]} for image in captions]}
        )

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to be over max_request_bytes."""
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"the body has {int(declared)} bytes, over the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
        if not size:
            raise RequestError(400, 'an empty body: POST an image, or JSON {"images": ["<base64>", ...]}')
        return b"".join(chunks)

    def caption_batch(self, images: list[bytes]) -> list[Captions | ShowtellError]:
        """One `caption` call for the batch; per image its captions, or the reason it does not decode."""
        return self.captioner.caption_each(images, **self.search)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _json_images(body: bytes) -> list[bytes]:
    """{"images": ["<base64>", ...]} -> the decoded images; RequestError 400 saying what is wrong."""
    try:
        document = json.loads(body)
    except ValueError as error:  # UnicodeDecodeError too
        raise RequestError(400, f"the body is not JSON ({error})") from None
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list) or not images or not all(isinstance(image, str) for image in images):
        raise RequestError(400, 'the JSON body should be {"images": ["<base64>", ...]}, one or more strings')
    decoded = []
    for i, text in enumerate(images):
        try:
            decoded.append(base64.b64decode(text, validate=True))
        except binascii.Error as error:
            raise RequestError(400, f"images[{i}] is not base64 ({error})") from None
    return decoded


def caption_app(settings: ServeSettings) -> serve.Application:
    """The Ray Serve application: `settings.replicas` CaptionServer replicas over `settings.model`."""
    return CaptionServer.options(
        num_replicas=settings.replicas,
        max_ongoing_requests=max(2 * settings.max_batch_size, MIN_ONGOING_REQUESTS),
        ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": REPLICA_ENV}},
    ).bind(settings)


def check_settings(settings: ServeSettings) -> None:
    """ShowtellError when `settings.model` is not a `showtell export` folder, or the port is taken."""
    if source_kind(settings.model) != SAVED_MODEL:
        raise ShowtellError(
            f"{settings.model}: a published final/ checkpoint; serve takes a `showtell export` folder "
            f"(showtell export --checkpoint {settings.model} OUT)"
        )
    # Ray Serve's proxy retries a port it cannot bind forever; the error is here, at once, instead.
    try:
        family = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy's HTTP server binds it
            probe.bind((settings.host, settings.port))
    except OSError as error:
        raise ShowtellError(f"cannot listen on {settings.host}:{settings.port} ({error.strerror or error})") from None


@contextlib.contextmanager
def serving(settings: ServeSettings) -> Iterator[str]:
    """Serves `settings.model` over HTTP while the block runs; yields the URL, once every replica
    has loaded the export. Starts a local Ray (TensorFlow's lines kept out of its workers' logs)
    unless this process runs one already, and stops what it started at the end. One at a time
    per Ray: a second would take over the first's Serve."""
    check_settings(settings)
    settings = settings.model_copy(update={"model": absolute(settings.model)})  # replicas run in other folders
    started_ray = not ray.is_initialized()
    if started_ray:
        # A Ray of its own on this machine ("local"), never one that `ray start` left running here.
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": REPLICA_ENV})
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if settings.replicas > cpus:
            raise ShowtellError(f"{settings.replicas} replicas: each reserves a CPU and the Ray cluster has {cpus:g}")
        serve.start(http_options={"host": settings.host, "port": settings.port}, logging_config=SERVE_LOGGING)
        try:
            try:
                serve.run(caption_app(settings), name=APP_NAME, route_prefix="/", logging_config=SERVE_LOGGING)
            except RuntimeError:  # Serve's summary names no cause; the replica's constructor's error does
                raise ShowtellError(f"the replicas did not start: {_replica_error()}") from None
            yield f"http://{settings.host}:{settings.port}"
        finally:
            serve.shutdown()
    finally:
        if started_ray:
            ray.shutdown()


def _replica_error() -> str:
    """The last line of what Ray Serve says of the failed deployment: its constructor's exception."""
    deployments = serve.status().applications[APP_NAME].deployments.values()
    lines = [line for deployment in deployments for line in deployment.message.splitlines() if line.strip()]
    return lines[-1] if lines else "see Ray Serve's logs"


def serve_until_stopped(settings: ServeSettings) -> None:
    """`showtell serve`: serves until SIGINT (Ctrl-C) or SIGTERM, then shuts Serve and Ray down.
    (While the replicas start, Ctrl-C, or Ray's own SIGTERM handler, stops it the same way, with
    the exception they raise.)"""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    with serving(settings) as url:
        # Set once Ray is up: ray.init sets its own SIGTERM handler, which exits without a word.
        previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
        log.info("serving %s at %s (%s)", absolute(settings.model), url, settings.describe())
        try:
            threading.Event().wait()  # until a signal
        except KeyboardInterrupt:
            log.info("stopping")
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    log.info("stopped")
