"""Caption throughput: batched `inference.beam_search` against im2txt's one-image-at-a-time design,
and an export's `caption` signature (the search in one graph call) against the Python beam search
over the same export's `initial_state` and `step` signatures.

    .venv/bin/python benchmarks/caption_bench.py      # the demo's model (configs/local.yaml), random weights and pixels
    .venv/bin/python benchmarks/caption_bench.py --checkpoint runs/local/train/phase2/final \\
        --images runs/local/raw/zips/val2014.zip

Captions the same N images (N = the largest batch size) with:
- `beam_search` at each of --batch-sizes (N / batch size calls, one model step per decoding step
  for all of a batch's beams);
- benchmarks/im2txt_caption_generator.py, im2txt's CaptionGenerator design (one image at a time,
  one model call per step on that image's live captions, Python heaps), slicing defect fixed.

Both call the model through the same tf.function-compiled initial_state and step (batch
dimension left free in their input signatures: each traces once), so the figures compare the
search designs, not tracing. The runs alternate within each repeat; medians are printed, in
captions/s (images captioned a second, each with its beam_size best captions). One untimed
warm-up run of each also checks that they agree, caption for caption. Goal: >= 10x im2txt's
design at batch 64 on CPU. Figures only; only a disagreement fails.

Then the model is exported (`showtell export`, into a temporary folder) and the same images, as
JPEG bytes, are captioned at each of --export-batch-sizes (default 1 and 64) by:
- the `caption` signature: one call per batch (what TF Serving, caption-batch and serve run);
- `beam_search` over the export's signatures: `initial_state`, then `step` once per decoding step
  from Python (what a client without the caption signature must do).
Both decode and preprocess in the graph; an untimed first run checks that they give the same words.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT)]

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.im2txt_caption_generator import CaptionGenerator  # noqa: E402
from inference.beam_search import Caption, State, beam_search  # noqa: E402

DEMO_CONFIG = REPO_ROOT / "configs" / "local.yaml"
# A random-weights model has no word_counts.txt: the demo's has 38 lines, <S> and </S> on lines
# 1 and 2, and <UNK> makes 39 ids.
RANDOM_VOCAB_SIZE, RANDOM_START_ID, RANDOM_END_ID = 39, 1, 2
TOLERANCE = dict(rel_tol=1e-5, abs_tol=1e-4)  # float32 log_softmax vs im2txt's log of a float32 softmax


class CompiledModel:
    """A ShowAndTell's `initial_state` and `step` as tf.functions with the batch dimension left
    free, so each traces once whatever the batch: one image, its 1 to beam_size live captions,
    or N * beam_size rows."""

    def __init__(self, model):
        size, units = model.model_cfg.image_size, model.model_cfg.num_lstm_units
        self.vocab_size: int = model.vocab_size
        self.initial_state = tf.function(
            lambda images: model.initial_state(images), input_signature=[tf.TensorSpec([None, size, size, 3])]
        )
        state_spec = [tf.TensorSpec([None, units]), tf.TensorSpec([None, units])]
        self.step: Callable[[tf.Tensor, State], tuple[tf.Tensor, State]] = tf.function(
            model.step, input_signature=[tf.TensorSpec([None], tf.int32), state_spec]
        )

    def traces(self) -> str:
        return (
            f"initial_state {self.initial_state.experimental_get_tracing_count()}, "
            f"step {self.step.experimental_get_tracing_count()}"
        )


def load_model(checkpoint: str | None):
    """(ShowAndTell, start_id, end_id, words or None, description)."""
    from schemas.config import load_config
    from schemas.vocabulary import END_WORD, START_WORD, parse_word_counts
    from trainer.checkpoints import CheckpointLoader
    from trainer.model import build_model

    if checkpoint is None:
        keras.utils.set_random_seed(0)  # the same random weights every run
        model = build_model(load_config(DEMO_CONFIG).model, RANDOM_VOCAB_SIZE)
        return model, RANDOM_START_ID, RANDOM_END_ID, None, f"random weights, {DEMO_CONFIG.relative_to(REPO_ROOT)}"
    loaded = CheckpointLoader().load(checkpoint)
    vocabulary = parse_word_counts(loaded.word_counts)
    start_id, end_id = vocabulary.ids([START_WORD, END_WORD])
    return loaded.model, start_id, end_id, vocabulary.words, checkpoint


def load_images(source: str | None, count: int, image_size: int) -> tuple[tf.Tensor, str]:
    """`count` images [count, size, size, 3] in [-1, 1]: random pixels, or the JPEGs of a folder
    or zip (e.g. the sample data's val2014.zip) as evaluation preprocesses them, cycled when
    fewer."""
    if source is None:
        pixels = tf.random.stateless_uniform([count, image_size, image_size, 3], seed=[0, 0], minval=-1.0, maxval=1.0)
        return pixels, "random pixels"
    from trainer.inputs import preprocess_image

    jpegs = read_jpegs(source, count)
    images = [preprocess_image(tf.constant(jpeg), image_size, training=False) for jpeg in jpegs]
    return tf.stack([images[i % len(images)] for i in range(count)]), f"{len(jpegs)} JPEGs from {source}"


def read_jpegs(source: str, count: int) -> list[bytes]:
    """The first `count` .jpg files of a folder or zip, by name; exits naming `source` when it has none."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            names = sorted(name for name in archive.namelist() if name.lower().endswith((".jpg", ".jpeg")))
            jpegs = [archive.read(name) for name in names[:count]]
    else:
        paths = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        jpegs = [p.read_bytes() for p in paths[:count]]
    if not jpegs:
        sys.exit(f"--images {source}: no .jpg files found")
    return jpegs


def agreement(ours: list[Caption], theirs: list[Caption]) -> str:
    """Whether two lists of captions are the same, differ only by a tie broken the other way
    (the same scores, other words), or are different."""
    if len(ours) != len(theirs) or any(not math.isclose(a.score, b.score, **TOLERANCE) for a, b in zip(ours, theirs)):
        return "different"
    if all(a.word_ids == b.word_ids and a.finished == b.finished for a, b in zip(ours, theirs)):
        return "same"
    return "tie"


def sentence(word_ids: Sequence[int], words: Sequence[str] | None) -> str:
    """The caption's words (`<UNK>` past the vocabulary), or its ids when there is no vocabulary."""
    if words is None:
        return " ".join(map(str, word_ids))
    return " ".join(words[i] if i < len(words) else "<UNK>" for i in word_ids)


def median_seconds(runs: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Each run timed `repeat` times, alternating (all runs once, then again), medians."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a published final/ folder (default: the demo's model, random weights)")
    parser.add_argument("--images", help="a folder or zip of JPEGs (default: random pixels)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64], help="beam_search batch sizes")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (medians)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-caption-length", type=int, default=20)
    parser.add_argument(
        "--export-batch-sizes", type=int, nargs="+", default=[1, 64], help="batch sizes of the export comparison"
    )
    args = parser.parse_args(argv)
    if min(args.batch_sizes + args.export_batch_sizes) < 1 or args.repeat < 1:
        parser.error("--batch-sizes, --export-batch-sizes and --repeat must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model, start_id, end_id, words, model_source = load_model(args.checkpoint)
    cfg = model.model_cfg
    count = max(args.batch_sizes)
    images, image_source = load_images(args.images, count, cfg.image_size)
    compiled = CompiledModel(model)
    options = dict(
        start_id=start_id, end_id=end_id, beam_size=args.beam_size, max_caption_length=args.max_caption_length
    )
    generator = CaptionGenerator(compiled, **options)

    def im2txt() -> list[list[Caption]]:
        return [generator.beam_search(images[i : i + 1]) for i in range(count)]

    def batched(batch_size: int) -> Callable[[], list[list[Caption]]]:
        return lambda: [
            captions
            for start in range(0, count, batch_size)
            for captions in beam_search(compiled, images[start : start + batch_size], **options)
        ]

    runs = {"im2txt CaptionGenerator, 1 image at a time": im2txt}
    runs.update({f"beam_search, batch {b}": batched(b) for b in args.batch_sizes})

    print(
        f"caption_bench: {cfg.encoder} {cfg.image_size}x{cfg.image_size}, embedding {cfg.embedding_size}, "
        f"LSTM {cfg.num_lstm_units}, vocab {model.vocab_size} ({model_source}); {count} images ({image_source})"
    )
    print(
        f"beam_size {args.beam_size}, max_caption_length {args.max_caption_length}; {args.repeat} timed repeats, "
        f"alternating, medians; {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f}), "
        f"TensorFlow {tf.__version__}"
    )
    reference = im2txt()
    ties = 0
    for name, run in list(runs.items())[1:]:
        for image, (ours, theirs) in enumerate(zip(run(), reference)):
            verdict = agreement(ours, theirs)
            if verdict == "different":
                sys.exit(f"{name} disagrees with im2txt's design on image {image}:\n  {ours}\n  {theirs}")
            ties += verdict == "tie"
    print(
        f"agreement: beam_search at batch sizes {', '.join(map(str, args.batch_sizes))} gives im2txt's captions "
        f"on all {count} images (word for word, scores within {TOLERANCE['abs_tol']:g})"
    )
    if ties:
        print(f"warning: {ties} of {count * len(args.batch_sizes)} results differ from im2txt's by ties (same scores)")
    best = [captions[0] for captions in reference]
    print(
        f"best captions: {sum(c.finished for c in best)}/{count} finished, "
        f"mean {statistics.mean(len(c.word_ids) for c in best):.1f} words; image 0: "
        f"{sentence(best[0].word_ids, words)} (p={best[0].prob:f})"
    )

    seconds = median_seconds(runs, args.repeat)
    print(
        "Both sides call the model through the same tf.function-compiled initial_state and step "
        f"(free batch dimension; traces: {compiled.traces()}), so the figures compare the search "
        "designs, not tracing."
    )
    baseline = seconds[next(iter(runs))]
    print(f"{'':44s} {'seconds':>8s} {'captions/s':>11s} {'vs im2txt':>10s}")
    for name, elapsed in seconds.items():
        print(f"{name:44s} {elapsed:8.3f} {count / elapsed:11.1f} {baseline / elapsed:9.1f}x")
    largest = max(args.batch_sizes)
    print(
        f"beam_search at batch {largest}: {baseline / seconds[f'beam_search, batch {largest}']:.1f}x "
        f"im2txt's design (goal >= 10x at batch 64)"
    )
    compare_export(model, words, args)
    return 0


def export_model(model, words: Sequence[str] | None, folder: Path, search) -> str:
    """`model` published as a final/ (as training publishes one) and exported; the export's folder."""
    from inference.export import export_saved_model
    from schemas.config import join_url
    from trainer import checkpoints as ckpt

    if words is None:  # a random model: <S> and </S> on lines 1 and 2, as RANDOM_START_ID/END_ID say
        words = ["a", "<S>", "</S>", *(f"word{i}" for i in range(3, RANDOM_VOCAB_SIZE - 1))]
    folder.mkdir(parents=True, exist_ok=True)
    word_counts = folder / "word_counts.txt"
    word_counts.write_text("".join(f"{word} {1000 - i}\n" for i, word in enumerate(words)), encoding="utf-8")
    checkpoint = folder / "checkpoint"
    checkpoint.mkdir()
    state = {"phase": 2, "step": 0, "fingerprint": ckpt.weights_fingerprint(model)}
    ckpt.save_checkpoint(str(checkpoint), model, keras.optimizers.SGD(), state)
    config = {"run_root": str(folder), "model": model.model_cfg.model_dump(mode="json")}
    final = ckpt.publish_final(str(checkpoint), join_url(str(folder), "phase2"), config, str(word_counts))
    return export_saved_model(final, str(folder / "export"), search)


def jpegs(images: tf.Tensor) -> list[bytes]:
    """Pixels in [-1, 1] -> JPEG bytes (quality 95), for signatures that take encoded images."""
    pixels = tf.cast(tf.round((images + 1.0) * 127.5), tf.uint8)
    return [tf.io.encode_jpeg(image, quality=95).numpy() for image in pixels]


def compare_export(model, words: Sequence[str] | None, args: argparse.Namespace) -> None:
    """The export's caption signature against beam_search over its step signature, side by side."""
    import tempfile

    from inference.caption_signature import Search
    from inference.captioner import load_captioner

    count = max(args.export_batch_sizes)
    with tempfile.TemporaryDirectory(prefix="caption-bench-") as scratch:
        search = Search(args.beam_size, args.max_caption_length, 0.0)
        captioner = load_captioner(export_model(model, words, Path(scratch), search))
    images, _ = load_images(args.images, count, model.model_cfg.image_size)
    encoded = jpegs(images)
    options = dict(start_id=captioner.start_id, end_id=captioner.end_id, **dataclasses.asdict(search))

    def signature(batch_size: int) -> Callable[[], list[list[tuple[str, float]]]]:
        return lambda: [
            captions
            for start in range(0, count, batch_size)
            for captions in captioner.graph_search.caption(tf.constant(encoded[start : start + batch_size]))
        ]

    def over_step(batch_size: int) -> Callable[[], list[list[tuple[str, float]]]]:
        return lambda: [
            [(captioner.sentence(c.word_ids), c.prob) for c in captions]
            for start in range(0, count, batch_size)
            for captions in beam_search(captioner, tf.constant(encoded[start : start + batch_size]), **options)
        ]

    runs: dict[str, Callable[[], object]] = {}
    for batch_size in args.export_batch_sizes:
        runs[f"beam_search over step, batch {batch_size}"] = over_step(batch_size)
        runs[f"caption signature, batch {batch_size}"] = signature(batch_size)
    reference = over_step(count)()
    for name, run in runs.items():
        for image, (ours, theirs) in enumerate(zip(run(), reference)):
            same_words = [s for s, _ in ours] == [s for s, _ in theirs]
            if not same_words or not all(math.isclose(a, b, **TOLERANCE) for (_, a), (_, b) in zip(ours, theirs)):
                sys.exit(f"{name} disagrees with beam_search over step on image {image}:\n  {ours}\n  {theirs}")
    print()
    print(
        f"export: {count} images as JPEG bytes; the caption signature and beam_search over the export's "
        f"step signature agree on every caption (the same words, p within {TOLERANCE['rel_tol']:g})"
    )
    seconds = median_seconds(runs, args.repeat)
    print(f"{'':44s} {'seconds':>8s} {'captions/s':>11s} {'vs step':>10s}")
    for batch_size in args.export_batch_sizes:
        python = seconds[f"beam_search over step, batch {batch_size}"]
        for name in (f"beam_search over step, batch {batch_size}", f"caption signature, batch {batch_size}"):
            print(f"{name:44s} {seconds[name]:8.3f} {count / seconds[name]:11.1f} {python / seconds[name]:9.1f}x")


if __name__ == "__main__":
    sys.exit(main())
