"""`showtell` command line: one subcommand per step, each a thin runner over a pure factory."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from typing import Callable, ContextManager, Iterator, Optional, Sequence, TypeVar

from pydantic import BaseModel, ValidationError

from schemas.config import Config, ConfigError, Eval, describe_errors, load_config
from schemas.errors import ShowtellError

Section = TypeVar("Section", bound=BaseModel)

PROGRESS_EVERY = 30.0  # seconds between progress lines off a terminal (cron, Kubeflow)

EXIT_CODES = """exit codes:
  0  done; a promotion the gate held back is done too (promote.json and report.html say why)
  1  a step failed for any other reason: a crashed worker, a lost node, a bug (its log has the traceback)
  2  a user's mistake: a bad config key or flag, a missing or corrupt input, a run_root held by another run
"""

# `showtell export`'s and `showtell caption`'s flags that mirror `eval` keys: argparse dests, named as the keys.
SEARCH_SETTINGS = ("beam_size", "max_caption_length", "length_normalization")
CAPTION_SETTINGS = (*SEARCH_SETTINGS, "batch_size")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (local path or fsspec URL)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.shards.train=16 (repeatable)",
    )


def _add_search_args(
    parser: argparse.ArgumentParser, defaults: Eval, default_text: str, with_defaults: bool = False
) -> None:
    """--beam-size, --max-caption-length and --length-normalization, which mirror the `eval` keys;
    without `with_defaults` an unset flag is None (`_given`)."""
    flags = {
        "beam_size": (int, "captions kept per image"),
        "max_caption_length": (int, "words per caption at most"),
        "length_normalization": (float, "rank finished captions by log p / words**F; 0: off (im2txt)"),
    }
    for name, (kind, text) in flags.items():
        value = getattr(defaults, name)
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=value if with_defaults else None,
            help=f"{text} ({default_text}{value})",
        )


def _mirrored(section: type[Section], key: str, args: argparse.Namespace, names: Sequence[str]) -> Section:
    """The flags `names` (argparse dests, named as the fields) as the config section `key` that
    they mirror, checked by that section's model, once, as a config file's keys are. A bad value
    is a ConfigError naming the flag and the key:

        _mirrored(Eval, "eval", argparse.Namespace(beam_size=0), ["beam_size"])
        # ConfigError: --beam-size (eval.beam_size): Input should be greater than 0 (got 0)
    """

    def flag_and_key(field: str) -> str:
        return f"--{field.replace('_', '-')} ({key}.{field})"

    try:
        return section(**{name: getattr(args, name) for name in names})
    except ValidationError as error:
        raise ConfigError(describe_errors(error, name=flag_and_key)) from None


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from pipelines.sample_data import generate_sample_data
    from schemas.config import SampleData

    # The flags given, named as SampleData's fields: generate_sample_data checks them through it.
    settings = {name: getattr(args, name) for name in SampleData.model_fields if hasattr(args, name)}
    print(json.dumps(generate_sample_data(args.out, **settings), indent=2))
    return 0


def _as_step(args: argparse.Namespace, config: Config, step: str) -> ContextManager[None]:
    """A subcommand run alone, as `showtell run` runs its step: the engines' output goes to
    `<run_root>/logs/<step>.log` (and the console with --verbose), a failure is one line naming it."""
    from orchestration.run import step_log_url
    from orchestration.step_log import logged_step, open_console
    from schemas.stores import prepare

    prepare(config)  # the stores' settings applied, and each store checked once, before the log goes there
    return logged_step(step, step_log_url(config, step), open_console() if args.verbose else None)


def _engine_output(args: argparse.Namespace) -> ContextManager[None]:
    """A subcommand without a run_root (caption, caption-batch, export, serve): TensorFlow's own lines go to
    `<temp dir>/showtell/<subcommand>.log` (appended to), and the console with --verbose."""
    import tempfile

    from orchestration.step_log import open_console, step_output

    log = os.path.join(tempfile.gettempdir(), "showtell", f"{args.command}.log")
    return step_output(log, open_console() if args.verbose else None)


def _result(args: argparse.Namespace, text: str) -> None:
    """A step subcommand's summary on stdout; --quiet prints nothing on success."""
    if not args.quiet:
        print(text)


def _cmd_download(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    with _as_step(args, config, "download"):  # the engines' imports too: TensorFlow prints as it loads
        from pipelines.download import mirror_dataset

        results = mirror_dataset(config)
    _result(args, "\n".join(f"{r.action:>10}  {r.size:>14,d} B  {r.dest}" for r in results))
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    with _as_step(args, config, "preprocess"):
        from pipelines.preprocess import run_preprocess
        from pipelines.preprocess_report import summarize_report

        report = run_preprocess(config)
    _result(args, summarize_report(report))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    with _as_step(args, config, f"train-phase{args.phase}"):
        from orchestration.steps import train_phase

        summary = train_phase(config, args.phase)
    _result(args, json.dumps(summary, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    with _as_step(args, config, "evaluate"):
        from pipelines.eval_report import summarize_report
        from pipelines.evaluate import run_evaluate

        report = run_evaluate(config)
    _result(args, summarize_report(report))
    return 0


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, object]:
    """The flags of `names` that were given on the command line (their argparse default is None)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _cmd_caption(args: argparse.Namespace) -> int:
    given = _given(args, CAPTION_SETTINGS)
    _mirrored(Eval, "eval", argparse.Namespace(**given), list(given))  # before TensorFlow and the checkpoint load
    with _engine_output(args):
        from inference.captioner import caption_files, load_captioner

        captioner = load_captioner(args.checkpoint)
        # Unset flags: an export's `caption` signature settings (one graph call per batch), else eval's defaults.
        search = {**dataclasses.asdict(captioner.default_search()), **given}
        results = caption_files(captioner, args.images, **search)
    for result in results:
        if "error" in result:
            print(f"showtell caption: error: {result['path']}: {result['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "images": results}, indent=2))
    else:
        for result in results:
            if "captions" in result:  # im2txt's run_inference output
                print(f"Captions for image {result['path']}:")
                for i, caption in enumerate(result["captions"]):
                    print(f"  {i}) {caption['sentence']} (p={caption['p']:f})")
    return 1 if any("error" in result for result in results) else 0


def _cmd_export(args: argparse.Namespace) -> int:
    from schemas.storage import absolute

    with _engine_output(args):
        from inference.caption_signature import Search
        from inference.export import export_saved_model

        search = _mirrored(Eval, "eval", args, SEARCH_SETTINGS)  # checked as the eval keys they mirror
        exported = export_saved_model(args.checkpoint, args.out, Search.of(search))
    print(absolute(exported))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from schemas.config import ConfigError

    with _engine_output(args):  # Ray's, Serve's and TensorFlow's lines go to the log; showtell's to the console
        from inference.serve import ServeSettings, serve_until_stopped

        given = {name: getattr(args, name) for name in ServeSettings.model_fields if hasattr(args, name)}
        try:
            settings = ServeSettings(**given)
        except ValidationError as error:
            raise ConfigError(describe_errors(error, name=lambda field: f"--{field.replace('_', '-')}")) from None
        serve_until_stopped(settings)
    return 0


def _cmd_caption_batch(args: argparse.Namespace) -> int:
    job_settings = _given(args, ("batch_size", "shard_size", "max_image_bytes"))
    config = load_config(args.config, args.overrides) if args.config else None
    if config is not None:
        from schemas.stores import apply

        apply(config.storage)  # the stores' endpoints and credentials, as every command with a config
    with _engine_output(args):
        from pipelines.caption_batch import CaptionJob, run_caption_batch, summarize
        from schemas.config import Beam

        if config is not None:  # the config's limits and images per model call; flags win
            job_settings = {
                "batch_size": config.eval.batch_size,
                "max_image_pixels": config.data.max_image_pixels,
                **job_settings,
            }
        job = CaptionJob(model=args.model, input=args.input, output=args.output, **job_settings)
        summary = run_caption_batch(job, config.beam if config is not None else Beam())
    _result(args, summarize(summary, job))
    return 0


def _dated_config(args: argparse.Namespace) -> Config:
    """The config of `run`, `status` and `report`, `{date}` filled in (--date), its stores'
    settings applied and each store checked once, before anything is read or written there."""
    from schemas.config import load_dated_config
    from schemas.stores import prepare

    config = load_dated_config(args.config, args.overrides, args.date)
    prepare(config)
    return config


def _cmd_run(args: argparse.Namespace) -> int:
    from orchestration.run import run_pipeline
    from orchestration.run_text import format_outcomes, format_results
    from orchestration.step_log import StepFailedError, open_console

    config = _dated_config(args)
    try:
        result = run_pipeline(
            config,
            until=args.until,
            start=args.start,
            force=args.force,
            wait=args.wait,
            echo_to=open_console() if args.verbose else None,
        )
    except StepFailedError:
        _write_run_report(config)  # the failed step, its error and its log are on it too
        raise
    report = _write_run_report(config)
    if not args.quiet:
        print(format_outcomes(result))
        results = format_results(config, result)
        if results:
            print(results)
        if report:
            print(f"run report: {report}")
    return 0


def _write_run_report(config: Config) -> Optional[str]:
    """`<run_root>/report.html` at the end of a run; a report that cannot be written is a
    warning, not a failed run (the steps' outputs are what counts)."""
    from orchestration.run_report import write_run_report
    from orchestration.step_log import error_line

    try:
        return write_run_report(config)
    except Exception as error:  # any: the run's own result stands
        logging.getLogger("showtell.run").warning("the run report was not written: %s", error_line(error))
        return None


def _cmd_promote(args: argparse.Namespace) -> int:
    from orchestration.promote import rollback
    from orchestration.steps import promote_run
    from schemas.models_root import models_root_of

    if (args.rollback or args.force) and not (args.reason or "").strip():
        raise ShowtellError(f"{'--rollback' if args.rollback else '--force'} needs --reason TEXT, for the audit line")
    if args.reason and not (args.rollback or args.force):
        raise ShowtellError("--reason goes with --rollback or --force")
    config = _dated_config(args)
    if args.rollback:
        record = rollback(models_root_of(config), args.reason, config.run.lock_stale_seconds)
        restored, displaced = record["restored"], record["displaced"]
        _result(
            args,
            f"rolled back: {record['model']} is model {restored['id']} again (trained on {restored['run_root']}); "
            f"model {displaced['id']} is kept at {displaced['location']}",
        )
        return 0
    record = promote_run(config, forced=args.reason if args.force else None)
    where = record["model"] or f"{models_root_of(config)} unchanged"
    _result(args, f"{record['decision'].replace('_', ' ')}: {record['reason']} ({where})")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from orchestration.run import step_status
    from orchestration.run_text import format_status

    config = _dated_config(args)
    print(format_status(config, step_status(config)))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from orchestration.run_report import write_run_report

    config = _dated_config(args)
    print(write_run_report(config))
    return 0


def _cmd_export_pipeline(args: argparse.Namespace) -> int:
    from orchestration.kfp_pipeline import compile_kfp_pipeline

    config = load_config(args.config, args.overrides)
    print(compile_kfp_pipeline(config, args.config, args.out))
    return 0


def _seconds(text: str) -> float:
    """An argparse type for a flag that mirrors no config key: a number of seconds, 0 or more.
    Flags that mirror a config key are checked by its model instead (`_mirrored`)."""
    value = float(text)
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"should be greater than or equal to 0 (got {text})")
    return value


def _positive_int(text: str) -> int:
    """An argparse type for a count that mirrors no config key: an integer, 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"should be greater than 0 (got {text})")
    return value


def _add_console_args(parser: argparse.ArgumentParser, after_subcommand: bool) -> None:
    """-q, -v and --progress-every, before the subcommand (`showtell -q run ...`) and after it
    (`showtell run ... -q`, for cron lines); given after it, they win, and not given there, the
    ones before stand (argparse.SUPPRESS keeps them out of the subcommand's namespace)."""

    def default(value):
        return argparse.SUPPRESS if after_subcommand else value

    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default(False),
        help="print nothing on success and one line per error (for cron); no progress display",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="also stream what each step's engines print (Ray, TensorFlow, Beam; always in <run_root>/logs/)",
    )
    parser.add_argument(
        "--progress-every",
        type=_seconds,
        default=default(PROGRESS_EVERY),
        metavar="SECONDS",
        help=f"off a terminal, one progress line per long step at most every SECONDS (default {PROGRESS_EVERY:.0f})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="showtell", description=__doc__, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_console_args(parser, after_subcommand=False)
    console_args = argparse.ArgumentParser(add_help=False)
    _add_console_args(console_args, after_subcommand=True)
    subcommands = parser.add_subparsers(dest="command", required=True)

    def add_subcommand(name: str, **options) -> argparse.ArgumentParser:
        return subcommands.add_parser(name, parents=[console_args], **options)

    sample = add_subcommand("sample-data", help="write a small MSCOCO look-alike in MSCOCO's download layout")
    sample.add_argument("out", help="output directory (local path or fsspec URL)")
    # data.sample's keys (SampleData): a flag left out takes the key's default; SampleData checks them.
    unset = argparse.SUPPRESS
    sample.add_argument("--train-images", type=int, default=unset, help="images in train2014.zip")
    sample.add_argument("--val-images", type=int, default=unset, help="images in val2014.zip")
    sample.add_argument("--seed", type=int, default=unset, help="generator seed; same seed, same bytes")
    sample.add_argument("--image-size", type=int, default=unset, help="image width and height in pixels")
    sample.set_defaults(func=_cmd_sample_data)

    download = add_subcommand("download", help="mirror MSCOCO's three files from data.source to data.mirror")
    _add_config_args(download)
    download.set_defaults(func=_cmd_download)

    preprocess = add_subcommand("preprocess", help="Beam + tf.Transform: mirrored MSCOCO -> im2txt TFRecords")
    _add_config_args(preprocess)
    preprocess.set_defaults(func=_cmd_preprocess)

    train = add_subcommand("train", help="Ray Train: one training phase (1: encoder frozen, 2: fine-tune everything)")
    _add_config_args(train)
    train.add_argument(
        "--phase", type=int, choices=(1, 2), required=True, help="training phase; 2 starts from 1's final/"
    )
    train.set_defaults(func=_cmd_train)

    evaluate = add_subcommand(
        "evaluate",
        help="Beam: every checkpoint -> perplexity, beam-search captions, COCO metrics; <run_root>/eval/ report",
    )
    _add_config_args(evaluate)
    evaluate.set_defaults(func=_cmd_evaluate)

    # im2txt's beam search settings, as `showtell evaluate` uses them; checked by `_mirrored` as eval.*.
    defaults = Eval()
    caption = add_subcommand("caption", help="beam-search captions for image files, as im2txt's run_inference")
    caption.add_argument("--checkpoint", required=True, help="a published final/ folder or a `showtell export` folder")
    caption.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG, PNG, ... files (paths or fsspec URLs)")
    _add_search_args(caption, defaults, "default: an export's `caption` signature's, else ")
    caption.add_argument(
        "--batch-size", type=int, help=f"images per model batch (default: {defaults.batch_size})"
    )
    caption.add_argument("--json", action="store_true", help="print one JSON document instead of im2txt's text")
    caption.set_defaults(func=_cmd_caption)

    export = add_subcommand("export", help="a final/ checkpoint -> a TensorFlow SavedModel (TF Serving, caption)")
    export.add_argument("--checkpoint", required=True, help="a published final/ folder (local path or fsspec URL)")
    export.add_argument("out", help="the SavedModel folder to write (local path or fsspec URL); replaced whole")
    _add_search_args(export, defaults, "the `caption` signature's beam search; default: ", with_defaults=True)
    export.set_defaults(func=_cmd_export)

    served = add_subcommand(
        "serve", help="an export's captions over HTTP (Ray Serve, dynamic batching) until Ctrl-C or SIGTERM"
    )
    served.add_argument("--model", required=True, help="a `showtell export` folder (local path or fsspec URL)")
    # inference.serve.ServeSettings's fields: a flag left out takes the field's default; ServeSettings checks them.
    served.add_argument("--host", default=unset, help="the address to listen on (default: 127.0.0.1)")
    served.add_argument("--port", type=int, default=unset, help="the port to listen on (default: 8000)")
    served.add_argument("--replicas", type=int, default=unset, help="model replicas, each reserving a CPU (default: 1)")
    served.add_argument(
        "--max-batch-size", type=int, default=unset, help="images per model call at most; 1: no batching (default: 32)"
    )
    served.add_argument(
        "--batch-wait-timeout-s",
        type=float,
        default=unset,
        metavar="SECONDS",
        help="how long a batch's first image waits for others (default: 0; batches still fill under load)",
    )
    served.add_argument(
        "--max-request-bytes", type=int, default=unset, help="a larger POST body gets 413 (default: 10 MiB)"
    )
    served.set_defaults(func=_cmd_serve)

    batch = add_subcommand(
        "caption-batch",
        help="a Beam pipeline (RunInference) captions every image of a glob, folder, zip or URL list into JSONL shards",
    )
    batch.add_argument("--model", required=True, help="a `showtell export` folder (local path or fsspec URL)")
    batch.add_argument(
        "--input",
        required=True,
        metavar="URL_OR_GLOB",
        help="an fsspec glob (s3://b/photos/**.jpg), a folder, a .zip, or a .txt of image URLs, one per line",
    )
    batch.add_argument("--output", required=True, help="the folder of the JSONL shards (any fsspec URL); resumes there")
    batch.add_argument(
        "--config", help="a config whose beam.* (runner), storage.*, eval.batch_size and data.max_image_pixels apply"
    )
    batch.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="as run's")
    batch.add_argument("--batch-size", type=_positive_int, help="images per model call at most (default: 64)")
    batch.add_argument("--shard-size", type=_positive_int, help="images per output shard (default: 1000)")
    batch.add_argument(
        "--max-image-bytes", type=_positive_int, help="larger files are error lines, never read (default: 20 MiB)"
    )
    batch.set_defaults(func=_cmd_caption_batch)

    pipeline = add_subcommand(
        "export-pipeline", help="compile `showtell run` for a scheduler: a Kubeflow Pipelines v2 YAML"
    )
    pipeline.add_argument("engine", choices=["kfp"], help="the scheduler (kfp: Kubeflow Pipelines v2)")
    pipeline.add_argument("out", help="the pipeline file to write, e.g. showtell.yaml")
    _add_config_args(pipeline)
    pipeline.set_defaults(func=_cmd_export_pipeline)

    from orchestration.steps import STEP_NAMES

    steps_text = ", ".join(STEP_NAMES)
    run = add_subcommand("run", help=f"the whole pipeline, resumable, under a lock on run_root: {steps_text}")
    _add_config_args(run)
    run.add_argument("--until", metavar="STEP", help=f"stop after STEP (one of {steps_text})")
    again = run.add_mutually_exclusive_group()
    again.add_argument(
        "--from", dest="start", metavar="STEP", help="re-run STEP and the steps after it; the ones before must be done"
    )
    again.add_argument(
        "--force", metavar="STEP", help="re-run STEP and the steps after it, bringing the ones before up to date"
    )
    run.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for another run holding the run_root lock (default: fail at once, naming it)",
    )
    promote = add_subcommand(
        "promote",
        help="the run's export against the current model (the promote step's gate), or by hand: "
        "--force promotes it whatever the gate says, --rollback restores the previous model",
    )
    _add_config_args(promote)
    by_hand = promote.add_mutually_exclusive_group()
    by_hand.add_argument(
        "--force", action="store_true", help="promote the run's export even if the gate holds it back"
    )
    by_hand.add_argument(
        "--rollback", action="store_true", help="make the model that was current before the current one current again"
    )
    promote.add_argument(
        "--reason", metavar="TEXT", help="why, for the history's audit line (with --force or --rollback)"
    )
    status = add_subcommand(
        "status", help="each step of `showtell run`: state, start, duration, outputs, current or stale"
    )
    _add_config_args(status)
    report = add_subcommand("report", help="write <run_root>/report.html, the whole run on one page; prints its path")
    _add_config_args(report)
    for command in (run, promote, status, report):
        command.add_argument(
            "--date", metavar="YYYY-MM-DD", help="the day `{date}` in the config stands for (default: today, UTC)"
        )
    run.set_defaults(func=_cmd_run)
    promote.set_defaults(func=_cmd_promote)
    status.set_defaults(func=_cmd_status)
    report.set_defaults(func=_cmd_report)
    return parser


def _route_logging(quiet: bool) -> None:
    """showtell's own log lines go to the console; every other library's (Beam, Ray, TensorFlow,
    absl) go to stderr, which during a step is that step's log (`orchestration.step_log`). With
    --quiet, the console gets errors only, and showtell's warnings go to the step's log instead."""
    from orchestration.step_log import open_console

    root = logging.getLogger()
    if root.handlers:  # configured already (a test's log capture, or an embedding program)
        return
    console_level = logging.ERROR if quiet else logging.INFO

    def ours(record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] == "showtell"

    line = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler(open_console())
    console.addFilter(lambda record: ours(record) and record.levelno >= console_level)
    engines = logging.StreamHandler(sys.stderr)
    engines.addFilter(lambda record: not ours(record) or record.levelno < console_level)
    for handler in (console, engines):
        handler.setFormatter(line)
        root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    # The store clients log a line per file system they make, some outside any step's log.
    engines = ("apache_beam", "tensorflow", "absl", "tensorflow_transform", "tfx_bsl")
    store_clients = ("fsspec", "s3fs", "gcsfs", "botocore", "aiobotocore", "google", "urllib3")
    for noisy in engines + store_clients:
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def _progress_shown(args: argparse.Namespace) -> Iterator[None]:
    """While the command runs, long steps show progress on the console: a bar on a terminal, a
    line every --progress-every seconds off one, nothing with --quiet (schemas.progress)."""
    from orchestration.step_log import open_console
    from schemas import progress

    console = open_console()
    progress.configure(None if args.quiet else console, bar=console.isatty(), every=args.progress_every)
    try:
        yield
    finally:
        progress.configure(None, bar=False)  # an embedding program's (a test's) streams may close after


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads; Beam workers inherit it
    _route_logging(quiet=args.quiet)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        with _progress_shown(args):
            return handler(args)
    except ShowtellError as error:
        # One line, no traceback: a user's mistake (2), or a failed step naming its log, which
        # holds the traceback (2 or 1: orchestration.step_log.StepFailedError).
        print(f"showtell {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
