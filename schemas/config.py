"""The typed configuration of a showtell run, loaded from YAML plus `--set a.b=value` overrides.

Every field carries a comment saying what it holds. Unknown keys are errors, and every error
names the dotted key at fault and why, e.g. ``data.shards.train: Input should be greater than 0``.
"""
from __future__ import annotations

import os
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.errors import ShowtellError

# The three files of MSCOCO 2014, relative to a source base URL (REFERENCE.md, "Data").
ANNOTATIONS_ZIP = "annotations/annotations_trainval2014.zip"
TRAIN_IMAGES_ZIP = "zips/train2014.zip"
VAL_IMAGES_ZIP = "zips/val2014.zip"
MSCOCO_FILES = (ANNOTATIONS_ZIP, TRAIN_IMAGES_ZIP, VAL_IMAGES_ZIP)


class ConfigError(ShowtellError):
    """A config file or override that does not fit the schema; the message names the key."""


class _Strict(BaseModel):
    # strict: `true` is not an int, `"3"` is not a number; YAML already gives real types.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class Shards(_Strict):
    train: int = Field(256, gt=0)  # TFRecord files written for the training split (im2txt: 256)
    val: int = Field(4, gt=0)  # files for the validation split (im2txt: 4)
    test: int = Field(8, gt=0)  # files for the test split (im2txt: 8)


class SampleData(_Strict):
    train_images: int = Field(60, gt=0)  # images in the sample's train2014.zip
    val_images: int = Field(40, gt=0)  # images in the sample's val2014.zip (split 85/5/10 as MSCOCO's)
    seed: int = Field(0, ge=0)  # seed of the sample generator: same seed, same bytes
    image_size: int = Field(96, ge=32)  # width and height of the sample's images, in pixels


class Download(_Strict):
    retries: int = Field(5, ge=0)  # further attempts after a failed request (5xx, timeout, dropped connection)
    backoff_seconds: float = Field(1.0, ge=0)  # first wait between attempts; doubles each attempt
    timeout_seconds: float = Field(60.0, gt=0)  # socket read timeout of one request
    chunk_bytes: int = Field(4 << 20, gt=0)  # bytes read per streaming chunk


class Data(_Strict):
    # Where MSCOCO comes from: `sample` (generated here), a local path, or a file://, http(s)://,
    # gs:// or s3:// base URL that holds MSCOCO's layout (annotations/..., zips/...).
    source: str = "sample"
    # Where the three files are mirrored to; null means `<run_root>/raw`.
    mirror: Optional[str] = None
    shards: Shards = Shards()  # shard counts per split
    min_word_count: int = Field(4, ge=1)  # keep words seen at least this often in training captions
    max_image_pixels: int = Field(25_000_000, gt=0)  # images with more pixels are skipped, not decoded
    shuffle_seed: int = 12345  # seed of the record-to-shard shuffle (im2txt's seed)
    # Known checksums of source files, keyed by the file's relative path, as "sha256:<hex>" or
    # "md5:<hex>". Files not listed are verified by size (and by the store's own MD5 where it has one).
    checksums: dict[str, str] = {}
    sample: SampleData = SampleData()  # what `source: sample` generates
    download: Download = Download()  # network behaviour of `showtell download`


class Beam(_Strict):
    runner: str = "DirectRunner"  # any Beam runner name: DirectRunner, DataflowRunner, FlinkRunner, ...
    # DirectRunner only: `multi_processing` runs bundles in `direct_num_workers` processes.
    direct_running_mode: Literal["in_memory", "multi_threading", "multi_processing"] = "multi_processing"
    direct_num_workers: int = Field(0, ge=0)  # DirectRunner worker count; 0 means one per CPU core
    # Extra pipeline options passed to Beam untouched, e.g. ["--project=p", "--region=us-central1"].
    options: list[str] = []


class Config(_Strict):
    run_root: str  # fsspec URL every step writes under (a local path, gs://..., s3://...)
    data: Data = Data()  # where data comes from and how records are written
    beam: Beam = Beam()  # how Beam pipelines run

    @model_validator(mode="after")
    def _resolve_paths(self) -> "Config":
        if self.data.mirror is None:
            self.data.mirror = join_url(self.run_root, "raw")
        return self

    @property
    def data_dir(self) -> str:
        """`<run_root>/data`: shards, word_counts.txt, transform_fn/, preprocess_report.json."""
        return join_url(self.run_root, "data")


def join_url(base: str, *parts: str) -> str:
    """Joins path parts onto a local path or URL with '/', whatever the OS."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    keys = dotted.split(".")
    for i, key in enumerate(keys[:-1]):
        if node.get(key) is None:  # absent, or a YAML section left empty (`data:`)
            node[key] = {}
        child = node[key]
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value read as a YAML scalar or list (`3`, `true`, `[x, y]`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. data.shards.train=16")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif item["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


def build_config(tree: dict[str, Any], overrides: tuple[str, ...] | list[str] = (), origin: str = "config") -> Config:
    """Validates a config tree after applying `a.b=value` overrides; raises ConfigError naming the key."""
    tree = yaml.safe_load(yaml.safe_dump(tree or {}))  # a deep copy we can mutate
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(f"{origin}: {_describe(error)}") from None


def load_config(path: str | os.PathLike, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Reads a YAML config file (any fsspec URL) and validates it with `overrides` applied."""
    import fsspec

    try:
        with fsspec.open(str(path), "r", encoding="utf-8") as handle:
            tree = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as error:  # a directory, no permission, ...
        raise ConfigError(f"{path}: cannot read config file ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return build_config(tree or {}, overrides, origin=str(path))
