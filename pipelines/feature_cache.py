"""Phase 1's feature cache: the frozen encoder's pooled features of every train and val image,
computed once by a Beam job instead of at every training step (`train.phase1.feature_cache`).

    data/train-*, data/val-* ──read──> (image id, split, JPEG, caption) ──combine by image──>
        (image, its captions) ──batches──> encoder(views) ──by shard──> feature_cache/train-*, val-*

`build_feature_cache_pipeline` is the pure factory; `ensure_feature_cache` is the runner: it
computes the cache's key (`cache_key`), returns at once when `<run_root>/feature_cache/cache.json`
holds that key and every shard has the size recorded there (a hit), and otherwise builds the
cache into a staging folder and publishes it whole (`schemas.storage.publish_dir`), cache.json
last. A truncated or missing shard is found by that size check and the cache is rebuilt, saying
why; training never reads a cache whose shards are not the ones written.

Each train image gets `views` feature rows: its central crop (evaluation's preprocessing), then
`views - 1` crops, flips and colour distortions drawn by im2txt's training augmentation from
the seed (`feature_cache.seed`, image id, view): the same key, the same features. Val images get
the central crop only (evaluation never augments); no reader uses them yet. The records
(schemas/feature_records.py) hold each image once, with all of its captions, so a cache is about
`views` x 2048 x 4 bytes an image for Inception v3, not a copy per caption.

Why Beam and not Ray Data: the cache is a batch job over the preprocessed shards, beside the
preprocessing and evaluation pipelines, which are Beam; it runs on the same runners from the same
`beam.*` settings (the DirectRunner here, Dataflow with GPUs for MSCOCO), reads and writes shards
through the same fsspec code, and its one shuffle (an image's captions, spread over shards by
preprocessing's hash) is a CombinePerKey that a distributed runner lifts before the shuffle. Ray
Data would tie the job to the training cluster's lifetime and need a second record reader.

The key (`cache_key`) holds what decides the features: the encoder and its weights' fingerprint,
model.image_size, the augmentation (train.random_flip and the preprocessing's version), views,
seed, and the data's fingerprint (the preprocess report and each train/val shard's name and
size). `feature_cache.batch_size` and `beam.*` change how it is built, not what: not in the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import uuid
import zlib
from typing import Any, Iterable, Iterator, Optional

import apache_beam as beam
import fsspec
from apache_beam.options.pipeline_options import StandardOptions

from pipelines.beam_options import pipeline_options
from schemas import progress
from schemas.config import Config, Model, join_url
from schemas.errors import ShowtellError
from schemas.feature_records import encode_feature_example
from schemas.layout import FEATURE_CACHE_FILE, PREPROCESS_REPORT_FILE
from schemas.records import decode_sequence_example, shard_name
from schemas.storage import fresh_fs, publish_dir, read_json, read_text, remove, write_text
from schemas.tfrecord import read_records, write_records

log = logging.getLogger("showtell.feature_cache")

# Phase 1 trains on train. val is the split validation reads; nothing reads the cache's val shards
# yet: evaluation's perplexity reads val's images (its checkpoints' encoders may have trained).
SPLITS = ("train", "val")
# Bumped when the augmentation's code changes what a seed gives (trainer/inputs.py's preprocess_image).
AUGMENTATION_VERSION = 1
COUNTS_FILE = "counts.json"  # the pipeline's tallies, read and removed by the runner


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """What the pipeline needs, as plain picklable values."""

    data_dir: str  # the preprocessed shards
    output_dir: str  # the staging folder the cache's shards are written into
    model: dict  # the Model config, as JSON values (its encoder and weights)
    views: int
    seed: int
    random_flip: bool
    batch_size: int  # images per encoder call
    shards: dict[str, int]  # split -> shard count (the data's, and the cache's)


# --- the key ------------------------------------------------------------------------------------


def encoder_fingerprint(model_cfg: Model) -> tuple[str, int]:
    """(SHA-256 of the encoder's weights as `model.encoder_weights` loads them (ImageNet, a file,
    none), its pooled features' width: 2048 for Inception v3)."""
    from trainer.checkpoints import weights_fingerprint
    from trainer.model import build_encoder

    encoder = build_encoder(model_cfg)
    return weights_fingerprint(encoder), int(encoder.output_shape[-1])


def data_fingerprint(data_dir: str) -> str:
    """SHA-256 of the preprocess report and each train and val shard's name and size."""
    digest = hashlib.sha256(read_text(join_url(data_dir, PREPROCESS_REPORT_FILE)).encode())
    for name, size in sorted(shard_sizes(data_dir).items()):
        digest.update(f"|{name}:{size}".encode())
    return digest.hexdigest()


def shard_sizes(folder: str) -> dict[str, int]:
    """{shard name: bytes} of the train and val shards in `folder` (one listing)."""
    fs, path = fresh_fs(folder)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    sizes = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry["size"]) for entry in entries}
    return {name: size for name, size in sizes.items() if name.split("-", 1)[0] in SPLITS and "-of-" in name}


def data_shard_counts(data_dir: str) -> dict[str, int]:
    """{split: shards} of the train and val shards in `data_dir`, as their names say (`-of-00256`)."""
    counts: dict[str, int] = {}
    for name in shard_sizes(data_dir):
        counts[name.split("-", 1)[0]] = int(name.rsplit("-", 1)[1])
    missing = [split for split in SPLITS if split not in counts]
    if missing:
        raise ShowtellError(f"no {' or '.join(missing)} shards in {data_dir}: run `showtell preprocess` first")
    return counts


def cache_key(config: Config) -> dict[str, Any]:
    """{"id": 16 hex digits, "parts": what it is a hash of}: equal ids, equal features."""
    cache = config.train.phase1.feature_cache
    weights, width = encoder_fingerprint(config.model)
    parts = {
        "encoder": config.model.encoder,
        "encoder_weights": weights,
        "feature_size": width,
        "image_size": config.model.image_size,
        "preprocessing": {"random_flip": config.train.random_flip, "augmentation_version": AUGMENTATION_VERSION},
        "views": cache.views,
        "seed": cache.seed,
        "data": data_fingerprint(config.data_dir),
    }
    return {"id": hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16], "parts": parts}


def why_rebuild(recorded: Optional[dict], key: dict, folder: str) -> Optional[str]:
    """Why the cache at `folder` (its cache.json: `recorded`) cannot serve `key`; None when it can."""
    if recorded is None:
        return "no cache built yet"
    if recorded["key"] != key["id"]:
        changed = [name for name in key["parts"] if recorded["parts"].get(name) != key["parts"][name]]
        return f"its key changed ({', '.join(changed)})"
    found = shard_sizes(folder)
    for name, size in sorted(recorded["shards"].items()):
        if name not in found:
            return f"shard {name} is missing"
        if found[name] != size:
            return f"shard {name} is {found[name]} bytes, cache.json says {size} (truncated or overwritten)"
    return None


# --- the pipeline -------------------------------------------------------------------------------


def read_captioned_images(shard: tuple[str, str]) -> Iterator[tuple[int, tuple[str, bytes, list[int]]]]:
    """(image id, (split, JPEG, caption ids)) for each record of one data shard (split, url)."""
    split, url = shard
    with fsspec.open(url, "rb") as handle:
        for record in read_records(handle):
            example = decode_sequence_example(record)
            yield example["image_id"], (split, example["jpeg"], example["ids"])


class OneImage(beam.CombineFn):
    """An image's records -> (split, JPEG, its captions sorted): the JPEG kept once (any record's:
    they are the same image), the captions gathered from every shard that holds one."""

    def create_accumulator(self) -> tuple[Optional[str], Optional[bytes], list]:
        return None, None, []

    def add_input(self, accumulator, record):
        split, jpeg, caption = record
        return split, accumulator[1] or jpeg, accumulator[2] + [list(caption)]

    def merge_accumulators(self, accumulators):
        split, jpeg, captions = None, None, []
        for other_split, other_jpeg, other_captions in accumulators:
            split, jpeg, captions = split or other_split, jpeg or other_jpeg, captions + other_captions
        return split, jpeg, captions

    def extract_output(self, accumulator):
        split, jpeg, captions = accumulator
        return split, jpeg, sorted(captions)


def shard_of(image_id: int, shards: int) -> int:
    """The cache shard an image's record goes to: a stable hash of its id."""
    return zlib.crc32(str(image_id).encode()) % shards


class EncodeViews(beam.DoFn):
    """A batch of (image id, (split, JPEG, captions)) -> ((split, shard), (image id, record)):
    the encoder's features of each image's views, one encoder call per batch."""

    def __init__(self, plan: CachePlan):
        self._plan = plan

    def setup(self) -> None:
        import tensorflow as tf

        from trainer.inputs import image_views
        from trainer.model import build_encoder

        plan = self._plan
        model_cfg = Model.model_validate(plan.model)
        encoder = build_encoder(model_cfg)
        size = model_cfg.image_size

        @tf.function
        def views_of(jpeg: tf.Tensor, image_id: tf.Tensor, views: int) -> tf.Tensor:
            seed = tf.stack([tf.constant(plan.seed, tf.int64), image_id])
            return image_views(jpeg, size, views, seed, plan.random_flip)

        self._views_of = views_of
        self._encode = tf.function(lambda images: encoder(images, training=False))

    def process(self, batch: list) -> Iterator[tuple[tuple[str, int], tuple[int, bytes]]]:
        import tensorflow as tf

        views = [self._plan.views if split == "train" else 1 for _, (split, _, _) in batch]
        images = []
        for (image_id, (split, jpeg, _)), count in zip(batch, views):
            try:
                images.append(self._views_of(tf.constant(jpeg), tf.constant(image_id, tf.int64), count))
            except tf.errors.OpError as error:
                raise ShowtellError(
                    f"feature cache: {split} image {image_id} no longer decodes ({error.message.splitlines()[0]}); "
                    "preprocessing checked it: preprocess the data again"
                ) from None
        features = self._encode(tf.concat(images, axis=0)).numpy()
        start = 0
        for (image_id, (split, _, captions)), count in zip(batch, views):
            record = encode_feature_example(image_id, features[start : start + count], captions)
            start += count
            yield (split, shard_of(image_id, self._plan.shards[split])), (image_id, record)
        progress.advance(len(batch))  # images encoded, on the driver's display (`ensure_feature_cache`)


def write_cache_shard(grouped: tuple[tuple[str, int], Iterable[tuple[int, bytes]]], plan: CachePlan) -> Iterator:
    """Writes one cache shard, its images in id order; yields (split, (images, captions))."""
    (split, index), images = grouped
    ordered = sorted(images)
    with fsspec.open(join_url(plan.output_dir, shard_name(split, index, plan.shards[split])), "wb") as handle:
        write_records(handle, (record for _, record in ordered))
    yield split, len(ordered)


def build_feature_cache_pipeline(pipeline: beam.Pipeline, plan: CachePlan) -> None:
    """Adds the cache's transforms to `pipeline`: read the data's train and val shards, gather each
    image's captions, encode its views in batches, write the cache's shards and their tallies."""
    shards = [
        (split, join_url(plan.data_dir, shard_name(split, index, count)))
        for split, count in plan.shards.items()
        for index in range(count)
    ]
    images = (
        pipeline
        | "ListShards" >> beam.Create(shards)
        | "Spread" >> beam.Reshuffle()
        | "ReadRecords" >> beam.FlatMap(read_captioned_images)
        | "GatherCaptions" >> beam.CombinePerKey(OneImage())
    )
    _ = (
        images
        | "Batch" >> beam.BatchElements(min_batch_size=plan.batch_size, max_batch_size=plan.batch_size)
        | "Encode" >> beam.ParDo(EncodeViews(plan))
        | "ByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.FlatMap(write_cache_shard, plan)
        | "CountImages" >> beam.CombinePerKey(sum)
        | "AllCounts" >> beam.combiners.ToDict()
        | "WriteCounts" >> beam.Map(_write_counts, join_url(plan.output_dir, COUNTS_FILE))
    )


def _write_counts(counts: dict[str, int], url: str) -> None:
    write_text(url, json.dumps(counts))


# --- the runner ---------------------------------------------------------------------------------


def ensure_feature_cache(config: Config) -> dict[str, Any]:
    """The cache for this config's key at `<run_root>/feature_cache/`, built only when it is not
    there already; returns cache.json's summary with `built` (and, when built, why)."""
    folder = config.feature_cache_dir
    key = cache_key(config)
    recorded = read_json(join_url(folder, FEATURE_CACHE_FILE))
    reason = why_rebuild(recorded, key, folder)
    if reason is None:
        log.info("feature cache %s: up to date at %s, nothing rebuilt", key["id"], folder)
        return {**summary(recorded), "built": False}
    log.info("feature cache %s: building at %s: %s", key["id"], folder, reason)
    cache = config.train.phase1.feature_cache
    report = read_json(join_url(config.data_dir, PREPROCESS_REPORT_FILE)) or {}
    shards = data_shard_counts(config.data_dir)
    images = sum(report["splits"][split]["images"]["written"] for split in SPLITS if split in report.get("splits", {}))
    options = pipeline_options(config.beam, job_name=f"showtell-feature-cache-{uuid.uuid4().hex[:8]}")
    started = time.time()
    with publish_dir(folder, marker=FEATURE_CACHE_FILE) as staging:
        plan = CachePlan(
            data_dir=config.data_dir,
            output_dir=staging,
            model=config.model.model_dump(mode="json"),
            views=cache.views,
            seed=cache.seed,
            random_flip=config.train.random_flip,
            batch_size=cache.batch_size,
            shards=shards,
        )
        runner = options.view_as(StandardOptions).runner
        log.info("feature cache: %s -> %s on %s", config.data_dir, folder, runner)
        with progress.tracked("feature cache", total=images or 0, unit="images"):
            with beam.Pipeline(options=options) as pipeline:
                build_feature_cache_pipeline(pipeline, plan)
        counts = json.loads(read_text(join_url(staging, COUNTS_FILE)))
        remove(join_url(staging, COUNTS_FILE))
        _complete_shard_set(plan)
        built = {
            "key": key["id"],
            "parts": key["parts"],
            "feature_size": key["parts"]["feature_size"],
            "views": cache.views,
            "images": {split: int(counts.get(split, 0)) for split in SPLITS},
            "shards": shard_sizes(staging),
            "seconds": round(time.time() - started, 1),
        }
        write_text(join_url(staging, FEATURE_CACHE_FILE), json.dumps(built, indent=1, sort_keys=True) + "\n")
    log.info("feature cache %s: %s images in %.1f s", key["id"], built["images"], built["seconds"])
    return {**summary(built), "built": True, "why": reason}


def summary(recorded: dict) -> dict[str, Any]:
    """What `showtell run` and `showtell status` show of a cache.json."""
    return {
        "key": recorded["key"],
        "views": recorded["views"],
        "feature_size": recorded["feature_size"],
        "images": recorded["images"],
        "bytes": sum(recorded["shards"].values()),
        "build_seconds": recorded["seconds"],
    }


def _complete_shard_set(plan: CachePlan) -> None:
    """Writes an empty shard for each shard no image went to, so every shard of the set exists."""
    for split, count in plan.shards.items():
        for index in range(count):
            url = join_url(plan.output_dir, shard_name(split, index, count))
            fs, path = fresh_fs(url)
            if not fs.exists(path):
                with fsspec.open(url, "wb"):
                    pass
