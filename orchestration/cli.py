"""`showtell` command line: one subcommand per step, each a thin runner over a pure factory."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable, Sequence

from schemas.config import load_config
from schemas.errors import ShowtellError

log = logging.getLogger("showtell")


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


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from pipelines.sample_data import generate_sample_data

    summary = generate_sample_data(
        args.out, train_images=args.train_images, val_images=args.val_images, seed=args.seed, image_size=args.image_size
    )
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from pipelines.download import mirror_dataset

    config = load_config(args.config, args.overrides)
    for result in mirror_dataset(config, progress=not args.quiet and sys.stderr.isatty()):
        print(f"{result.action:>10}  {result.size:>14,d} B  {result.dest}")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from pipelines.preprocess import run_preprocess, summarize_report

    config = load_config(args.config, args.overrides)
    report = run_preprocess(config)
    print(summarize_report(report))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.launcher import run_phase

    config = load_config(args.config, args.overrides)
    summary = run_phase(config, args.phase)
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="showtell", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only and show no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    sample = sub.add_parser("sample-data", help="write a small MSCOCO look-alike in MSCOCO's download layout")
    sample.add_argument("out", help="output directory (local path or fsspec URL)")
    sample.add_argument("--train-images", type=int, default=60, help="images in train2014.zip")
    sample.add_argument("--val-images", type=int, default=40, help="images in val2014.zip")
    sample.add_argument("--seed", type=int, default=0, help="generator seed; same seed, same bytes")
    sample.add_argument("--image-size", type=int, default=96, help="image width and height in pixels")
    sample.set_defaults(func=_cmd_sample_data)

    download = sub.add_parser("download", help="mirror MSCOCO's three files from data.source to data.mirror")
    _add_config_args(download)
    download.set_defaults(func=_cmd_download)

    preprocess = sub.add_parser("preprocess", help="Beam + tf.Transform: mirrored MSCOCO -> im2txt TFRecords")
    _add_config_args(preprocess)
    preprocess.set_defaults(func=_cmd_preprocess)

    train = sub.add_parser("train", help="Ray Train: one training phase (1: encoder frozen, 2: fine-tune everything)")
    _add_config_args(train)
    train.add_argument("--phase", type=int, choices=(1, 2), required=True, help="training phase; 2 starts from 1's final/")
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads; Beam workers inherit it
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("apache_beam", "tensorflow", "absl", "tensorflow_transform", "tfx_bsl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except ShowtellError as error:
        # Expected, user-facing failures: one clear line, non-zero exit, no traceback.
        print(f"showtell {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
