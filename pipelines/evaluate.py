"""The evaluation pipeline: every collected checkpoint -> perplexity, captions, COCO metrics, a report.

    split shards ──read──> (image id, caption) ──group──> references {image id: [caption, ...]}
                                                                  │ (side input)
    checkpoints (both phases' final/ + Ray's kept ones) ──spread──> EvaluateCheckpoint ──> results
    results ──collect──> report.json, report.html, best.json

`build_evaluate_pipeline` is the pure factory (it only adds transforms to a Pipeline);
`run_evaluate` is the runner: it lists the checkpoints, runs the pipeline into a staging folder
and publishes it whole as `<run_root>/eval/` (`schemas.storage.publish_dir`).

One element per checkpoint, so checkpoints are evaluated in parallel across workers. Each one:
the checkpoint is loaded, and its weights must match the fingerprint in its state.json and its
vocabulary the data's (one that does not load, or is of another vocabulary, becomes a `failed`
result naming the error, counted, and the others go on); its teacher-forced perplexity is taken
over every record of the split
(`trainer.validation.model_perplexity`, whatever `eval.max_images`); the split's images, the
first `eval.max_images` distinct ones in record order (all by default), are captioned by beam
search in batches of `eval.batch_size` as they stream from the shards, so a worker holds one
batch of images at a time, never the split; a blank grey image is captioned too (the blind
baseline: what the model says without looking); and both are scored with pycocoevalcap against
all references of each image. A worker keeps one built model (each checkpoint's weights are
loaded into it) and one METEOR process for all the checkpoints it gets.

The split is read once for the references (text only, small enough for a side input: MSCOCO's
test split is ~20,000 captions) and streamed again by each checkpoint for its images.

While the pipeline runs, the driver's progress display (`schemas.progress`) shows the checkpoints
evaluated out of all, and the checkpoint a worker is on with its images captioned so far.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import math
import re
import sys
import time
import uuid
from typing import Iterator, Optional

import apache_beam as beam
import fsspec

from pipelines.beam_options import pipeline_options
from pipelines.coco_metrics import CocoScorer, check_java
from pipelines.eval_inputs import blank_jpeg, reference_of, shard_records, split_images
from pipelines.eval_report import build_report, checkpoint_order, write_report
from schemas.config import Config, join_url
from schemas.errors import ShowtellError
from schemas.layout import EVAL_REPORT_FILE, FINAL_DIR, PREPROCESS_REPORT_FILE, STATE_FILE
from schemas.models_root import baseline_location, model_id, read_baseline
from schemas.progress import advance, tracked
from schemas.storage import publish_dir, read_json, read_text
from schemas.vocabulary import WORD_COUNTS_FILE, parse_word_counts
from trainer import checkpoints as ckpt
from trainer.warm_start import init_source

log = logging.getLogger("showtell.evaluate")
# One line per evaluated checkpoint, written by the worker straight to its stderr (under `showtell
# run`, the step's log; the console shows the progress display): remote runners keep their
# workers' stderr, while Beam's own log forwarding drops INFO lines on a local run.
progress = logging.getLogger("showtell.evaluate.progress")

FINAL, INTERMEDIATE = "final", "intermediate"  # the two kinds of checkpoint
BASELINE = "baseline"  # the run's pinned baseline model (an export), scored on the same images
CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)$")  # Ray's kept checkpoints, named by step
SUMMARY_MODEL_KEYS = {"encoder", "image_size", "embedding_size", "num_lstm_units"}  # config.model in report.json


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint to evaluate."""

    phase: int  # 1 or 2
    step: Optional[int]  # the phase's training step it holds; None if a final/ has no readable state.json
    # FINAL (`phaseN/final/`: config and vocabulary included), INTERMEDIATE (Ray's `checkpoint_*`),
    # or BASELINE (the promoted model the run pinned: an export, phase 0)
    kind: str
    url: str  # the checkpoint folder (local path or fsspec URL)


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """Everything the pipeline needs, resolved from config: plain values, picklable."""

    checkpoints: tuple[CheckpointRef, ...]  # what to evaluate
    # The run's pinned baseline, scored on the same images for the promotion gate: its ref, and
    # {"id": its promotion id, "run_root": the run that trained it}; None when none was promoted.
    baseline: Optional[CheckpointRef]
    baseline_model: Optional[dict]
    split: str  # the split evaluated
    files: tuple[str, ...]  # its shards (local paths or URLs of any fsspec store)
    shard_cache: dict  # config.train.shard_cache as JSON: where perplexity caches remote shards while it reads them
    images: int  # the images each checkpoint captions: the split's, or the first `eval.max_images`
    model: dict  # config.model as JSON: builds intermediate checkpoints (they hold weights only)
    word_counts_url: str  # `<data_dir>/word_counts.txt`: the vocabulary of intermediate checkpoints
    vocabulary_id: str  # the data's vocabulary (its records' word ids): the preprocess report's, else word_counts.txt's
    eval: dict  # config.eval as JSON
    # Where phase 2's steps start counting in all: phase 1's last step, or 0 for a warm start (no phase 1)
    phase1_steps: int
    log_progress: bool  # workers write a line per checkpoint to stderr (the driver logs at INFO)
    summary: dict  # what report.json says about the run and its config
    output_dir: str  # where report.json, report.html and best.json are written


def list_checkpoints(train_dir: str, which: str = "all") -> list[CheckpointRef]:
    """Both phases' `final/` and, with `which="all"`, every `checkpoint_NNNNNNNNN/` Ray kept, under
    `train_dir` (any fsspec URL), by phase, then step (a final after the checkpoint it copies)."""
    fs, root = fsspec.core.url_to_fs(train_dir)
    found = []
    for phase in (1, 2):
        phase_dir = join_url(train_dir, ckpt.phase_name(phase))  # the URL the report names
        phase_path = f"{root.rstrip('/')}/{ckpt.phase_name(phase)}"  # the same folder as `fs` names it
        if which == "all" and fs.isdir(phase_path):
            for path in fs.ls(phase_path, detail=False):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                match = CHECKPOINT_DIR.fullmatch(name)
                if match and fs.isdir(path):
                    found.append(CheckpointRef(phase, int(match.group(1)), INTERMEDIATE, join_url(phase_dir, name)))
        if fs.isdir(f"{phase_path}/{FINAL_DIR}"):
            final = join_url(phase_dir, FINAL_DIR)
            found.append(CheckpointRef(phase, _final_step(final), FINAL, final))
    return sorted(found, key=lambda ref: checkpoint_order(dataclasses.asdict(ref)))


def _final_step(final_url: str) -> Optional[int]:
    """The step in a final/'s state.json; None when it is missing or unreadable (the checkpoint
    is still listed, and fails its evaluation if it does not load)."""
    try:
        state = read_json(join_url(final_url, STATE_FILE))
        return int(state["step"]) if state else None
    except (ValueError, KeyError, TypeError, OSError):
        return None


def plan_from_config(config: Config, output_dir: str) -> EvalPlan:
    """Checks the inputs and resolves the plan; ShowtellError naming what is missing."""
    from trainer.inputs import shard_files

    split = config.eval.split
    if config.eval.select_by == "SPICE" and not config.eval.spice:
        raise ShowtellError("eval.select_by is SPICE, which is only computed with eval.spice: true")
    preprocess_report = read_json(join_url(config.data_dir, PREPROCESS_REPORT_FILE))
    if preprocess_report is None:
        raise ShowtellError(f"no preprocessed data at {config.data_dir}: run `showtell preprocess` first")
    if not preprocess_report["splits"][split]["records_written"]:
        raise ShowtellError(
            f"{join_url(config.data_dir, PREPROCESS_REPORT_FILE)}: the {split} split has no records to evaluate on"
        )
    checkpoints = list_checkpoints(config.train_dir, config.eval.checkpoints)
    if not checkpoints:
        raise ShowtellError(f"no checkpoints under {config.train_dir}: run `showtell train --phase 1` first")
    check_java()
    baseline, baseline_model = _baseline(config)
    split_images_written = preprocess_report["splits"][split]["images"]["written"]
    word_counts_url = join_url(config.data_dir, WORD_COUNTS_FILE)
    vocabulary_id = preprocess_report.get("vocabulary", {}).get("id")  # None: preprocessed before it was recorded
    return EvalPlan(
        checkpoints=tuple(checkpoints),
        baseline=baseline,
        baseline_model=baseline_model,
        split=split,
        files=tuple(shard_files(config.data_dir, split)),
        shard_cache=config.train.shard_cache.model_dump(mode="json"),
        images=min(config.eval.max_images or split_images_written, split_images_written),
        model=config.model.model_dump(mode="json"),
        word_counts_url=word_counts_url,
        vocabulary_id=vocabulary_id or parse_word_counts(read_text(word_counts_url)).id,
        eval=config.eval.model_dump(mode="json"),
        phase1_steps=0 if init_source(config) is not None else config.train.phase1.steps,
        log_progress=log.isEnabledFor(logging.INFO),
        summary={
            "run_root": config.run_root,
            "eval_dir": config.eval_dir,
            "model": config.model.model_dump(mode="json", include=SUMMARY_MODEL_KEYS),
            "eval": config.eval.model_dump(mode="json"),
        },
        output_dir=output_dir,
    )


def _baseline(config: Config) -> tuple[Optional[CheckpointRef], Optional[dict]]:
    """The run's pinned baseline (`<run_root>/baseline.json`, from `showtell run`'s baseline step)
    as a ref to evaluate and who it is; (None, None) when none was pinned or promoted."""
    location = baseline_location(config.run_root)
    if location is None:
        return None, None
    model = read_baseline(config.run_root)["model"]
    return CheckpointRef(0, None, BASELINE, location), {"id": model_id(model), "run_root": model["run_root"]}


# ---------------------------------------------------------------------------------------------
# One checkpoint


def _finite(value: float) -> Optional[float]:
    """JSON has no inf or NaN: a diverged checkpoint's perplexity is null."""
    return value if math.isfinite(value) else None


class CheckpointCaptioners:
    """Each checkpoint as (ShowAndTell, Captioner): `trainer.checkpoints.CheckpointLoader` loads it
    (a final/ with its own config and vocabulary, a kept checkpoint with the run's `model` config
    and `<data_dir>/word_counts.txt`), and the Captioner around the model is built again only when
    the loader built a new model. A checkpoint of another vocabulary than the data's is refused
    (ShowtellError naming both ids): a final/ whose own word_counts.txt is not the data's, before
    it is loaded, and a kept one whose state.json names another, by the loader. Its word ids are
    not the records' (perplexity would read ids past its vocabulary), nor its captions' words."""

    def __init__(self, plan: EvalPlan):
        self._plan = plan
        self._loader = ckpt.CheckpointLoader()
        self._captioner = None  # a Captioner of the loader's current model

    def load(self, ref: CheckpointRef):
        """(ShowAndTell, Captioner) holding `ref`'s weights; any error when it does not load. The
        baseline is an export of any vocabulary (it captions in words): (None, its Captioner)."""
        from inference.captioner import Captioner, load_captioner
        from schemas.config import Model

        if ref.kind == BASELINE:
            return None, load_captioner(ref.url)
        if ref.kind == FINAL:
            own, data = parse_word_counts(read_text(join_url(ref.url, WORD_COUNTS_FILE))).id, self._plan.vocabulary_id
            if own != data:
                raise ShowtellError(
                    f"checkpoint {ref.url} was trained on vocabulary {own}, not on the data's {data} "
                    "(the word ids of its records): evaluate it on the data it was trained on"
                )
            loaded = self._loader.load(ref.url)
        else:
            model_cfg = Model.model_validate(self._plan.model)
            loaded = self._loader.load(ref.url, model_cfg, read_text(self._plan.word_counts_url))
        if self._captioner is None or self._captioner.endpoints.owner is not loaded.model:
            self._captioner = Captioner.from_model(loaded.model, loaded.word_counts)
        return loaded.model, self._captioner


def _best(beams: list[tuple[str, float]]) -> tuple[str, float]:
    """The best (sentence, p) of an image; ("", 0.0) when beam search found no caption at all
    (a diverged checkpoint's NaN logits), which then scores 0."""
    return beams[0] if beams else ("", 0.0)


def _error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")


def evaluate_checkpoint(
    ref: CheckpointRef,
    references: dict[int, list[str]],
    plan: EvalPlan,
    loader: CheckpointCaptioners,
    scorer: CocoScorer,
) -> dict:
    """One checkpoint's result: status `ok` with perplexity, metrics, blind baseline and captions,
    or `failed` with the error when it does not load or is of another vocabulary than the data's."""
    from trainer.validation import model_perplexity

    settings = plan.eval
    result = {**dataclasses.asdict(ref), "global_step": _global_step(ref, plan)}
    started = time.time()
    try:
        model, captioner = loader.load(ref)
    except Exception as error:  # any unloadable checkpoint (truncated, garbled, wrong shape) is a result, not a crash
        error_text = _error_text(error)
        progress.warning("evaluate: phase %d %s %s failed to load: %s", ref.phase, ref.kind, ref.url, error_text)
        return {**result, "status": "failed", "error": error_text, "seconds": round(time.time() - started, 1)}

    options = {k: settings[k] for k in ("beam_size", "max_caption_length", "length_normalization", "batch_size")}
    image_size = captioner.image_size
    shown = "the promoted model" if ref.kind == BASELINE else f"phase {ref.phase} {ref.kind} step {ref.step}"
    advance(0, checkpoint=shown, images=f"0/{plan.images}")
    perplexity = math.nan  # the baseline's: its word ids are not the records' (its own vocabulary)
    if model is not None:
        perplexity = model_perplexity(
            model, list(plan.files), image_size, batch_size=settings["batch_size"], shard_cache=plan.shard_cache
        )
    captions = []
    images = split_images(plan.files, settings["max_images"])
    while batch := list(itertools.islice(images, settings["batch_size"])):
        ids, jpegs = zip(*batch)
        for image_id, beams in zip(ids, captioner.caption(jpegs, **options)):
            sentence, p = _best(beams)
            captions.append({"image_id": image_id, "caption": sentence, "p": p, "references": references[image_id]})
        advance(0, checkpoint=shown, images=f"{len(captions)}/{plan.images}")
    blind_sentence, blind_p = _best(captioner.caption([blank_jpeg(image_size)], **options)[0])

    # One tokenizer run for the references, the captions and the blind caption.
    tokenized = scorer.tokenize(
        {
            **{("ref", c["image_id"]): c["references"] for c in captions},
            **{("cap", c["image_id"]): [c["caption"]] for c in captions},
            ("blind",): [blind_sentence],
        }
    )
    image_ids = [c["image_id"] for c in captions]
    tokenized_references = {i: tokenized[("ref", i)] for i in image_ids}
    metrics = scorer.score_tokenized(tokenized_references, {i: tokenized[("cap", i)] for i in image_ids})
    blind_metrics = scorer.score_tokenized(tokenized_references, {i: tokenized[("blind",)] for i in image_ids})
    seconds = round(time.time() - started, 1)
    progress.info(
        "evaluate: phase %d %s step %s: perplexity %.3f, %s %.3f (blind %.3f), %d images in %.1f s",
        ref.phase,
        ref.kind,
        ref.step,
        perplexity,
        settings["select_by"],
        metrics.get(settings["select_by"], math.nan),
        blind_metrics.get(settings["select_by"], math.nan),
        len(captions),
        seconds,
    )
    return {
        **result,
        "status": "ok",
        "perplexity": _finite(perplexity),
        "metrics": metrics,
        "blind": {"caption": blind_sentence, "p": blind_p, "metrics": blind_metrics},
        "seconds": seconds,
        "captions": captions,
    }


def _global_step(ref: CheckpointRef, plan: EvalPlan) -> Optional[int]:
    """Training steps in all: phase 2 counts its steps from phase 1's last."""
    if ref.step is None:
        return None
    return ref.step + (plan.phase1_steps if ref.phase == 2 else 0)


class EvaluateCheckpointFn(beam.DoFn):
    """Evaluates one checkpoint per element; each DoFn instance keeps one built model and one
    COCO scorer (a METEOR JVM) for all the checkpoints it gets."""

    def __init__(self, plan: EvalPlan):
        self._plan = plan
        self._loader: Optional[CheckpointCaptioners] = None
        self._scorer: Optional[CocoScorer] = None
        self._ok = beam.metrics.Metrics.counter("showtell.evaluate", "checkpoints_ok")
        self._failed = beam.metrics.Metrics.counter("showtell.evaluate", "checkpoints_failed")

    def setup(self) -> None:
        if not progress.handlers:  # once per process
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            progress.addHandler(handler)
            progress.propagate = False
        progress.setLevel(logging.INFO if self._plan.log_progress else logging.WARNING)
        self._loader = CheckpointCaptioners(self._plan)
        self._scorer = CocoScorer(spice=self._plan.eval["spice"])

    def process(self, ref: CheckpointRef, references: dict[int, list[str]]) -> Iterator[dict]:
        result = evaluate_checkpoint(ref, references, self._plan, self._loader, self._scorer)
        (self._ok if result["status"] == "ok" else self._failed).inc()
        advance()  # one more checkpoint evaluated (or failed), on the driver's display
        yield result

    def teardown(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None


# ---------------------------------------------------------------------------------------------
# The pipeline and its runner


def write_outputs(results: list[dict], plan: EvalPlan, created: str) -> None:
    """Every checkpoint's result -> report.json, report.html (with the first `report_images`
    images of the split) and best.json in `plan.output_dir`."""
    baseline = next((r for r in results if r["kind"] == BASELINE), None)
    report = build_report(
        [r for r in results if r["kind"] != BASELINE],
        split=plan.split,
        select_by=plan.eval["select_by"],
        summary=plan.summary,
        created=created,
        baseline=None if baseline is None else {**baseline, **plan.baseline_model},
    )
    shown = min(plan.eval["report_images"], plan.eval["max_images"] or plan.eval["report_images"])
    samples = dict(split_images(plan.files, shown)) if shown else {}
    write_report(plan.output_dir, report, samples)


def evaluated(plan: EvalPlan) -> tuple[CheckpointRef, ...]:
    """What the pipeline evaluates: the checkpoints, and the baseline when there is one."""
    return plan.checkpoints + ((plan.baseline,) if plan.baseline else ())


def build_evaluate_pipeline(pipeline: beam.Pipeline, plan: EvalPlan, created: str) -> None:
    """Adds the evaluation transforms to `pipeline`; `created` is the report's timestamp."""
    references = (
        pipeline
        | "SplitFiles" >> beam.Create(plan.files)
        | "ReadSplit" >> beam.FlatMap(shard_records)  # through fsspec: any store, s3:// included
        | "Captions" >> beam.Map(reference_of)
        | "ByImage" >> beam.GroupByKey()
        | "SortReferences" >> beam.MapTuple(lambda image_id, texts: (image_id, sorted(texts)))
        | "References" >> beam.combiners.ToDict()
    )
    _ = (
        pipeline
        | "Checkpoints" >> beam.Create(evaluated(plan))
        | "Spread" >> beam.Reshuffle()
        | "EvaluateCheckpoint" >> beam.ParDo(EvaluateCheckpointFn(plan), beam.pvalue.AsSingleton(references))
        | "Collect" >> beam.combiners.ToList()
        | "WriteReport" >> beam.Map(write_outputs, plan, created)
    )


def run_evaluate(config: Config) -> dict:
    """Runs the pipeline on the configured runner and publishes `<run_root>/eval/`; returns the
    report. ShowtellError (after publishing the report) when no checkpoint could be evaluated."""
    run_id = uuid.uuid4().hex[:8]
    with publish_dir(config.eval_dir, marker=EVAL_REPORT_FILE) as staging:
        plan = plan_from_config(config, staging)
        log.info(
            "evaluate: %d checkpoints%s on the %s split (%s) -> %s on %s",
            len(plan.checkpoints),
            f" and the promoted model {plan.baseline_model['id']}" if plan.baseline_model else "",
            plan.split,
            config.data_dir,
            config.eval_dir,
            config.beam.runner,
        )
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        started = time.time()
        options = pipeline_options(config.beam, job_name=f"showtell-evaluate-{run_id}")
        with tracked("evaluate", total=len(evaluated(plan)), unit="checkpoints"):
            with beam.Pipeline(options=options) as pipeline:
                build_evaluate_pipeline(pipeline, plan, created)
        report = read_json(join_url(staging, EVAL_REPORT_FILE))
    log.info("evaluate: %d checkpoints in %.1f s", len(report["checkpoints"]), time.time() - started)
    if report["best"] is None:
        failed = "; ".join(f"{c['url']}: {c['error']}" for c in report["checkpoints"])
        report_url = join_url(config.eval_dir, EVAL_REPORT_FILE)
        raise ShowtellError(f"no checkpoint could be evaluated (see {report_url}): {failed}")
    return report
