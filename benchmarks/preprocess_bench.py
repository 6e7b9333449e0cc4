"""Times `showtell preprocess` against im2txt's threaded writer on the same COCO-sized images.

    .venv/bin/python benchmarks/preprocess_bench.py [--images 2000] [--workdir DIR] [--keep]

Makes N images like MSCOCO's (640x480 JPEG, ~165 KB each, 5 captions each; about 2/3 in
train2014, 1/3 in val2014), both in MSCOCO's download layout (zips, for `showtell download`)
and extracted (plain folders, for the baseline). Then, one after the other, it times the whole
`showtell preprocess` command and the whole `benchmarks/im2txt_threaded_writer.py` command (each
a subprocess paying its own imports) and prints records, seconds and records/s for both and
their ratio (after an untimed import of their libraries, so that neither pays a cold disk cache
for the other). Figures only: nothing is asserted. The issue's goal on 2 cores: ratio >= 2.

This machine is noisy: `--repeat N` rounds (default 3) alternate which command goes first, each
timed command starts after an untimed `sync` (so it doesn't pay for the other's writes), and
the ratio is of the medians.

Images are cached in --workdir and reused by a rerun with the same --images; the shards both
writers produce are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINE_SCRIPT = REPO_ROOT / "benchmarks" / "im2txt_threaded_writer.py"
SHOWTELL = Path(sys.executable).parent / "showtell"

GENERATOR_VERSION = 2  # bump when the images or captions change, so cached ones are remade
TRAIN2014_SHARE = 82_783 / (82_783 + 40_504)  # MSCOCO 2014's train/val image counts
WIDTH, HEIGHT = 640, 480
JPEG_QUALITY = 90
GRAIN = 35  # uniform grain of +-35 levels on a smooth colour field: ~165 KB a JPEG (MSCOCO: ~155 KB)
MIN_JPEG_BYTES = 100_000
CAPTIONS_PER_IMAGE = 5

SUBJECTS = ["man", "woman", "dog", "cat", "child", "group of people", "bus", "train", "giraffe", "surfer"]
COLOURS = ["red", "white", "black", "small", "large", "young", "old", "yellow"]
ACTIONS = ["riding", "standing next to", "sitting on", "walking down", "looking at", "holding", "near"]
OBJECTS = ["a wave", "the street", "a table", "a field", "a surfboard", "a bench", "the beach", "a kitchen"]


class ImageSpec(NamedTuple):
    folder: str  # train2014 or val2014
    image_id: int

    @property
    def file_name(self) -> str:
        return f"COCO_{self.folder}_{self.image_id:012d}.jpg"


class Timing(NamedTuple):
    seconds: float
    records: dict[str, int]  # per split
    output_bytes: int

    @property
    def total(self) -> int:
        return sum(self.records.values())


# ---- the images and captions ----


def plan_images(count: int) -> list[ImageSpec]:
    train_count = round(count * TRAIN2014_SHARE)
    return [ImageSpec("train2014" if i < train_count else "val2014", i + 1) for i in range(count)]


def make_jpeg(seed: int) -> bytes:
    """A 640x480 JPEG of a smooth random colour field under grain; deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(HEIGHT // 32, WIDTH // 32, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(field + rng.integers(-GRAIN, GRAIN + 1, size=field.shape, dtype=np.int16), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def write_image(job: tuple[str, int]) -> int:
    path, seed = job
    jpeg = make_jpeg(seed)
    if len(jpeg) < MIN_JPEG_BYTES:
        raise RuntimeError(f"{path}: {len(jpeg)} B, under the {MIN_JPEG_BYTES} B a COCO-sized image needs")
    Path(path).write_bytes(jpeg)
    return len(jpeg)


def make_captions(image_id: int) -> list[str]:
    """Five captions in MSCOCO's style; one in ten carries a word seen once (an `<UNK>`)."""
    rng = random.Random(image_id)
    captions = []
    for _ in range(CAPTIONS_PER_IMAGE):
        words = [
            rng.choice(["A", "a", "The"]),
            rng.choice(COLOURS),
            rng.choice(SUBJECTS),
            rng.choice(ACTIONS),
            rng.choice(OBJECTS),
        ]
        if rng.random() < 0.1:
            words.append(f"with a zq{image_id}x{len(captions)}")
        captions.append(" ".join(words) + rng.choice([".", "", " ."]))
    return captions


def captions_json(specs: list[ImageSpec]) -> dict:
    """A COCO captions file: `images` in the given order, `annotations` 5 an image."""
    images = [{"id": s.image_id, "file_name": s.file_name, "width": WIDTH, "height": HEIGHT} for s in specs]
    annotations = [
        {"id": s.image_id * CAPTIONS_PER_IMAGE + k, "image_id": s.image_id, "caption": caption}
        for s in specs
        for k, caption in enumerate(make_captions(s.image_id))
    ]
    return {"images": images, "annotations": annotations}


def generate_extracted(extracted: Path, specs: list[ImageSpec]) -> list[int]:
    """Writes MSCOCO's extracted layout (train2014/, val2014/, annotations/); returns the JPEG sizes."""
    shutil.rmtree(extracted, ignore_errors=True)
    for folder in ("train2014", "val2014", "annotations"):
        (extracted / folder).mkdir(parents=True)
    jobs = [(str(extracted / s.folder / s.file_name), s.image_id) for s in specs]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        sizes = pool.map(write_image, jobs, chunksize=16)
    for folder in ("train2014", "val2014"):
        document = captions_json([s for s in specs if s.folder == folder])
        (extracted / "annotations" / f"captions_{folder}.json").write_text(json.dumps(document))
    return sizes


def write_download_layout(extracted: Path, layout: Path) -> None:
    """The same data zipped as MSCOCO serves it, for `showtell download` to mirror."""
    from pipelines.sample_data import write_mscoco_layout

    def members(folder: str) -> dict[str, bytes]:
        return {f"{folder}/{path.name}": path.read_bytes() for path in sorted((extracted / folder).iterdir())}

    def document(folder: str) -> dict:
        return json.loads((extracted / "annotations" / f"captions_{folder}.json").read_text())

    shutil.rmtree(layout, ignore_errors=True)
    write_mscoco_layout(
        str(layout), document("train2014"), document("val2014"), members("train2014"), members("val2014")
    )


def prepare_images(workdir: Path, count: int) -> Path:
    """The extracted folder of `count` images, generated unless the workdir already holds it."""
    extracted, marker = workdir / "extracted", workdir / "extracted.json"
    wanted = {"images": count, "generator": GENERATOR_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        print(f"reusing {count} images in {extracted}")
        return extracted
    for stale in (marker, workdir / "layout.json"):
        stale.unlink(missing_ok=True)
    shutil.rmtree(workdir / "run", ignore_errors=True)  # its mirror holds the old images
    started = time.perf_counter()
    sizes = generate_extracted(extracted, plan_images(count))
    print(
        f"generated {count} images in {time.perf_counter() - started:.1f} s "
        f"({min(sizes) / 1e3:.0f}-{max(sizes) / 1e3:.0f} KB, mean {np.mean(sizes) / 1e3:.0f} KB)"
    )
    marker.write_text(json.dumps(wanted))
    return extracted


def prepare_layout(workdir: Path, extracted: Path) -> Path:
    layout, marker = workdir / "layout", workdir / "layout.json"
    wanted = json.loads((workdir / "extracted.json").read_text())
    if not (marker.exists() and json.loads(marker.read_text()) == wanted):
        started = time.perf_counter()
        write_download_layout(extracted, layout)
        print(f"wrote MSCOCO's download layout in {time.perf_counter() - started:.1f} s")
        marker.write_text(json.dumps(wanted))
    return layout


# ---- the two timed commands ----


def write_config(workdir: Path, layout: Path, shards: Sequence[int]) -> Path:
    import yaml

    train, val, test = shards
    config = {
        "run_root": str(workdir / "run"),
        "data": {"source": str(layout), "shards": {"train": train, "val": val, "test": test}},
    }
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_logged(command: list[str], log: Path) -> float:
    """Runs a command with its output to `log`; returns its wall time in seconds, exits on failure.

    Dirty pages are flushed first (untimed), so no command pays for the previous one's writes.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    os.sync()
    started = time.perf_counter()
    with log.open("wb") as handle:
        result = subprocess.run(command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if result.returncode:
        tail = log.read_text(errors="replace")[-4000:]
        sys.exit(f"{' '.join(command)} failed (exit {result.returncode}); last of {log}:\n{tail}")
    return seconds


def count_records(path: Path) -> int:
    """Records in a TFRecord file, counted from the framing headers without reading the payloads."""
    count = 0
    with path.open("rb") as handle:
        while header := handle.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            handle.seek(length + 4, os.SEEK_CUR)
            count += 1
    return count


def measure_output(output_dir: Path, seconds: float) -> Timing:
    records = {
        split: sum(count_records(p) for p in output_dir.glob(f"{split}-*-of-*")) for split in ("train", "val", "test")
    }
    output_bytes = sum(p.stat().st_size for p in output_dir.glob("*-of-*"))
    return Timing(seconds, records, output_bytes)


def warm_imports(workdir: Path) -> None:
    """Reads the libraries both commands import into the page cache, so neither pays a cold disk."""
    command = [sys.executable, "-c", "import apache_beam, nltk, tensorflow, tensorflow_transform"]
    run_logged(command, workdir / "logs" / "warm_imports.log")


def mirror_layout(workdir: Path, config: Path) -> None:
    run_logged([str(SHOWTELL), "download", "--config", str(config)], workdir / "logs" / "download.log")


def time_pipeline(workdir: Path, config: Path) -> Timing:
    data_dir = workdir / "run" / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    seconds = run_logged([str(SHOWTELL), "preprocess", "--config", str(config)], workdir / "logs" / "preprocess.log")
    return measure_output(data_dir, seconds)


def time_baseline(workdir: Path, extracted: Path, shards: Sequence[int]) -> Timing:
    output_dir = workdir / "baseline"
    shutil.rmtree(output_dir, ignore_errors=True)
    command = [sys.executable, str(BASELINE_SCRIPT), str(extracted), str(output_dir), "--shards", *map(str, shards)]
    seconds = run_logged(command, workdir / "logs" / "baseline.log")
    return measure_output(output_dir, seconds)


# ---- the report ----


def print_results(rounds: list[dict[str, Timing]]) -> None:
    """Each round's figures, then the medians and the ratio of the medians."""
    names = list(rounds[0])
    print(
        f"\n{'':24} {'round':>5} {'records':>8} {'seconds':>8} {'records/s':>10} {'train/val/test':>16} {'output':>9}"
    )
    for number, results in enumerate(rounds, 1):
        for name in names:
            t = results[name]
            splits = "/".join(str(n) for n in t.records.values())
            print(
                f"{name:24} {number:5d} {t.total:8d} {t.seconds:8.1f} {t.total / t.seconds:10.1f} {splits:>16} "
                f"{t.output_bytes / 1e9:7.2f} GB"
            )
    medians = {name: statistics.median(r[name].total / r[name].seconds for r in rounds) for name in names}
    for name, rate in medians.items():
        print(f"median {name:17} {rate:10.1f} records/s over {len(rounds)} round(s)")
    if len(names) == 2:
        pipeline, baseline = names
        print(
            f"\nratio pipeline/baseline: {medians[pipeline] / medians[baseline]:.2f}x records/s (medians) "
            f"on {os.cpu_count()} cores (goal: >= 2x on 2 cores)"
        )
        counts = {name: r[name].records for r in rounds for name in names}
        if counts[pipeline] != counts[baseline]:
            print(f"\n!!! RECORD COUNTS DIFFER: pipeline {counts[pipeline]} vs baseline {counts[baseline]} !!!")
        else:
            print(f"both wrote {rounds[0][pipeline].total} records")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="images to generate (5 records each)")
    parser.add_argument("--workdir", type=Path, help="where images are cached between runs (default: a fresh temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the shards written (and a temp workdir)")
    parser.add_argument("--shards", type=int, nargs=3, default=(256, 4, 8), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--baseline-only", action="store_true", help="time only the im2txt threaded writer")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, alternating which command goes first")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="showtell-bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    extracted = prepare_images(workdir, args.images)
    if not args.baseline_only:
        config = write_config(workdir, prepare_layout(workdir, extracted), args.shards)
        mirror_layout(workdir, config)
    warm_imports(workdir)
    print(f"1-min load average before timing: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    timers = {"im2txt threaded writer": lambda: time_baseline(workdir, extracted, args.shards)}
    if not args.baseline_only:
        timers = {"showtell preprocess": lambda: time_pipeline(workdir, config), **timers}
    rounds = []
    for number in range(args.repeat):
        order = list(timers) if number % 2 == 0 else list(reversed(timers))
        timed = {name: timers[name]() for name in order}
        rounds.append({name: timed[name] for name in timers})
        print(f"round {number + 1}: " + ", ".join(f"{name} {t.seconds:.1f} s" for name, t in timed.items()), flush=True)
    print_results(rounds)
    if args.keep:
        print(f"kept: {workdir} (shards in run/data and baseline, logs in logs)")
    elif args.workdir is None:
        shutil.rmtree(workdir)
    else:
        shutil.rmtree(workdir / "baseline", ignore_errors=True)
        shutil.rmtree(workdir / "run" / "data", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
