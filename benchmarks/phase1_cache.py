"""train_bench.py's phase-1 figures: from images against from the feature cache, the framework
tax, and validation perplexity both ways. Every run is a real `showtell train --phase 1` on the
demo's sample data (configs/local.yaml), 1 Ray worker, with its overrides; see train_bench.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHOWTELL = Path(sys.executable).parent / "showtell"
DEMO_CONFIG = REPO_ROOT / "configs" / "local.yaml"

INCEPTION = {  # im2txt's phase 1: Inception v3 at 299, 512-d embeddings and LSTM, batch 32
    "model.encoder": "inception_v3", "model.image_size": 299, "model.embedding_size": 512,
    "model.num_lstm_units": 512, "train.phase1.batch_size": 32,
}  # fmt: skip
DEMO: dict = {}  # configs/local.yaml's model and batch as they are
COMMON = {"ray.num_workers": 1, "train.phase1.encoder_pretrain_steps": 0}

# MSCOCO 2014 as this project splits it (../shared/REFERENCE.md): train = train2014 + 85% of val2014,
# val = the next 5% of val2014.
MSCOCO_TRAIN_IMAGES = 82_783 + int(0.85 * 40_504)
MSCOCO_VAL_IMAGES = int(0.90 * 40_504) - int(0.85 * 40_504)
# Published Inception v3 throughput: TensorFlow's own benchmarks (tensorflow.org/performance/benchmarks,
# 2017), training, 1 NVIDIA P100, batch 64, synthetic data: 142 images/s. A frozen forward pass is
# about a third of a training step's work (forward + backward, about twice the forward).
P100_TRAINING_IMAGES_PER_S = 142.0
FORWARD_SHARE = 1 / 3
PHASE1_STEPS, PHASE1_BATCH, VIEWS = 1_000_000, 32, 4  # im2txt's phase 1; configs/mscoco.yaml's cache views


def run_step(args: list[str], log: Path) -> None:
    """Runs one `showtell` subcommand, its output appended to `log`; exits on failure."""
    with log.open("ab") as handle:
        result = subprocess.run([str(SHOWTELL), *args], cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"showtell {' '.join(args)} failed; see {log}")


def examples_per_second(history: Path) -> float:
    """Mean examples/s over a phase's reports, the first (warm-up) excluded."""
    reports = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    rates = [r["examples_per_sec"] for r in reports[1:]] or [reports[0]["examples_per_sec"]]
    return sum(rates) / len(rates)


def config_args(overrides: dict) -> list[str]:
    sets = [f"{key}={value}" for key, value in overrides.items()]
    return ["--config", str(DEMO_CONFIG), *(arg for item in sets for arg in ("--set", item))]


def save_encoder_weights(overrides: dict, path: Path) -> Path:
    """Random weights of the model's encoder (`none` draws them), saved: the file every run loads."""
    from schemas.config import load_config
    from trainer.model import build_encoder

    if not path.exists():
        model_cfg = load_config(str(DEMO_CONFIG), [f"{k}={v}" for k, v in overrides.items()]).model
        build_encoder(model_cfg.model_copy(update={"encoder_weights": "none"})).save_weights(str(path))
    return path


def bare_step_rate(spec: dict) -> dict:
    """Examples/s of a bare single-process `tf.function` phase-1 step: the same model, optimizer
    (SGD at phase 1's rate, clipped), batch and input pipeline as showtell's, none of Ray Train,
    the strategy or the reports, its ops on `intra_op_threads` threads. Runs in a process of its
    own (train_bench.py --bare-step)."""
    import keras
    import tensorflow as tf

    from schemas.config import load_config
    from trainer.inputs import make_dataset, make_feature_dataset, shard_files
    from trainer.model import build_model, resolve_vocab_size
    from trainer.ops import clip_by_global_norm, masked_cross_entropy

    tf.config.threading.set_intra_op_parallelism_threads(spec["intra_op_threads"])
    config = load_config(str(DEMO_CONFIG), spec["overrides"])
    phase = config.train.phase1
    word_counts = Path(config.data_dir, "word_counts.txt").read_text()
    model = build_model(config.model, resolve_vocab_size(config.model, word_counts))
    model.set_encoder_trainable(False)
    optimizer = keras.optimizers.SGD(phase.learning_rate)
    common = {"batch_size": phase.batch_size, "training": True, "shuffle_buffer": config.train.shuffle_buffer}
    if spec["cache"]:
        size = json.loads(Path(config.feature_cache_dir, "cache.json").read_text())["feature_size"]
        dataset = make_feature_dataset(shard_files(config.feature_cache_dir, "train"), feature_size=size, **common)
    else:
        files = shard_files(config.data_dir, "train")
        size, flip = config.model.image_size, config.train.random_flip
        dataset = make_dataset(files, image_size=size, random_flip=flip, **common)
    variables = model.trainable_variables

    @tf.function
    def step(batches):
        features, targets, mask = next(batches)  # in the graph, as showtell's step takes its batch
        with tf.GradientTape() as tape:
            loss_sum, words = masked_cross_entropy(model(features, training=True), targets, mask)
            loss = loss_sum / tf.maximum(words, 1.0)
        grads, _ = clip_by_global_norm(tape.gradient(loss, variables), phase.clip_gradients)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    batches = iter(dataset)
    warm_up = max(1, spec["steps"] // 4)  # as showtell's figure leaves out its first report's steps
    for _ in range(warm_up):
        float(step(batches))
    started = time.perf_counter()
    for _ in range(spec["steps"] - warm_up):
        float(step(batches))
    return {"examples_per_sec": (spec["steps"] - warm_up) * phase.batch_size / (time.perf_counter() - started)}


class Phase1Bench:
    """Prepares the demo's sample data once under `workdir`, then trains phase 1 variants on copies."""

    def __init__(self, workdir: Path, steps: int, bench_script: str):
        self.workdir, self.steps, self.bench_script = workdir, steps, bench_script
        self.log = workdir / "phase1.log"
        self.data_root = workdir / "sample"
        if not (self.data_root / "data" / "preprocess_report.json").exists():
            for step in ("download", "preprocess"):
                run_step([step, *config_args({"run_root": self.data_root})], self.log)

    def _root(self, name: str) -> Path:
        root = self.workdir / name
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(self.data_root / "data", root / "data")
        return root

    def _train(self, name: str, overrides: dict, cache: bool, steps: int) -> tuple[Path, dict]:
        """Phase 1 of `steps` steps on a fresh copy of the data; (run root, its overrides)."""
        root = self._root(name)
        every = max(1, steps // 4)
        overrides = {
            **COMMON, **overrides, "run_root": root, "train.phase1.steps": steps,
            "train.phase1.checkpoint_every": every, "train.phase1.feature_cache.enabled": str(cache).lower(),
        }  # fmt: skip
        run_step(["train", "--phase", "1", *config_args(overrides)], self.log)
        return root, overrides

    def _phase1_rate(self, root: Path) -> float:
        return examples_per_second(root / "train" / "phase1" / "history.jsonl")

    def feature_cache_speed(self) -> None:
        rows = {}
        for label, model in (("Inception v3 at 299", INCEPTION), ("demo model", DEMO)):
            weights = save_encoder_weights(model, self.workdir / f"{label.split()[0].lower()}.weights.h5")
            model = {**model, "model.encoder_weights": weights}
            slug = label.split()[0].lower()
            images_root, _ = self._train(f"{slug}-images", model, cache=False, steps=self.steps)
            cache_root, _ = self._train(f"{slug}-cache", model, cache=True, steps=self.steps * 5)
            cache = json.loads((cache_root / "feature_cache" / "cache.json").read_text())
            rows[label] = (self._phase1_rate(images_root), self._phase1_rate(cache_root), cache)
        for label, (from_images, from_cache, cache) in rows.items():
            images = sum(cache["images"].values())
            print(
                f"phase 1, {label}, 1 worker: {from_images:8.1f} examples/s from images, {from_cache:8.1f} from the "
                f"cache: {from_cache / from_images:.1f}x (goal for Inception v3: >= 10x)"
            )
            print(
                f"  cache build: {cache['seconds']:.1f} s for {images} images ({cache['images']}), {cache['views']} "
                f"views of the train images, {sum(cache['shards'].values()) / images / 1024:.1f} KiB an image"
            )
        self._project(*rows["Inception v3 at 299"])

    def _project(self, from_images: float, from_cache: float, cache: dict) -> None:
        """MSCOCO from the measured Inception v3 figures, the arithmetic printed."""
        per_image = sum(cache["shards"].values()) / (cache["images"]["train"] * cache["views"] + cache["images"]["val"])
        train_bytes = MSCOCO_TRAIN_IMAGES * VIEWS * per_image
        forward = P100_TRAINING_IMAGES_PER_S / FORWARD_SHARE
        build_s = (MSCOCO_TRAIN_IMAGES * VIEWS + MSCOCO_VAL_IMAGES) / forward
        examples = PHASE1_STEPS * PHASE1_BATCH
        images_s = examples / forward
        cached_s = images_s * from_images / from_cache  # the cache's step takes the share it takes here
        print("projection to MSCOCO (im2txt's splits; Inception v3 at 299; views 4):")
        print(
            f"  cache size: {MSCOCO_TRAIN_IMAGES:,} train images x {VIEWS} views x {per_image / 1024:.2f} KiB "
            f"(measured per view, captions included) = {train_bytes / 1e9:.1f} GB"
        )
        print(
            f"  one P100's frozen Inception v3: {P100_TRAINING_IMAGES_PER_S:.0f} images/s training (TensorFlow's "
            f"published benchmark) / {FORWARD_SHARE:.2f} for a forward pass alone = {forward:.0f} images/s"
        )
        print(
            f"  cache build: ({MSCOCO_TRAIN_IMAGES:,} x {VIEWS} + {MSCOCO_VAL_IMAGES:,} val) forward passes / "
            f"{forward:.0f} per s "
            f"= {build_s / 3600:.1f} h on one GPU"
        )
        print(
            f"  phase 1 from images: {PHASE1_STEPS:,} steps x {PHASE1_BATCH} = {examples:,} forward passes / "
            f"{forward:.0f} per s = {images_s / 86400:.1f} days (im2txt on a K20: 1-2 weeks)"
        )
        print(
            f"  phase 1 from the cache: {images_s / 86400:.1f} days x {from_images:.1f} / {from_cache:.1f} (the "
            f"step's cost measured here, with and without the encoder) = {cached_s / 3600:.1f} h, plus the build "
            "(a lower bound: on a GPU so small a step is bound by kernel launches more than by arithmetic)"
        )

    def framework_tax(self) -> None:
        weights = save_encoder_weights(DEMO, self.workdir / "demo.weights.h5")
        for label, cache, steps in (("from images", False, self.steps), ("from the cache", True, self.steps * 5)):
            root, overrides = self._train(f"tax-{'cache' if cache else 'images'}", {"model.encoder_weights": weights},
                                          cache=cache, steps=steps)  # fmt: skip
            showtell = self._phase1_rate(root)
            bare = {threads: self._bare_rate(overrides, cache, steps, threads) for threads in (1, os.cpu_count())}
            best = max(bare.values())
            each = ", ".join(f"{rate:.1f} on {threads} op thread(s)" for threads, rate in bare.items())
            print(
                f"framework tax, demo model {label}, batch 16: showtell {showtell:8.1f} examples/s, bare tf.function "
                f"{best:8.1f} (the best of {each}): {showtell / best:.2f}x (goal >= 0.9x)"
            )

    def _bare_rate(self, overrides: dict, cache: bool, steps: int, threads: int) -> float:
        spec = {
            "overrides": [f"{k}={v}" for k, v in overrides.items()], "cache": cache, "steps": steps,
            "intra_op_threads": threads,
        }  # fmt: skip
        child = subprocess.run(
            [sys.executable, self.bench_script, "--bare-step", json.dumps(spec)], capture_output=True, text=True
        )
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if child.returncode or not lines:
            sys.exit(f"the bare step failed:\n{child.stderr[-3000:]}")
        return json.loads(lines[-1])["examples_per_sec"]

    def quality(self, steps: int = 800) -> None:
        """Val perplexity after `steps` phase-1 steps from images and from the cache, one frozen encoder."""
        pretrained, _ = self._train("quality-encoder", {"train.phase1.encoder_pretrain_steps": 1000}, False, 1)
        weights = self._encoder_of(pretrained / "train" / "phase1" / "final", self.workdir / "pretrained.weights.h5")
        perplexities = {}
        for label, cache in (("images", False), ("cache", True)):
            root, _ = self._train(f"quality-{label}", {"model.encoder_weights": weights}, cache=cache, steps=steps)
            final = root / "train" / "phase1" / "final"
            perplexities[label] = {split: self._perplexity(final, split) for split in ("val", "test")}
        for split in ("val", "test"):
            images, cached = perplexities["images"][split], perplexities["cache"][split]
            print(
                f"{split} perplexity after {steps} phase-1 steps (demo config, its encoder pretrained 1000 steps, "
                f"then frozen): from images {images:.3f}, from the cache {cached:.3f}: "
                f"{100 * (cached / images - 1):+.1f}% (goal for val: within 5%)"
            )

    @staticmethod
    def _encoder_of(final: Path, path: Path) -> Path:
        from schemas.config import load_config
        from trainer.checkpoints import build_inference_model

        config = load_config(str(final / "config.yaml"))
        model = build_inference_model(config.model.model_copy(update={"encoder_weights": "none"}),
                                      (final / "word_counts.txt").read_text())  # fmt: skip
        model.load_weights(str(final / "model.weights.h5"))
        model.encoder.save_weights(str(path))
        return path

    @staticmethod
    def _perplexity(final: Path, split: str) -> float:
        from schemas.config import load_config
        from trainer.checkpoints import build_inference_model
        from trainer.inputs import shard_files
        from trainer.validation import model_perplexity

        config = load_config(str(final / "config.yaml"))
        model = build_inference_model(config.model, (final / "word_counts.txt").read_text())
        model.load_weights(str(final / "model.weights.h5"))
        return model_perplexity(model, shard_files(config.data_dir, split), config.model.image_size)

