"""Batch captioning throughput: `showtell caption-batch` (Beam, RunInference, the DirectRunner's
worker processes) against `showtell caption` in one process, on the same images, side by side.

    .venv/bin/python benchmarks/caption_batch_bench.py                       # a random demo-sized model
    .venv/bin/python benchmarks/caption_batch_bench.py --model runs/local/export --images 2000

Both are run as a user runs them, through the CLI in a fresh process each, so the figures include
starting Python, TensorFlow and (for caption-batch) the Beam workers; both use the export's
`caption` signature at its settings, 64 images per call, and check every file before captioning
it. The images are COCO-sized JPEGs (640x480, noisy shapes) the script writes once. Each run is
timed --repeat times, alternating; medians, in images/s, with the cores each kept busy (its
processes' CPU seconds per second of wall clock: what is left for a second process). An
untimed first comparison checks that the two give the same captions for every image. Goal:
caption-batch >= 1.7x `showtell caption` on 2 cores. Figures only; only a disagreement fails.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT)]

SHOWTELL = [sys.executable, "-m", "orchestration.cli"]


def write_images(folder: Path, count: int, width: int = 640, height: int = 480) -> list[Path]:
    """`count` distinct COCO-sized JPEGs: a coloured shape on a noisy background (~100-200 KB each)."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        background = rng.integers(0, 255, 3)
        pixels = np.clip(background + rng.normal(0, 24, (height, width, 3)), 0, 255).astype(np.uint8)
        picture = Image.fromarray(pixels, "RGB")
        (left, right), (top, bottom) = sorted(rng.integers(0, width, 2)), sorted(rng.integers(0, height, 2))
        ImageDraw.Draw(picture).ellipse([left, top, right, bottom], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        path = folder / f"image-{index:05d}.jpg"
        picture.save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def random_export(folder: Path) -> str:
    """The demo's model (configs/local.yaml) with random weights, exported as `showtell export` does."""
    import keras

    from benchmarks.caption_bench import RANDOM_VOCAB_SIZE, export_model
    from inference.caption_signature import Search
    from schemas.config import load_config
    from trainer.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model(load_config(REPO_ROOT / "configs" / "local.yaml").model, RANDOM_VOCAB_SIZE)
    return export_model(model, None, folder, Search())


def caption_in_one_process(model: str, paths: list[Path]) -> dict[str, list[str]]:
    """`showtell caption --json` over every file: path -> its captions' sentences."""
    done = subprocess.run(
        [*SHOWTELL, "-q", "caption", "--checkpoint", model, "--json", *map(str, paths)],
        check=True, capture_output=True, text=True, cwd=REPO_ROOT,
    )
    return {r["path"]: [c["sentence"] for c in r["captions"]] for r in json.loads(done.stdout)["images"]}


def caption_batch(model: str, folder: Path, output: Path) -> dict[str, list[str]]:
    """`showtell caption-batch` over the folder into `output` (a new folder): path -> sentences."""
    subprocess.run(
        [*SHOWTELL, "-q", "caption-batch", "--model", model, "--input", str(folder / "*.jpg"), "--output", str(output)],
        check=True, capture_output=True, text=True, cwd=REPO_ROOT,
    )
    lines = [json.loads(line) for shard in sorted(output.glob("captions-*.jsonl")) for line in shard.open()]
    return {line["path"]: [c["sentence"] for c in line["captions"]] for line in lines}


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's ended and waited-for children, theirs included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a `showtell export` folder (default: the demo's model, random weights)")
    parser.add_argument("--images", type=int, default=2000, help="how many 640x480 JPEGs to caption")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs of each (medians)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeat < 1:
        parser.error("--images and --repeat must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="caption-batch-bench-") as scratch:
        root = Path(scratch)
        folder = root / "images"
        folder.mkdir()
        started = time.perf_counter()
        paths = write_images(folder, args.images)
        size = sum(path.stat().st_size for path in paths) / len(paths)
        model = args.model or random_export(root / "model")
        print(
            f"caption_batch_bench: {len(paths)} JPEGs of 640x480 (mean {size / 1024:.0f} KB, written in "
            f"{time.perf_counter() - started:.0f} s); model {args.model or 'the demo model, random weights'}; "
            f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f})"
        )
        one = caption_in_one_process(model, paths)
        batch = caption_batch(model, folder, root / "check")
        if one != {str(path): batch[str(path)] for path in paths}:
            different = [path for path in paths if one.get(str(path)) != batch.get(str(path))]
            sys.exit(f"caption-batch and showtell caption disagree on {len(different)} images, e.g. {different[0]}")
        print(f"agreement: caption-batch and showtell caption give the same captions for all {len(paths)} images")

        times: dict[str, list[float]] = {"showtell caption, one process": [], "showtell caption-batch": []}
        busy: dict[str, list[float]] = {name: [] for name in times}  # CPU seconds (user + sys) per second
        for repeat in range(args.repeat):
            for name in times:
                started, cpu = time.perf_counter(), children_cpu_seconds()
                if name.endswith("caption-batch"):
                    caption_batch(model, folder, root / f"run-{repeat}")
                else:
                    caption_in_one_process(model, paths)
                times[name].append(time.perf_counter() - started)
                busy[name].append((children_cpu_seconds() - cpu) / times[name][-1])
    seconds = {name: statistics.median(values) for name, values in times.items()}
    baseline = seconds["showtell caption, one process"]
    print(f"{'':32s} {'seconds':>8s} {'images/s':>9s} {'cores busy':>10s} {'ratio':>7s}")
    for name, elapsed in seconds.items():
        cores = statistics.median(busy[name])
        print(f"{name:32s} {elapsed:8.1f} {len(paths) / elapsed:9.1f} {cores:10.2f} {baseline / elapsed:6.2f}x")
    ratio = baseline / seconds["showtell caption-batch"]
    print(f"caption-batch: {ratio:.2f}x showtell caption (goal >= 1.7x on 2 cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
