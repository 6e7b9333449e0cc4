"""Training throughput: the input pipeline per CPU core, and training examples/s per phase.

    .venv/bin/python benchmarks/train_bench.py            # CPU: input pipeline + demo-config training
    .venv/bin/python benchmarks/train_bench.py --gpu      # on a GPU machine: Inception v3, 299x299, batch 32
    .venv/bin/python benchmarks/train_bench.py --store s3 --skip-training   # input pipeline: local disk vs S3

Prints figures only (nothing is asserted):
- input pipeline: images/s on ONE core (the process pinned to core 0) at 299x299 with im2txt's
  training augmentation, over COCO-sized 640x480 JPEGs. Goal: >= 250 images/s per core, so that
  8 cores feed ~2000 images/s to one GPU. The records are COCO_LIKE_SHARDS shards.
- --store s3: the same input pipeline over the same shards read from local disk and from an S3
  server (moto, started here on 127.0.0.1 and kept off core 0: it stands for another machine),
  alternately, --repeats times each, in one run; each timing in a process of its own pinned to
  core 0, so the shard cache's downloads (trainer/shard_cache.py) are counted against that core.
  Printed side by side: the medians, their ratio (goal: S3 >= 0.9x local) and each pair's, and the
  cache's disk high-water mark against its bound (`train.shard_cache.max_bytes`, here
  --cache-shards times the largest shard).
- training: examples/s of phase 1 and phase 2 at the demo config (configs/local.yaml: its model,
  image size and batch) with 1 and 2 Ray workers, read from each phase's history.jsonl (first
  report, the warm-up, excluded). Each phase runs --steps steps (a rate needs no more than a few
  reports; the demo's own budget is 1000 + 200).
- --gpu: images/s per GPU for both phases with Inception v3 at 299x299, batch 32, 1 worker
  (im2txt's anchor: 0.7 s a step at batch 32 on a K20, ~46 images/s).
- --feature-cache: phase 1's examples/s from images and from the feature cache
  (`train.phase1.feature_cache`), side by side, for Inception v3 at 299 (batch 32, 512-unit LSTM;
  random weights the benchmark saves, as none can be downloaded here) and for the demo's model,
  each on 1 Ray worker over the demo's sample data; the cache's build time and bytes per image
  (cache.json); the projection to MSCOCO (cache size, build time, phase 1 on one GPU), with its
  arithmetic. Goal: the cache >= 10x for Inception v3.
- --framework-tax: showtell's phase-1 step (a Ray Train worker, MultiWorkerMirroredStrategy with
  1 worker, the custom loop, its reports and checkpoints: history.jsonl's examples/s) against a
  bare single-process `tf.function` step of the same model on the same input pipeline and batch
  (the demo's model, from images and from the cache). Goal: >= 0.9x.
- --quality: validation perplexity after phase 1 from images and from the cache at the same
  steps (the demo's config; its encoder first pretrained, then frozen for both, as weights file).
  Goal: the cache's within 5% of the images'.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "benchmarks")]

import phase1_cache  # noqa: E402 - benchmarks/ is on the path from the line above

SHOWTELL = Path(sys.executable).parent / "showtell"

COCO_LIKE_IMAGES = 400  # distinct 640x480 JPEGs in the input-pipeline benchmark
COCO_LIKE_SHARDS = 16  # ... in this many shards (~4 MB each)
BUCKET = "showtell-bench"
INPUT_WARMUP_BATCHES = 5


def write_coco_like_records(folder: Path, count: int, shards: int) -> Path:
    """`count` records holding 640x480 JPEGs (~166 KB) and short captions, in `shards` train shards
    under `folder` (records dealt round-robin)."""
    from preprocess_bench import make_jpeg

    from schemas.records import encode_sequence_example, shard_name
    from schemas.tfrecord import write_records

    tokens = ["<S>", "a", "man", "riding", "a", "wave", "</S>"]
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with (folder / shard_name("train", shard, shards)).open("wb") as handle:
            ids = range(shard, count, shards)
            write_records(handle, (encode_sequence_example(i, make_jpeg(i), tokens, list(range(7))) for i in ids))
    return folder


def input_images_per_second(
    data: str, image_size: int, batch_size: int, seconds: float, cache_bytes: Optional[int] = None
) -> float:
    """Images/s of the training input pipeline over the train shards under `data` (a local folder
    or an s3:// URL) with this process pinned to one core."""
    os.sched_setaffinity(0, {0})
    import tensorflow as tf

    from schemas.config import ShardCache
    from trainer.inputs import make_dataset, shard_files

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    cache = ShardCache(max_bytes=cache_bytes) if cache_bytes else None
    files = shard_files(data, "train")
    dataset = make_dataset(files, image_size=image_size, batch_size=batch_size, training=True, shard_cache_config=cache)
    batches = iter(dataset)
    for _ in range(INPUT_WARMUP_BATCHES):
        next(batches)
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        features, _, _ = next(batches)
        images += int(features["images"].shape[0])
    return images / (time.perf_counter() - started)


@contextlib.contextmanager
def moto_s3(folder: Path) -> Iterator[str]:
    """An S3 server (moto) in a process of its own on 127.0.0.1, with BUCKET holding the shards of
    `folder` under data/; this process's environment points at it (the input processes inherit it).
    Yields the shards' s3:// folder."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    others = os.sched_getaffinity(0) - {0}
    if others:  # the server stands for another machine: off the input pipeline's core
        os.sched_setaffinity(server.pid, others)
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )  # fmt: skip
    try:
        import boto3

        client = boto3.client("s3")
        for _ in range(100):  # up within a few seconds
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.1)
        for path in sorted(folder.iterdir()):
            client.upload_file(str(path), BUCKET, f"data/{path.name}")
        yield f"s3://{BUCKET}/data"
    finally:
        server.terminate()
        server.wait()


def time_input(data: str, seconds: float, cache_bytes: Optional[int] = None) -> dict:
    """`input_images_per_second` over `data` in a child process (it pins itself to core 0)."""
    command = [sys.executable, __file__, "--input-only", data, "--input-seconds", str(seconds)]
    if cache_bytes:
        command += ["--cache-bytes", str(cache_bytes)]
    child = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if child.returncode or not lines:
        sys.exit(f"input pipeline over {data} failed:\n{child.stderr[-3000:]}")
    return json.loads(lines[-1])


def training_examples_per_second(workdir: Path, overrides: Sequence[str], workers: int) -> dict[str, float]:
    """Runs download, preprocess and both phases on the demo config; examples/s per phase."""
    run_root = workdir / f"run-{workers}w"
    sets = [f"run_root={run_root}", f"ray.num_workers={workers}", *overrides]
    config = ["--config", str(REPO_ROOT / "configs" / "local.yaml"), *(arg for s in sets for arg in ("--set", s))]
    log = workdir / f"train-{workers}w.log"
    for step in (["download"], ["preprocess"]):
        phase1_cache.run_step([*step, *config], log)
    rates = {}
    for phase in (1, 2):
        phase1_cache.run_step(["train", "--phase", str(phase), *config], log)
        history = run_root / "train" / f"phase{phase}" / "history.jsonl"
        rates[f"phase {phase}"] = phase1_cache.examples_per_second(history)
    return rates


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="Inception v3, 299x299, batch 32, 1 GPU worker")
    parser.add_argument("--input-seconds", type=float, default=20.0, help="how long to time the input pipeline")
    parser.add_argument("--workdir", type=Path, help="where to write (default: a fresh temp dir)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per phase (a report every steps/4)")
    parser.add_argument("--skip-training", action="store_true", help="time the input pipeline only")
    parser.add_argument(
        "--store", choices=["local", "s3"], default="local",
        help="local: the input pipeline over local disk; s3: also over an S3 server (moto) on 127.0.0.1, side by side",
    )  # fmt: skip
    parser.add_argument("--feature-cache", action="store_true", help="phase 1 from images vs from the cache")
    parser.add_argument("--framework-tax", action="store_true", help="showtell's phase-1 step vs a bare one")
    parser.add_argument("--quality", action="store_true", help="val perplexity, from images vs from the cache")
    parser.add_argument("--cache-steps", type=int, default=100, help="phase 1 steps per run from images (x5 cached)")
    parser.add_argument("--cache-shards", type=int, default=6, help="--store s3: the cache's bound, in largest shards")
    parser.add_argument("--repeats", type=int, default=3, help="--store s3: local/S3 timing pairs, alternated")
    # Internal: time the input pipeline over these shards in a process of its own (it pins itself to one core).
    parser.add_argument("--input-only", help=argparse.SUPPRESS)
    parser.add_argument("--cache-bytes", type=int, help=argparse.SUPPRESS)
    # Internal: a bare tf.function training step over a run root's data, in a process of its own.
    parser.add_argument("--bare-step", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


GPU_OVERRIDES = [
    "model.encoder=inception_v3", "model.image_size=299", "model.encoder_weights=none",
    "model.embedding_size=512", "model.num_lstm_units=512", "ray.use_gpu=true",
    "train.phase1.batch_size=32", "train.phase2.batch_size=32",
    "train.phase1.train_encoder=false",  # im2txt's phase 1: Inception frozen (the demo config trains it)
]  # fmt: skip


def step_overrides(steps: int) -> list[str]:
    """`--set` values: each phase trains `steps` steps, reporting (and checkpointing) four times.
    Phase 1's encoder pretraining is off: it comes before the first report and is not timed."""
    every = max(1, steps // 4)
    per_phase = [
        f"train.phase{n}.{key}={value}"
        for n in (1, 2)
        for key, value in (("steps", steps), ("checkpoint_every", every))
    ]
    return [*per_phase, "train.phase1.encoder_pretrain_steps=0"]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.input_only:
        from trainer.shard_cache import process_high_water_bytes

        rate = input_images_per_second(args.input_only, 299, 32, args.input_seconds, args.cache_bytes)
        print(json.dumps({"images_per_second": rate, "cache_high_water_bytes": process_high_water_bytes()}))
        return 0
    if args.bare_step:
        print(json.dumps(phase1_cache.bare_step_rate(json.loads(args.bare_step))))
        return 0
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="showtell-train-bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.feature_cache or args.framework_tax or args.quality:
        bench = phase1_cache.Phase1Bench(workdir, args.cache_steps, __file__)
        if args.feature_cache:
            bench.feature_cache_speed()
        if args.framework_tax:
            bench.framework_tax()
        if args.quality:
            bench.quality()
        return 0
    if args.gpu:
        overrides = [*GPU_OVERRIDES, *step_overrides(args.steps)]
        for phase, rate in training_examples_per_second(workdir, overrides, workers=1).items():
            print(f"{phase}: {rate:8.1f} images/s per GPU (Inception v3, 299x299, batch 32; im2txt on a K20: ~46)")
        return 0
    shards = write_coco_like_records(workdir / "coco-like", COCO_LIKE_IMAGES, COCO_LIKE_SHARDS)
    if args.store == "local":
        local = time_input(str(shards), args.input_seconds)["images_per_second"]
        print(
            f"input pipeline: {local:8.1f} images/s on one core "
            "(299x299, training augmentation, 640x480 JPEGs, local disk; goal >= 250)"
        )
    else:
        largest = max(path.stat().st_size for path in shards.iterdir())
        total = sum(path.stat().st_size for path in shards.iterdir())
        bound = args.cache_shards * largest
        locals_, remotes = [], []
        with moto_s3(shards) as url:
            for _ in range(args.repeats):  # alternated, so a noisy minute hits both sides alike
                locals_.append(time_input(str(shards), args.input_seconds)["images_per_second"])
                remotes.append(time_input(url, args.input_seconds, cache_bytes=bound))
        local = statistics.median(locals_)
        rate = statistics.median(remote["images_per_second"] for remote in remotes)
        high_water = max(remote["cache_high_water_bytes"] for remote in remotes)
        each = ", ".join(f"{r['images_per_second'] / on_disk:.2f}x" for on_disk, r in zip(locals_, remotes))
        print(
            f"input pipeline: {local:8.1f} images/s on one core "
            f"(299x299, training augmentation, 640x480 JPEGs, local disk; goal >= 250; median of {args.repeats})"
        )
        print(f"input pipeline: {rate:8.1f} images/s on one core, the same shards on S3 (moto on 127.0.0.1)")
        print(f"S3 / local: {rate / local:.2f}x (goal >= 0.9x; each pair: {each})")
        print(
            f"shard cache: disk high-water mark {high_water / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB "
            f"({args.cache_shards} x the largest shard); the shards: {total / 2**20:.1f} MiB in {COCO_LIKE_SHARDS}"
        )
    if args.skip_training:
        return 0
    for workers in (1, 2):
        for phase, rate in training_examples_per_second(workdir, step_overrides(args.steps), workers).items():
            print(f"training {phase}, {workers} worker(s), demo config: {rate:8.1f} examples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
