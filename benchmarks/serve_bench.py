"""`showtell serve` load test: dynamic batching against batch size 1, over real HTTP on 127.0.0.1.

    .venv/bin/python benchmarks/serve_bench.py      # the demo's model size (configs/local.yaml), random weights
    .venv/bin/python benchmarks/serve_bench.py --model runs/local/export --images runs/local/raw/zips/val2014.zip

Serves the export twice side by side in one Ray Serve (inference/serve.py's application, one
replica each): with --max-batch-size (dynamic batching) at /batched, and with batch size 1 at
/unbatched, everything else the same. At each concurrency (1, 8, 32), that many clients each
send POST /caption (one JPEG) as soon as their last answer is back, until --requests answers or
--seconds, whichever first; the two servers take turns, run after run, --repeat times, so that
other work on the machine weighs on both alike. Prints throughput (answered requests a second,
the median of the repeats) and p50/p99 latency (over all the repeats' requests) per server and
concurrency, and the ratios. Goal: >= 4x the throughput at concurrency 32 with batching. The
clients share the machine's cores with the servers. A request that fails fails the benchmark.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT)]

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from inference.serve import SERVE_LOGGING, ServeSettings, caption_app  # noqa: E402
from schemas.config import join_url  # noqa: E402
from schemas.layout import EXPORT_METADATA_FILE  # noqa: E402
from schemas.storage import absolute, read_json  # noqa: E402

DEMO_CONFIG = REPO_ROOT / "configs" / "local.yaml"
# A random-weights model's vocabulary, the demo's size: 38 words, <S> and </S> on lines 1 and 2, <UNK> the 39th id.
RANDOM_WORDS = ["a", "<S>", "</S>", *(f"word{i:02d}" for i in range(35))]
WARM_UP_REQUESTS = 64  # sent to each server before the timed runs, 32 at a time: TensorFlow's first calls
SERVERS = {"batched": None, "unbatched": 1}  # route prefix -> max_batch_size (None: --max-batch-size)


@dataclasses.dataclass(frozen=True)
class Run:
    requests: int  # answered in time
    seconds: float  # from the first request sent to the last answer
    latencies: list[float]  # seconds, one per answered request

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds


@dataclasses.dataclass(frozen=True)
class Runs:
    """One server at one concurrency, over the repeats."""

    runs: list[Run]

    @property
    def requests(self) -> int:
        return sum(run.requests for run in self.runs)

    @property
    def throughput(self) -> float:
        return float(np.median([run.throughput for run in self.runs]))

    def percentile(self, q: float) -> float:
        """Latency in milliseconds, over every repeat's requests."""
        return float(np.percentile([latency for run in self.runs for latency in run.latencies], q)) * 1000


def random_demo_export(folder: str) -> tuple[str, str]:
    """Exports a model of the demo's size and shape (configs/local.yaml's `model`) with random
    weights; (its folder, a description)."""
    import keras

    from inference.export import export_saved_model
    from schemas.config import load_config
    from schemas.vocabulary import WORD_COUNTS_FILE
    from trainer import checkpoints as ckpt
    from trainer.model import build_model

    keras.utils.set_random_seed(0)  # the same random weights every run
    config = load_config(str(DEMO_CONFIG), [f"run_root={folder}"])
    word_counts = Path(folder) / WORD_COUNTS_FILE
    word_counts.write_text("".join(f"{word} {1000 - i}\n" for i, word in enumerate(RANDOM_WORDS)))
    model = build_model(config.model, len(RANDOM_WORDS) + 1)
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        state = {"phase": 1, "step": 0, "fingerprint": ckpt.weights_fingerprint(model)}
        ckpt.save_checkpoint(checkpoint_dir, model, keras.optimizers.SGD(), state)
        final = ckpt.publish_final(
            checkpoint_dir, f"{folder}/train/phase1", config.model_dump(mode="json"), str(word_counts)
        )
    return export_saved_model(final, f"{folder}/export"), f"random weights, {DEMO_CONFIG.relative_to(REPO_ROOT)}"


def load_images(source: str | None, count: int) -> tuple[list[bytes], str]:
    """`count` JPEGs: drawn as the sample data's are (pipelines/sample_data.py, 96 px), or those of a
    folder or zip (e.g. the sample data's val2014.zip), cycled when fewer."""
    if source is None:
        from pipelines.sample_data import encode_jpeg, random_image_spec, render_image

        rng, pixels = random.Random(0), np.random.default_rng(0)
        drawn = [encode_jpeg(render_image(random_image_spec(rng), 96, pixels)) for _ in range(count)]
        return drawn, "drawn as the sample data's, 96 px"
    from benchmarks.caption_bench import read_jpegs

    jpegs = read_jpegs(source, count)
    return [jpegs[i % len(jpegs)] for i in range(count)], f"{len(jpegs)} JPEGs from {source}"


async def load(url: str, images: Sequence[bytes], concurrency: int, requests: int, seconds: float) -> Run:
    """`concurrency` clients, each posting the next image once its last answer is back, until
    `requests` answers or `seconds`."""
    latencies: list[float] = []
    sent = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            image = images[sent % len(images)]
            sent += 1
            begun = time.perf_counter()
            async with session.post(f"{url}/caption", data=image, headers={"Content-Type": "image/jpeg"}) as reply:
                body = await reply.json()
                if reply.status != 200 or not body["images"][0]["captions"]:
                    raise RuntimeError(f"POST /caption answered {reply.status}: {body}")
            latencies.append(time.perf_counter() - begun)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return Run(len(latencies), time.perf_counter() - started, latencies)


async def best_captions(url: str, images: Sequence[bytes]) -> list[str]:
    async with aiohttp.ClientSession() as session:
        replies = []
        for image in images:
            async with session.post(f"{url}/caption", data=image) as reply:
                replies.append((await reply.json())["images"][0]["captions"][0]["sentence"])
        return replies


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = ServeSettings.model_fields
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a `showtell export` folder (default: the demo's model, random weights)")
    parser.add_argument("--images", help="a folder or zip of JPEGs (default: JPEGs drawn as the sample data's)")
    parser.add_argument("--max-batch-size", type=int, default=defaults["max_batch_size"].default)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=defaults["batch_wait_timeout_s"].default)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="clients at once, per run")
    parser.add_argument("--requests", type=int, default=200, help="answered requests per run at most")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per run at most")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each server at each concurrency")
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or min(args.requests, args.repeat) < 1 or args.seconds <= 0:
        parser.error("--concurrency, --requests and --repeat must be >= 1, --seconds > 0")
    if args.max_batch_size < 2 or args.batch_wait_timeout_s < 0:
        parser.error("--max-batch-size must be >= 2 (1 is the other server), --batch-wait-timeout-s >= 0")
    return args


def measure(model: str, images: list[bytes], args: argparse.Namespace) -> tuple[dict[tuple[str, int], Runs], int]:
    """Both servers up side by side, warmed up, then the runs, taking turns; (the runs by server
    and concurrency, on how many images the two servers' best captions agree)."""
    # The two replicas reserve a CPU each; their own lines stay in Ray's log folder.
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=SERVE_LOGGING)
        urls = {}
        for name, batch_size in SERVERS.items():
            settings = ServeSettings(
                model=absolute(model),
                port=port,
                max_batch_size=batch_size or args.max_batch_size,
                batch_wait_timeout_s=args.batch_wait_timeout_s,
            )
            serve.run(caption_app(settings), name=name, route_prefix=f"/{name}", logging_config=SERVE_LOGGING)
            urls[name] = f"http://127.0.0.1:{port}/{name}"
        best = {}
        for name, url in urls.items():
            asyncio.run(load(url, images, 32, WARM_UP_REQUESTS, 60))
            best[name] = asyncio.run(best_captions(url, images[:16]))
        runs: dict[tuple[str, int], list[Run]] = {(name, c): [] for c in args.concurrency for name in urls}
        for _ in range(args.repeat):
            for concurrency in args.concurrency:
                for name, url in urls.items():
                    runs[name, concurrency].append(
                        asyncio.run(load(url, images, concurrency, args.requests, args.seconds))
                    )
        return {key: Runs(value) for key, value in runs.items()}, sum(a == b for a, b in zip(*best.values()))
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    images, image_source = load_images(args.images, 64)
    with tempfile.TemporaryDirectory(prefix="showtell-serve-bench-") as scratch:
        model, model_source = (args.model, args.model) if args.model else random_demo_export(scratch)
        metadata = read_json(join_url(model, EXPORT_METADATA_FILE)) or {}
        runs, same = measure(model, images, args)

    shape, search = metadata.get("model", {}), metadata.get("caption", {})
    print(
        f"serve_bench: {shape.get('encoder')} {metadata['image_size']}x{metadata['image_size']}, "
        f"LSTM {metadata['num_lstm_units']}, vocab {metadata['vocab_size']} ({model_source}); "
        f"caption signature: {', '.join(f'{key} {value}' for key, value in search.items())}"
    )
    print(
        f"{len(images)} images ({image_source}); 1 replica per server, batch_wait_timeout_s "
        f"{args.batch_wait_timeout_s:g}; {args.repeat} repeats of up to {args.requests} requests or "
        f"{args.seconds:g} s, taking turns; {os.cpu_count()} CPU cores shared by servers and clients "
        f"(load average {os.getloadavg()[0]:.1f})"
    )
    print(f"agreement: both servers give the same best caption for {same} of 16 images")
    print(f"{'':30s} {'clients':>7s} {'requests':>8s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name in SERVERS:
        label = f"batches up to {args.max_batch_size}" if name == "batched" else "batch size 1 (no batching)"
        for concurrency in args.concurrency:
            result = runs[name, concurrency]
            print(
                f"{label:30s} {concurrency:7d} {result.requests:8d} {result.throughput:8.1f} "
                f"{result.percentile(50):8.1f} {result.percentile(99):8.1f}"
            )
    for concurrency in args.concurrency:
        batched, single = runs["batched", concurrency], runs["unbatched", concurrency]
        print(
            f"concurrency {concurrency:2d}: batching gives {batched.throughput / single.throughput:.1f}x the "
            f"throughput of batch size 1, p99 {batched.percentile(99):.0f} ms against {single.percentile(99):.0f} ms"
            + (" (goal >= 4x)" if concurrency == 32 else "")
        )
    return 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
