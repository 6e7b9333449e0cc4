"""`showtell caption-batch`: caption every image of a bucket (a glob, a folder, a zip, a list of
URLs) with an export, as a Beam pipeline on Beam's own RunInference.

    (index, url) ──read, check──> (index, url), image bytes ──RunInference──> (index, line)
                        └──────── an error line, with its reason ─────────────> (index, line)
    lines ──group by shard──> OUT/captions-00000-of-00002.jsonl, ... (one line per image, in input order)

`build_caption_pipeline` is the pure factory; `run_caption_batch` is the runner: it lists the
input, records the job in `OUT/caption_batch.json`, runs the pipeline over the images whose shard
is not written yet, and counts what every shard holds.

    {"path": "s3://b/photos/a.jpg", "captions": [{"sentence": "a dog on a couch", "p": 0.0123}, ...]}
    {"path": "s3://b/photos/notes.jpg", "error": "not an image", "reason": "not_an_image"}

A line per listed image, best caption first, as `showtell caption --json` prints them, with `p`
to 6 significant digits: the same input gives the same lines. An image that cannot be read, is
over the size limits or is not a decodable image becomes an error line with its reason
(`reason` is pipelines.images's skip reason, `unreadable` or `too_large`); the run goes on.

Resuming: image i is in shard i // shard_size, and a shard is written whole, once all its images
are done (write_text: never half-written). A re-run with the same model, settings and input keeps
the shards written and captions only the images of the others; `caption_batch.json` records what
identifies the job, and an OUT that holds another job's captions is refused.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import time
from typing import Any, Iterable, Iterator

import apache_beam as beam
import fsspec
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference

from pipelines import images as image_checks
from pipelines.beam_options import pipeline_options
from pipelines.caption_inputs import list_images
from pipelines.caption_model_handler import CaptionModelHandler
from schemas.config import Beam, Data, Eval, join_url
from schemas.errors import ShowtellError
from schemas.layout import EXPORT_METADATA_FILE, SAVED_MODEL_FILE
from schemas.progress import advance, tracked
from schemas.storage import ImageReadError, absolute, exists, read_bytes, read_json, read_text, write_text

log = logging.getLogger("showtell.caption_batch")

JOB_FILE = "caption_batch.json"  # what identifies the job OUT holds, and its counts once done
SHARD_NAME = "captions-{shard:05d}-of-{shards:05d}.jsonl"
P_DIGITS = 6  # significant digits of a caption's probability in the lines
# What may not differ between the job OUT holds and a re-run's, in words. The model's place and the
# --input argument may (a copy of the same export; a folder and a glob that list the same files).
SAME_JOB = {
    "weights": "model weights",
    "vocabulary_id": "vocabulary",
    "caption": "caption settings",
    "listing": "input listing",
    "shard_size": "shard_size",
    "max_image_bytes": "max_image_bytes",
    "max_image_pixels": "max_image_pixels",
}


# Words for pipelines.images's skip reasons, as an error line says them.
CHECK_WORDS = {
    image_checks.EMPTY: "an empty file",
    image_checks.NOT_AN_IMAGE: "not an image",
    image_checks.TOO_LARGE: "too many pixels",
    image_checks.CORRUPT: "a damaged image that no decoder reads",
}


@dataclasses.dataclass(frozen=True)
class CaptionJob:
    """One `showtell caption-batch`: what to caption with what, and its limits."""

    model: str  # a `showtell export` folder with a `caption` signature (any fsspec URL)
    input: str  # a glob, a folder, a .zip or a .txt of URLs (pipelines/caption_inputs.py)
    output: str  # the folder of the JSONL shards and caption_batch.json (any fsspec URL)
    batch_size: int = Eval().batch_size  # images per model call at most (RunInference batches up to it)
    shard_size: int = 1000  # images per output shard: the unit a re-run keeps or redoes
    max_image_bytes: int = 20 << 20  # files larger are error lines, never read whole
    max_image_pixels: int = Data().max_image_pixels  # images with more pixels are error lines, never decoded


def shard_url(output: str, shard: int, shards: int) -> str:
    return join_url(output, SHARD_NAME.format(shard=shard, shards=shards))


class ReadImage(beam.DoFn):
    """(index, url) -> ((index, url), the bytes to caption), or, tagged `errors`, (index, error line)."""

    def __init__(self, max_image_bytes: int, max_image_pixels: int):
        self._max_bytes, self._max_pixels = max_image_bytes, max_image_pixels

    def process(self, item: tuple[int, str]) -> Iterator[Any]:
        index, url = item
        try:
            data = read_bytes(url, self._max_bytes)
        except ImageReadError as error:
            yield beam.pvalue.TaggedOutput("errors", (index, _error_line(url, str(error), error.reason)))
            return
        verdict = image_checks.check_header(data, self._max_pixels)
        if verdict.skip_reason is not None:
            words = CHECK_WORDS[verdict.skip_reason]
            if verdict.skip_reason == image_checks.TOO_LARGE and verdict.size is not None:
                words += f" ({verdict.size[0]}x{verdict.size[1]}, over the limit of {self._max_pixels:,d})"
            yield beam.pvalue.TaggedOutput("errors", (index, _error_line(url, words, verdict.skip_reason)))
            return
        yield (index, url), verdict.jpeg


def _error_line(url: str, error: str, reason: str) -> dict[str, Any]:
    advance()
    return {"path": url, "error": error, "reason": reason}


def _caption_line(keyed: tuple[tuple[int, str], PredictionResult]) -> tuple[int, dict[str, Any]]:
    (index, url), result = keyed
    if isinstance(result.inference, str):  # the graph could not decode it: a skip reason
        return index, _error_line(url, CHECK_WORDS[result.inference], result.inference)
    advance()
    captions = [{"sentence": sentence, "p": float(f"{p:.{P_DIGITS}g}")} for sentence, p in result.inference]
    return index, {"path": url, "captions": captions}


class WriteShard(beam.DoFn):
    """(shard, [(index, line), ...]) -> the shard's JSONL file, lines in input order; yields its name."""

    def __init__(self, output: str, shards: int):
        self._output, self._shards = output, shards

    def process(self, grouped: tuple[int, Iterable[tuple[int, dict[str, Any]]]]) -> Iterator[str]:
        shard, lines = grouped
        text = "".join(json.dumps(line) + "\n" for _, line in sorted(lines, key=lambda item: item[0]))
        url = shard_url(self._output, shard, self._shards)
        write_text(url, text)
        yield url


def build_caption_pipeline(pipeline: beam.Pipeline, job: CaptionJob, todo: list[tuple[int, str]], shards: int) -> None:
    """Adds the transforms that caption `todo`, (index, url) pairs, into the shards they belong to."""
    check = ReadImage(job.max_image_bytes, job.max_image_pixels)
    read = (
        pipeline
        | "List" >> beam.Create(todo)
        | "Spread" >> beam.Reshuffle()
        | "Read" >> beam.ParDo(check).with_outputs("errors", main="images")
    )
    handler = KeyedModelHandler(CaptionModelHandler(job.model, max_batch_size=job.batch_size))
    captioned = read.images | "Caption" >> RunInference(handler) | "Line" >> beam.Map(_caption_line)
    _ = (
        (captioned, read.errors)
        | "All" >> beam.Flatten()
        | "ByShard" >> beam.Map(lambda item: (item[0] // job.shard_size, item))
        | "Group" >> beam.GroupByKey()
        | "Write" >> beam.ParDo(WriteShard(job.output, shards))
    )


def run_caption_batch(job: CaptionJob, beam_config: Beam) -> dict[str, Any]:
    """Captions what the job's input lists into its output, keeping shards already written;
    returns the job's counts (also in OUT/caption_batch.json's `summary`). ShowtellError before
    any work for a model that is no export with a caption signature, an input that lists nothing,
    or an output that holds another job's captions."""
    started = time.time()
    metadata = _caption_export(job.model)
    urls = list_images(job.input)
    identity = _identity(job, metadata, urls)
    shards = identity["shards"]
    _claim(job.output, identity)
    written = {shard for shard in range(shards) if exists(shard_url(job.output, shard, shards))}
    todo = [(index, url) for index, url in enumerate(urls) if index // job.shard_size not in written]
    log.info(
        "caption-batch: %d images from %s in %d shards, %d already written; captioning %d with %s",
        identity["images"],
        job.input,
        shards,
        len(written),
        len(todo),
        job.model,
    )
    if todo:
        options = pipeline_options(beam_config, job_name=f"showtell-caption-batch-{int(started)}")
        with tracked("caption-batch", total=len(todo), unit="images"):
            with beam.Pipeline(options=options) as pipeline:
                build_caption_pipeline(pipeline, job, todo, shards)
    summary = _count(job.output, shards)
    summary.update(
        shards_written=shards - len(written), shards_kept=len(written), seconds=round(time.time() - started, 1)
    )
    write_text(join_url(job.output, JOB_FILE), json.dumps({**identity, "summary": summary}, indent=1) + "\n")
    return summary


def _caption_export(model: str) -> dict[str, Any]:
    """The export's showtell_export.json; ShowtellError unless it is an export with a caption signature."""
    metadata = read_json(join_url(model, EXPORT_METADATA_FILE)) if exists(model) else None
    if metadata is None or not exists(join_url(model, SAVED_MODEL_FILE)):
        raise ShowtellError(f"--model {model}: not a `showtell export` folder")
    if "caption" not in metadata:
        raise ShowtellError(f"--model {model}: an export without a caption signature; export it again")
    return metadata


def _identity(job: CaptionJob, metadata: dict[str, Any], urls: list[str]) -> dict[str, Any]:
    """What makes two runs the same job (`SAME_JOB`), and what they were given."""
    listing = hashlib.sha256("\n".join(urls).encode("utf-8")).hexdigest()
    return {
        "model": absolute(job.model),
        "weights": metadata.get("fingerprint"),
        "vocabulary_id": metadata.get("vocabulary_id"),
        "caption": metadata["caption"],
        "input": job.input,
        "images": len(urls),
        "listing": listing,
        "shard_size": job.shard_size,
        "shards": math.ceil(len(urls) / job.shard_size),
        "max_image_bytes": job.max_image_bytes,
        "max_image_pixels": job.max_image_pixels,
    }


def _claim(output: str, identity: dict[str, Any]) -> None:
    """Records the job in OUT, or checks that OUT's recorded job is this one."""
    url = join_url(output, JOB_FILE)
    recorded = read_json(url)
    if recorded is None:
        if exists(output) and any(_shard_files(output)):
            raise ShowtellError(f"--output {output}: holds caption shards but no {JOB_FILE}; give another --output")
        write_text(url, json.dumps(identity, indent=1) + "\n")
        return
    differs = [words for key, words in SAME_JOB.items() if recorded.get(key) != identity[key]]
    if differs:
        listing = ""
        if recorded.get("listing") != identity["listing"]:
            listing = (
                f": it listed {recorded.get('images')} images of {recorded.get('input')}, "
                f"this one {identity['images']} of {identity['input']}"
            )
        raise ShowtellError(
            f"--output {output}: holds the captions of another job (other {', '.join(differs)}{listing}); "
            "give another --output, or delete it to caption again"
        )


def _shard_files(output: str) -> Iterator[str]:
    fs, path = fsspec.core.url_to_fs(output)
    return iter(fs.glob(f"{path.rstrip('/')}/captions-*.jsonl"))


def _count(output: str, shards: int) -> dict[str, Any]:
    """Images captioned and failed, by reason, over every shard."""
    captioned, failed = 0, collections.Counter()
    for shard in range(shards):
        for line in read_text(shard_url(output, shard, shards)).splitlines():
            result = json.loads(line)
            if "error" in result:
                failed[result["reason"]] += 1
            else:
                captioned += 1
    return {"captioned": captioned, "failed": sum(failed.values()), "failed_by_reason": dict(sorted(failed.items()))}


def summarize(summary: dict[str, Any], job: CaptionJob) -> str:
    """The console's lines for a finished job."""
    reasons = ", ".join(f"{count} {reason}" for reason, count in summary["failed_by_reason"].items())
    images = summary["captioned"] + summary["failed"]
    return (
        f"caption-batch: {images} images -> {job.output}: {summary['captioned']} captioned, "
        f"{summary['failed']} failed{f' ({reasons})' if reasons else ''}\n"
        f"  {summary['shards_written']} shards written, {summary['shards_kept']} kept from an earlier run, "
        f"in {summary['seconds']:.1f} s"
    )
