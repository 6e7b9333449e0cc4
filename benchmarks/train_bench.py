"""Training throughput: the input pipeline per CPU core, and training examples/s per phase.

    .venv/bin/python benchmarks/train_bench.py            # CPU: input pipeline + demo-config training
    .venv/bin/python benchmarks/train_bench.py --gpu      # on a GPU machine: Inception v3, 299x299, batch 32

Prints figures only (nothing is asserted):
- input pipeline: images/s on ONE core (the process pinned to core 0) at 299x299 with im2txt's
  training augmentation, over COCO-sized 640x480 JPEGs. Goal: >= 250 images/s per core, so that
  8 cores feed ~2000 images/s to one GPU.
- training: examples/s of phase 1 and phase 2 at the demo config (configs/local.yaml: its model,
  image size and batch) with 1 and 2 Ray workers, read from each phase's history.jsonl (first
  report, the warm-up, excluded). Each phase runs --steps steps (a rate needs no more than a few
  reports; the demo's own budget is 1000 + 200).
- --gpu: images/s per GPU for both phases with Inception v3 at 299x299, batch 32, 1 worker
  (im2txt's anchor: 0.7 s a step at batch 32 on a K20, ~46 images/s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "benchmarks")]
SHOWTELL = Path(sys.executable).parent / "showtell"

COCO_LIKE_IMAGES = 400  # distinct 640x480 JPEGs in the input-pipeline benchmark
INPUT_WARMUP_BATCHES = 5


def write_coco_like_records(path: Path, count: int) -> Path:
    """One TFRecord file of `count` records holding 640x480 JPEGs (~166 KB) and short captions."""
    from preprocess_bench import make_jpeg

    from schemas.records import encode_sequence_example
    from schemas.tfrecord import write_records

    tokens = ["<S>", "a", "man", "riding", "a", "wave", "</S>"]
    with path.open("wb") as handle:
        write_records(handle, (encode_sequence_example(i, make_jpeg(i), tokens, list(range(7))) for i in range(count)))
    return path


def input_images_per_second(records: Path, image_size: int, batch_size: int, seconds: float) -> float:
    """Images/s of the training input pipeline with this process pinned to one core."""
    os.sched_setaffinity(0, {0})
    import tensorflow as tf

    from trainer.inputs import make_dataset

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    dataset = make_dataset([str(records)], image_size=image_size, batch_size=batch_size, training=True)
    batches = iter(dataset)
    for _ in range(INPUT_WARMUP_BATCHES):
        next(batches)
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        features, _, _ = next(batches)
        images += int(features["images"].shape[0])
    return images / (time.perf_counter() - started)


def run_step(args: list[str], log: Path) -> None:
    with log.open("ab") as handle:
        result = subprocess.run([str(SHOWTELL), *args], cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"showtell {' '.join(args)} failed; see {log}")


def examples_per_second(history: Path) -> float:
    """Mean examples/s over a phase's reports, the first (warm-up) excluded."""
    reports = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    rates = [r["examples_per_sec"] for r in reports[1:]] or [reports[0]["examples_per_sec"]]
    return sum(rates) / len(rates)


def training_examples_per_second(workdir: Path, overrides: Sequence[str], workers: int) -> dict[str, float]:
    """Runs download, preprocess and both phases on the demo config; examples/s per phase."""
    run_root = workdir / f"run-{workers}w"
    sets = [f"run_root={run_root}", f"ray.num_workers={workers}", *overrides]
    config = ["--config", str(REPO_ROOT / "configs" / "local.yaml"), *(arg for s in sets for arg in ("--set", s))]
    log = workdir / f"train-{workers}w.log"
    for step in (["download"], ["preprocess"]):
        run_step([*step, *config], log)
    rates = {}
    for phase in (1, 2):
        run_step(["train", "--phase", str(phase), *config], log)
        rates[f"phase {phase}"] = examples_per_second(run_root / "train" / f"phase{phase}" / "history.jsonl")
    return rates


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="Inception v3, 299x299, batch 32, 1 GPU worker")
    parser.add_argument("--input-seconds", type=float, default=20.0, help="how long to time the input pipeline")
    parser.add_argument("--workdir", type=Path, help="where to write (default: a fresh temp dir)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per phase (a report every steps/4)")
    parser.add_argument("--skip-training", action="store_true", help="time the input pipeline only")
    # Internal: time the input pipeline over this file in a process of its own (it pins itself to one core).
    parser.add_argument("--input-only", type=Path, help=argparse.SUPPRESS)
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
        rate = input_images_per_second(args.input_only, 299, 32, args.input_seconds)
        print(
            f"input pipeline: {rate:8.1f} images/s on one core "
            "(299x299, training augmentation, 640x480 JPEGs; goal >= 250)"
        )
        return 0
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="showtell-train-bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.gpu:
        overrides = [*GPU_OVERRIDES, *step_overrides(args.steps)]
        for phase, rate in training_examples_per_second(workdir, overrides, workers=1).items():
            print(f"{phase}: {rate:8.1f} images/s per GPU (Inception v3, 299x299, batch 32; im2txt on a K20: ~46)")
        return 0
    records = write_coco_like_records(workdir / "coco-like.tfrecord", COCO_LIKE_IMAGES)
    command = [sys.executable, __file__, "--input-only", str(records), "--input-seconds", str(args.input_seconds)]
    child = subprocess.run(command, capture_output=True, text=True)
    print(child.stdout.strip() or child.stderr[-3000:])
    if args.skip_training:
        return 0
    for workers in (1, 2):
        for phase, rate in training_examples_per_second(workdir, step_overrides(args.steps), workers).items():
            print(f"training {phase}, {workers} worker(s), demo config: {rate:8.1f} examples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
