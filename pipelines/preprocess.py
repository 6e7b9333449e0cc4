"""The preprocessing pipeline: mirrored MSCOCO -> im2txt's sharded SequenceExample TFRecords.

    captions JSON (x2) ──expand──> images with split + tokens ──┬─ train tokens ─> tf.Transform vocabulary
                                                                 │                      │ (side input)
                                                                 └─ check image bytes ──┴─> records ─> shards
                                                                          │
                                                                          ├─ tallies ─> counts.json
                                                                          └─ train words ─> word_frequencies.txt

`build_preprocess_pipeline` is the pure factory (it only adds transforms to a Pipeline);
`run_preprocess` is the runner: it checks the inputs, runs the pipeline into a staging folder,
completes the shard set, writes the report and the records' schema (both name the vocabulary by
its id, `schemas.vocabulary.vocabulary_id`), and only then publishes everything as
`<run_root>/data/` (`schemas.storage.publish_dir`), so a failed run never leaves half-written outputs there.

The data's statistics are computed here, by the pipeline's workers, for the data checks before
training (`pipelines.data_checks`: tensorflow-data-validation has no release for TF 2.21): the
tallies give per split the images skipped by reason, the records written and the written
captions' lengths in words (the report's histogram); every word of the written train captions is
counted into `data/word_frequencies.txt` (`schemas.layout.WORD_FREQUENCIES_FILE`), those under
`data.min_word_count` too, so that an out-of-vocabulary rate under any vocabulary can be computed.

Shards, word_counts.txt, word_frequencies.txt and the report are written with fsspec (any
store); tf.Transform writes only through tf.io.gfile, which has no s3:// in TF 2.21 (and reaches
gs:// at Google's endpoint only), so on such a run_root the DirectRunner stages transform_fn/ on
local disk and copies it over (`_transform_dirs`).

Records go to shards by a hash of (seed, image id, annotation id) and are sorted by it inside a
shard, so the same input always gives byte-identical shards, whatever the runner's ordering.

While the pipeline runs, the driver's progress display (`schemas.progress`) counts the images
checked out of those the captions files list; the check reports each one from whichever worker
process runs it.

Each image is decoded once, by the check (im2txt decodes it once per caption). Image bytes
never go through the shuffle: it carries small PendingRecords, and each shard writer reads the
checked bytes straight from the zip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import apache_beam as beam
import fsspec
from apache_beam.options.pipeline_options import StandardOptions

from pipelines import images as image_checks
from pipelines.beam_options import is_direct_runner, pipeline_options
from pipelines.captions import (
    AnnotationSource,
    CaptionedImage,
    is_unsafe_zip_name,
    load_captions_document,
    read_captions_file,
    tokenized,
)
from pipelines.preprocess_report import (
    SKIPPED_FILES_KEPT,
    WORD_FREQUENCIES_SPLIT,
    build_report,
    caption_words,
    format_word_frequencies,
    parse_word_frequencies,
    skipped_files_key,
    written_image_tallies,
)
from pipelines.vocabulary import AnalyzeVocabulary
from pipelines.zips import member_names, read_member
from schemas import progress, records, stores
from schemas.config import ANNOTATIONS_ZIP, TRAIN_IMAGES_ZIP, VAL_IMAGES_ZIP, Config, join_url
from schemas.errors import ShowtellError
from schemas.layout import PREPROCESS_REPORT_FILE, RECORD_SCHEMA_FILE, WORD_FREQUENCIES_FILE
from schemas.storage import copy_dir, exists, fresh_fs, is_local, publish_dir, read_text, remove, write_text
from schemas.tfrecord import write_records
from schemas.vocabulary import WORD_COUNTS_FILE, Vocabulary, parse_word_counts

log = logging.getLogger("showtell.preprocess")

COUNTS_FILE = "counts.json"  # the pipeline's raw tallies, folded into the report by the runner

_COUNTS = "counts"  # tag of the side output that carries tallies
_SKIPPED = "skipped_files"  # tag of the side output that carries (tally key, file name) of each skipped image
_WORDS = "words"  # tag of the side output that carries (word, count) of each written train image's captions


@dataclass(frozen=True)
class PreprocessPlan:
    """Everything the pipeline needs, resolved from config: plain values, picklable."""

    sources: tuple[AnnotationSource, ...]  # the two captions files and their image zips
    output_dir: str  # where shards, word_counts.txt, word_frequencies.txt and counts.json are written
    transform_dir: str  # where transform_fn/ and transformed_metadata/ are written (tf.io.gfile must reach it)
    shards: tuple[tuple[str, int], ...]  # (split, number of shard files), e.g. (("train", 256), ...)
    min_word_count: int  # vocabulary frequency threshold
    max_image_pixels: int  # larger images are skipped
    shuffle_seed: int  # seed of the record -> shard assignment


def plan_from_config(config: Config, output_dir: str, transform_dir: str) -> PreprocessPlan:
    mirror = config.data.mirror
    annotations = join_url(mirror, ANNOTATIONS_ZIP)
    sources = (
        AnnotationSource(
            annotations, "annotations/captions_train2014.json", join_url(mirror, TRAIN_IMAGES_ZIP), "train2014", True
        ),
        AnnotationSource(
            annotations, "annotations/captions_val2014.json", join_url(mirror, VAL_IMAGES_ZIP), "val2014", False
        ),
    )
    shards = config.data.shards
    return PreprocessPlan(
        sources=sources,
        output_dir=output_dir,
        transform_dir=transform_dir,
        shards=(("train", shards.train), ("val", shards.val), ("test", shards.test)),
        min_word_count=config.data.min_word_count,
        max_image_pixels=config.data.max_image_pixels,
        shuffle_seed=config.data.shuffle_seed,
    )


# ---------------------------------------------------------------------------------------------
# Pipeline steps (module-level functions and DoFns, so every runner can pickle them)


def _tally(key: str, count: int = 1) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(_COUNTS, (key, count))


def expand_source(source: AnnotationSource) -> Iterator:
    """One captions file -> its images (main output) and tallies of what was dropped."""
    expanded = read_captions_file(source)
    yield _tally("annotations/orphan_annotations", expanded.orphan_annotations)
    yield _tally("annotations/blank_captions_dropped", expanded.blank_captions)
    yield _tally("annotations/duplicate_image_ids", expanded.duplicate_images)
    yield from expanded.images


class CheckImageFn(beam.DoFn):
    """Reads an image out of its zip and checks it; kept images go on, skips become tallies.

    A kept image goes on as (image, None), or (image, jpeg) when its bytes had to be re-encoded;
    a kept train image's captions' words go to the `_WORDS` output, (word, count) once per word.
    """

    def __init__(self, max_pixels: int):
        self._max_pixels = max_pixels

    def process(self, image: CaptionedImage) -> Iterator:
        split, num_captions = image.split, len(image.captions)
        yield _tally(f"{split}/images/listed")
        yield _tally(f"{split}/captions/listed", num_captions)
        verdict = self._verdict(image)
        progress.advance()  # one image checked, on the driver's display (`run_preprocess`)
        if verdict.skip_reason:
            yield _tally(f"{split}/images/skipped/{verdict.skip_reason}")
            yield _tally(f"{split}/captions/skipped/{verdict.skip_reason}", num_captions)
            name = image.member or f"image {image.image_id} (unsafe file_name)"
            yield beam.pvalue.TaggedOutput(_SKIPPED, (skipped_files_key(split, verdict.skip_reason), name))
            return
        yield _tally(f"{split}/images/written")
        if verdict.reencoded:
            yield _tally(f"{split}/images/reencoded/{verdict.source_format}")
        for key, count in written_image_tallies(split, verdict.size, (c.tokens for c in image.captions)).items():
            yield _tally(key, count)
        if split == WORD_FREQUENCIES_SPLIT:
            for word, count in caption_words(c.tokens for c in image.captions).items():
                yield beam.pvalue.TaggedOutput(_WORDS, (word, count))
        yield image, (verdict.jpeg if verdict.reencoded else None)

    def _verdict(self, image: CaptionedImage) -> image_checks.ImageVerdict:
        if image.member is None:
            return image_checks.ImageVerdict(None, image_checks.UNSAFE_NAME)
        if not image.captions:
            return image_checks.ImageVerdict(None, image_checks.NO_CAPTIONS)
        return image_checks.check_image(read_member(image.images_zip, image.member), self._max_pixels)


def shuffle_key(seed: int, image_id: int, annotation_id: int) -> bytes:
    """A record's stable place in the shuffle: decides its shard and its order inside it."""
    return hashlib.sha256(f"{seed}:{image_id}:{annotation_id}".encode()).digest()


@dataclass(frozen=True)
class PendingRecord:
    """What a shard writer needs to write one record: everything but the image bytes, which it
    reads from the zip itself, so the shuffle moves a few hundred bytes per record, not the JPEG."""

    shuffle_key: bytes  # the record's place in its shard
    image_id: int  # MSCOCO image id
    images_zip: str  # where the (already checked) image bytes are
    member: str  # the image's path inside that zip
    tokens: tuple[str, ...]  # the caption's tokens, `<S>` ... `</S>`
    ids: tuple[int, ...]  # their vocabulary ids
    replacement_jpeg: bytes | None  # re-encoded bytes for the rare image the zip's bytes won't do


def to_pending_records(
    kept: tuple[CaptionedImage, bytes | None], vocabulary: Vocabulary, seed: int, shards: dict[str, int]
) -> Iterator[tuple[tuple[str, int], PendingRecord]]:
    """One kept image -> ((split, shard), PendingRecord) per caption."""
    image, replacement_jpeg = kept
    for caption in image.captions:
        key = shuffle_key(seed, image.image_id, caption.annotation_id)
        shard = int.from_bytes(key[:8], "big") % shards[image.split]
        ids = tuple(vocabulary.ids(caption.tokens))
        record = PendingRecord(
            key, image.image_id, image.images_zip, image.member, caption.tokens, ids, replacement_jpeg
        )
        yield (image.split, shard), record


def write_shard(grouped: tuple[tuple[str, int], Iterable[PendingRecord]], output_dir: str, shards: dict[str, int]):
    """Writes one shard file, records in shuffle-key order; yields a tally of records written."""
    (split, index), pending = grouped

    def serialized() -> Iterator[bytes]:
        for record in sorted(pending, key=lambda r: r.shuffle_key):
            jpeg = record.replacement_jpeg or read_member(record.images_zip, record.member)
            yield records.encode_sequence_example(record.image_id, jpeg, record.tokens, record.ids)

    with fsspec.open(join_url(output_dir, records.shard_name(split, index, shards[split])), "wb") as handle:
        written = write_records(handle, serialized())
    yield f"{split}/records/written", written


def counts_json(tallies: dict[str, int], skipped_files: dict[str, list[str]]) -> str:
    """counts.json: the summed tallies, with the first few skipped files' names under their keys."""
    return json.dumps({**tallies, **skipped_files}, sort_keys=True)


def write_text_to(text: str, url: str) -> None:
    """`storage.write_text` with the text first, as beam.Map passes it."""
    write_text(url, text)


def build_preprocess_pipeline(pipeline: beam.Pipeline, plan: PreprocessPlan) -> None:
    """Adds the preprocessing transforms to `pipeline` (inside a tf.Transform Context)."""
    import tensorflow_transform.beam as tft_beam

    shards = dict(plan.shards)
    expanded = (
        pipeline
        | "AnnotationFiles" >> beam.Create(plan.sources)
        | "ExpandCaptions" >> beam.FlatMap(expand_source).with_outputs(_COUNTS, main="images")
    )
    listed = expanded.images | "SpreadImages" >> beam.Reshuffle() | "Tokenize" >> beam.Map(tokenized)

    train_tokens = listed | "TrainTokens" >> beam.FlatMap(
        lambda image: [caption.tokens for caption in image.captions] if image.split == "train" else []
    )
    transform_fn, vocabulary = train_tokens | "Vocabulary" >> AnalyzeVocabulary(plan.min_word_count)
    _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(plan.transform_dir)
    _ = (
        vocabulary
        | "FormatWordCounts" >> beam.Map(Vocabulary.to_word_counts)
        | "WriteWordCounts" >> beam.Map(write_text_to, join_url(plan.output_dir, WORD_COUNTS_FILE))
    )

    checked = listed | "CheckImages" >> beam.ParDo(CheckImageFn(plan.max_image_pixels)).with_outputs(
        _COUNTS, _SKIPPED, _WORDS, main="kept"
    )
    _ = (
        checked[_WORDS]
        | "SumWordCounts" >> beam.CombinePerKey(sum)  # combined on each worker before the shuffle
        | "CollectWordCounts" >> beam.combiners.ToList()
        | "FormatWordFrequencies" >> beam.Map(format_word_frequencies)
        | "WriteWordFrequencies" >> beam.Map(write_text_to, join_url(plan.output_dir, WORD_FREQUENCIES_FILE))
    )
    skipped_files = (
        checked[_SKIPPED]
        | "FirstSkippedFiles" >> beam.combiners.Top.SmallestPerKey(SKIPPED_FILES_KEPT)
        | "CollectSkippedFiles" >> beam.combiners.ToDict()
    )
    written = (
        checked.kept
        | "ToRecords"
        >> beam.FlatMap(to_pending_records, beam.pvalue.AsSingleton(vocabulary), plan.shuffle_seed, shards)
        | "GroupByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.FlatMap(write_shard, plan.output_dir, shards)
    )
    _ = (
        (expanded[_COUNTS], checked[_COUNTS], written)
        | "AllTallies" >> beam.Flatten()
        | "SumTallies" >> beam.CombinePerKey(sum)
        | "CollectTallies" >> beam.combiners.ToDict()
        | "ToJson" >> beam.Map(counts_json, beam.pvalue.AsSingleton(skipped_files))
        | "WriteTallies" >> beam.Map(write_text_to, join_url(plan.output_dir, COUNTS_FILE))
    )


# ---------------------------------------------------------------------------------------------
# The runner


def _check_inputs(plan: PreprocessPlan) -> tuple[dict[str, int], int]:
    """Fails fast, before any Beam work, on missing or malformed inputs; counts hostile zip names.
    Returns those tallies and the number of images the captions files list (each checked once)."""
    images = 0
    for source in plan.sources:
        for url in (source.annotations_zip, source.images_zip):
            if not exists(url):
                raise ShowtellError(f"{url}: not found (run `showtell download` first)")
        document = load_captions_document(source)  # raises ShowtellError naming the file on malformed JSON
        images += len({image["id"] for image in document["images"]})  # a repeated id is listed once
    unsafe = sum(
        is_unsafe_zip_name(name) for zip_url in {s.images_zip for s in plan.sources} for name in member_names(zip_url)
    )
    return {"annotations/unsafe_zip_members_ignored": unsafe}, images


def _complete_shard_set(plan: PreprocessPlan) -> None:
    """Every shard file exists, even when no record hashed into it (an empty TFRecord file)."""
    fs, root = fresh_fs(plan.output_dir)
    present = set(fs.find(root))  # one listing, not a request per shard
    for split, num_shards in plan.shards:
        for name in records.shard_names(split, num_shards):
            path = f"{root}/{name}"
            if path not in present:
                fs.touch(path)


def _tf_cannot_write(url: str) -> Optional[str]:
    """Why TensorFlow's own file layer (tf.io.gfile, all tf.Transform writes with) cannot write
    `url`, or None where it can. Local paths and gs:// are built in, gs:// at Google's endpoint
    only (TensorFlow's GCS client takes no other: an emulator's, a private one's); s3:// needs
    tensorflow-io's plugin."""
    import tensorflow as tf

    if is_local(url):
        return None
    scheme = fsspec.utils.get_protocol(url)
    if scheme in ("gs", "gcs") and stores.gcs_endpoint() is not None:
        return f"whose GCS client reaches only Google's endpoint, not {stores.gcs_endpoint()}"
    if scheme in tf.io.gfile.get_registered_schemes():
        return None
    plugin = "tensorflow-io's plugin adds one: import tensorflow_io here and in the workers"
    return f"which has no {scheme}:// file system ({plugin})"


@contextmanager
def _transform_dirs(run_root: str, staging: str, run_id: str, runner: Optional[str]) -> Iterator[tuple[str, str]]:
    """Where tf.Transform works: (its temp_dir, the folder WriteTransformFn writes into).

    Both are under the run_root where tf.io.gfile can write it. Where it cannot (s3:// without
    tensorflow-io, gs:// at an emulator), on the DirectRunner, whose workers share this machine's
    disk, both are in a local temporary folder, and transform_fn/ and transformed_metadata/ are
    copied into `staging` with fsspec once the pipeline has succeeded; a distributed runner fails
    before any work.
    """
    reason = _tf_cannot_write(run_root)
    if reason is None:
        temp_dir = join_url(run_root, "tmp", f"preprocess-{run_id}")
        try:
            yield temp_dir, staging
        finally:
            remove(temp_dir)
        return
    if not is_direct_runner(runner):
        raise ShowtellError(
            f"run_root {run_root}: tf.Transform writes through tf.io.gfile, {reason}; and {runner} workers "
            "share no local disk to stage its output on: use the DirectRunner, or a run_root that TensorFlow reaches"
        )
    with tempfile.TemporaryDirectory(prefix=f"showtell-preprocess-{run_id}-") as local:
        transform_dir = os.path.join(local, "transform")
        yield os.path.join(local, "tmp"), transform_dir
        copy_dir(transform_dir, staging)


def run_preprocess(config: Config) -> dict:
    """Runs the pipeline on the configured runner and publishes `<run_root>/data/`; returns the report."""
    import tensorflow_transform.beam as tft_beam

    run_id = uuid.uuid4().hex[:8]
    options = pipeline_options(config.beam, job_name=f"showtell-preprocess-{run_id}")
    runner = options.view_as(StandardOptions).runner
    with publish_dir(config.data_dir, marker=PREPROCESS_REPORT_FILE) as staging:
        with _transform_dirs(config.run_root, staging, run_id, runner) as (temp_dir, transform_dir):
            plan = plan_from_config(config, staging, transform_dir)
            extra_tallies, images = _check_inputs(plan)
            log.info("preprocess: %s -> %s on %s", config.data.mirror, config.data_dir, runner)
            started = time.time()
            with tft_beam.Context(temp_dir=temp_dir), progress.tracked("preprocess", total=images, unit="images"):
                with beam.Pipeline(options=options) as pipeline:
                    build_preprocess_pipeline(pipeline, plan)
        _complete_shard_set(plan)
        tallies = {**json.loads(read_text(join_url(staging, COUNTS_FILE))), **extra_tallies}
        remove(join_url(staging, COUNTS_FILE))
        vocabulary = parse_word_counts(read_text(join_url(staging, WORD_COUNTS_FILE)))
        frequencies = parse_word_frequencies(read_text(join_url(staging, WORD_FREQUENCIES_FILE)))
        seconds = time.time() - started
        report = build_report(tallies, plan.shards, plan.min_word_count, vocabulary, seconds, frequencies)
        report["output_dir"] = config.data_dir
        write_text(join_url(staging, RECORD_SCHEMA_FILE), records.record_schema_text(vocabulary.id))
        write_text(join_url(staging, PREPROCESS_REPORT_FILE), json.dumps(report, indent=2, sort_keys=True) + "\n")
    log.info("preprocess: %d records in %.1f s", report["records_written"], report["seconds"])
    return report
