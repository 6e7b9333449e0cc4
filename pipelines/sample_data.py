"""A small MSCOCO 2014 look-alike, written in MSCOCO's exact download layout.

Tests and the demo read it with the same code as the real data (docs/im2txt.md, "Data"):

    OUT/annotations/annotations_trainval2014.zip   annotations/captions_{train,val}2014.json
    OUT/zips/train2014.zip                         train2014/COCO_train2014_%012d.jpg
    OUT/zips/val2014.zip                           val2014/COCO_val2014_%012d.jpg

Each image shows one or two flat shapes (circle, square, triangle, star) in red, green, blue or
yellow, small or large, on a near-white background; its five captions describe exactly that
("a large red circle to the left of a small blue star"), in a vocabulary of about 40 words, so a
small CNN + LSTM learns it in minutes. Same arguments, byte-identical zips.

    summary = generate_sample_data("/tmp/coco-sample", train_images=3, val_images=2, seed=7)
    summary["val2014"]  # {'images': 2, 'captions': 10}

`write_mscoco_layout` writes any captions documents and zip members in the same layout, for
tests and benchmarks that need custom or defective datasets. `ensure_sample_data` is
`showtell download`'s `source: sample`: it generates the set once per setting, and stamps it.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import zipfile
from dataclasses import dataclass
from typing import Any, Mapping

import fsspec
import numpy as np
from PIL import Image, ImageDraw

from schemas.config import ANNOTATIONS_ZIP, MSCOCO_FILES, TRAIN_IMAGES_ZIP, VAL_IMAGES_ZIP, SampleData, join_url
from schemas.storage import fresh_fs, read_json_object, remove, write_text

log = logging.getLogger("showtell.sample_data")

TRAIN_FOLDER = "train2014"  # folder of the images in train2014.zip, and their file-name infix
VAL_FOLDER = "val2014"  # the same for val2014.zip
TRAIN_CAPTIONS_MEMBER = "annotations/captions_train2014.json"  # inside annotations_trainval2014.zip
VAL_CAPTIONS_MEMBER = "annotations/captions_val2014.json"

CAPTIONS_PER_IMAGE = 5  # as most MSCOCO images
MAX_IMAGE_ID = 600_000  # image ids are drawn from [1, MAX_IMAGE_ID), like MSCOCO's (up to 581,929)
# Annotation ids are drawn from [1, MAX_ANNOTATION_ID): at most half of them are taken, so draws stay sparse.
MAX_ANNOTATION_ID = 2 * CAPTIONS_PER_IMAGE * SampleData.MAX_IMAGES
SAMPLE_STAMP_FILE = "sample.json"  # in the mirror: the settings a sample set was generated with, its files' hashes

ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # every member's timestamp: the zip epoch, for identical bytes
ZIP_UNIX_MODE = 0o100644  # regular file, rw-r--r--
JPEG_QUALITY = 90  # Pillow JPEG quality (1-95): small files, no visible blocking
SUPERSAMPLE = 4  # shapes are drawn this many times larger, then box-filtered down (antialiasing)
NOISE_STDDEV = 3.0  # per-pixel Gaussian noise, in 0-255 levels, so JPEGs are not perfectly flat
COLOUR_JITTER = 12  # each fill channel is the palette's +- this, so colours vary a little

# The palette: caption word -> RGB. Far apart, and far from the near-white background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 200),
    "yellow": (240, 200, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
# Size word -> half the shape's width, as a fraction of the image width.
SIZES: dict[str, float] = {"small": 0.11, "large": 0.2}
BACKGROUND_MIN_LEVEL = 235  # background channels are drawn from [this, 255]: white, lightly tinted
STAR_INNER_RADIUS = 0.38  # a star's inner vertices, as a fraction of its outer radius
TWO_SHAPES_PROBABILITY = 0.5  # share of images with two shapes side by side

# Caption templates. {one} is "red circle", {big_one} "large red circle"; {left}/{right} and
# {big_left}/{big_right} the same for the left and right shape of a pair.
ONE_SHAPE_TEMPLATES = (
    "a {big_one} on a white background",
    "a {one} on a plain background",
    "there is a {big_one} in the picture",
    "an image of a {one}",
    "a picture of a {big_one}",
    "a single {one} on a white background",
    "a simple drawing of a {big_one}",
    "a {one} in the middle of the picture",
)
TWO_SHAPE_TEMPLATES = (
    "a {left} next to a {right}",
    "a {big_left} to the left of a {big_right}",
    "a {big_right} to the right of a {left}",
    "there is a {left} and a {right}",
    "two shapes, a {left} and a {right}",
    "a {big_left} and a {big_right} on a white background",
    "a {left} on the left and a {right} on the right",
    "a picture of a {right} next to a {left}",
)
CAPITALIZE_PROBABILITY = 0.5  # share of captions starting with a capital ("A red circle")
FULL_STOP_PROBABILITY = 0.4  # share of captions ending with "."

COCO_INFO = {
    "description": "showtell sample: an MSCOCO 2014 look-alike of coloured shapes",
    "url": "https://cocodataset.org",
    "version": "1.0",
    "year": 2014,
    "contributor": "showtell",
    "date_created": "1980-01-01 00:00:00",
}
COCO_LICENSES = [{"url": "https://creativecommons.org/publicdomain/zero/1.0/", "id": 1, "name": "CC0 1.0"}]


@dataclass(frozen=True)
class ShapeSpec:
    """One shape to draw."""

    kind: str  # one of SHAPES
    colour: str  # a key of COLOURS: the word the captions use
    size: str  # a key of SIZES
    centre: tuple[float, float]  # (x, y) as fractions of the image's width and height
    rgb: tuple[int, int, int]  # the exact fill: the colour's palette RGB, jittered a little


@dataclass(frozen=True)
class ImageSpec:
    """What one sample image shows; its captions are derived from it."""

    shapes: tuple[ShapeSpec, ...]  # one shape, or two side by side (the left one first)
    background: tuple[int, int, int]  # RGB of the plain, near-white background


def coco_file_name(split_folder: str, image_id: int) -> str:
    """MSCOCO's bare file name of an image, e.g. ``COCO_val2014_000000000042.jpg``."""
    return f"COCO_{split_folder}_{image_id:012d}.jpg"


def random_shape(rng: random.Random, x_range: tuple[float, float], y_range: tuple[float, float]) -> ShapeSpec:
    """A random shape whose centre lies in the given ranges (fractions of the image size)."""
    colour = rng.choice(sorted(COLOURS))
    red, green, blue = (
        min(255, max(0, level + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for level in COLOURS[colour]
    )
    return ShapeSpec(
        kind=rng.choice(SHAPES),
        colour=colour,
        size=rng.choice(sorted(SIZES)),
        centre=(rng.uniform(*x_range), rng.uniform(*y_range)),
        rgb=(red, green, blue),
    )


def random_image_spec(rng: random.Random) -> ImageSpec:
    """One shape somewhere near the middle, or two: one in each half, never overlapping."""
    red, green, blue = (rng.randint(BACKGROUND_MIN_LEVEL, 255) for _ in range(3))
    y_range = (0.38, 0.62)
    if rng.random() >= TWO_SHAPES_PROBABILITY:
        shapes: tuple[ShapeSpec, ...] = (random_shape(rng, (0.38, 0.62), y_range),)
    else:
        left = random_shape(rng, (0.22, 0.28), y_range)
        right = random_shape(rng, (0.72, 0.78), y_range)
        while (right.kind, right.colour) == (left.kind, left.colour):
            right = random_shape(rng, (0.72, 0.78), y_range)
        shapes = (left, right)
    return ImageSpec(shapes=shapes, background=(red, green, blue))


def shape_outline(shape: ShapeSpec, canvas_size: int) -> list[tuple[float, float]]:
    """The shape's polygon in canvas pixels (circles and squares: their bounding box's corners)."""
    cx, cy = shape.centre[0] * canvas_size, shape.centre[1] * canvas_size
    radius = SIZES[shape.size] * canvas_size
    if shape.kind in ("circle", "square"):
        return [(cx - radius, cy - radius), (cx + radius, cy + radius)]
    if shape.kind == "triangle":
        return [(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)]
    points = []
    for vertex in range(10):
        angle = math.pi * vertex / 5 - math.pi / 2
        reach = radius if vertex % 2 == 0 else radius * STAR_INNER_RADIUS
        points.append((cx + reach * math.cos(angle), cy + reach * math.sin(angle)))
    return points


def render_image(spec: ImageSpec, size: int, rng: np.random.Generator) -> Image.Image:
    """Draws `spec` as a `size` x `size` RGB image: antialiased shapes plus a little pixel noise."""
    canvas_size = size * SUPERSAMPLE
    canvas = Image.new("RGB", (canvas_size, canvas_size), spec.background)
    draw = ImageDraw.Draw(canvas)
    for shape in spec.shapes:
        outline = shape_outline(shape, canvas_size)
        if shape.kind == "circle":
            draw.ellipse(outline, fill=shape.rgb)
        elif shape.kind == "square":
            draw.rectangle(outline, fill=shape.rgb)
        else:
            draw.polygon(outline, fill=shape.rgb)
    pixels = np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float64)
    noisy = pixels + rng.normal(0.0, NOISE_STDDEV, pixels.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


def encode_jpeg(image: Image.Image) -> bytes:
    """Baseline JPEG bytes of `image` (deterministic for a given Pillow build)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _styled(caption: str, rng: random.Random) -> str:
    """Varies a caption's surface as MSCOCO's annotators did: a capital first letter, a full stop."""
    if rng.random() < CAPITALIZE_PROBABILITY:
        caption = caption[0].upper() + caption[1:]
    if rng.random() < FULL_STOP_PROBABILITY:
        caption += "."
    return caption


def captions_for(spec: ImageSpec, rng: random.Random) -> list[str]:
    """CAPTIONS_PER_IMAGE captions of `spec`, each a different phrasing naming every shape drawn."""
    names = [f"{shape.colour} {shape.kind}" for shape in spec.shapes]
    big_names = [f"{shape.size} {name}" for shape, name in zip(spec.shapes, names)]
    if len(spec.shapes) == 1:
        templates = ONE_SHAPE_TEMPLATES
        words = {"one": names[0], "big_one": big_names[0]}
    else:
        templates = TWO_SHAPE_TEMPLATES
        words = {"left": names[0], "right": names[1], "big_left": big_names[0], "big_right": big_names[1]}
    chosen = rng.sample(templates, CAPTIONS_PER_IMAGE)
    return [_styled(template.format(**words), rng) for template in chosen]


def captions_document(images: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> dict[str, Any]:
    """A captions JSON document with MSCOCO's top-level keys, in MSCOCO's order."""
    return {"info": COCO_INFO, "images": images, "licenses": COCO_LICENSES, "annotations": annotations}


def _sample_split(
    folder: str,
    image_ids: list[int],
    annotation_ids: list[int],
    image_size: int,
    rng: random.Random,
    noise_rng: np.random.Generator,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One split's captions document and image zip members; annotations in shuffled order."""
    images, annotations, members = [], [], {}
    next_annotation_id = iter(annotation_ids)
    for image_id in image_ids:
        spec = random_image_spec(rng)
        file_name = coco_file_name(folder, image_id)
        members[f"{folder}/{file_name}"] = encode_jpeg(render_image(spec, image_size, noise_rng))
        images.append({"license": 1, "file_name": file_name, "height": image_size, "width": image_size, "id": image_id})
        annotations += [
            {"image_id": image_id, "id": next(next_annotation_id), "caption": caption}
            for caption in captions_for(spec, rng)
        ]
    rng.shuffle(annotations)
    return captions_document(images, annotations), members


def _json_bytes(document: Mapping[str, Any] | bytes) -> bytes:
    return document if isinstance(document, bytes) else json.dumps(document).encode("utf-8")


def zip_bytes(members: list[tuple[str, bytes, int]]) -> bytes:
    """A zip archive of (member name, data, compression) in the given order, with fixed metadata."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data, compression in members:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
            info.compress_type = compression
            info.create_system = 3  # Unix, whatever the platform, so the bytes are the same
            info.external_attr = ZIP_UNIX_MODE << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def _write_atomically(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Writes `data` to `path` through a temporary name, so `path` is never half-written."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    partial = f"{path}.partial"
    with fs.open(partial, "wb") as stream:
        stream.write(data)
    fs.mv(partial, path)


def write_mscoco_layout(
    out: str,
    train_json: Mapping[str, Any] | bytes,
    val_json: Mapping[str, Any] | bytes,
    train_members: Mapping[str, bytes],
    val_members: Mapping[str, bytes],
) -> None:
    """Writes MSCOCO 2014's three download files under `out` (a local path or any fsspec URL).

    The captions documents go into `annotations/annotations_trainval2014.zip` (deflated); a
    document given as bytes is stored as is, e.g. to write a malformed one. The member mappings,
    zip member name -> bytes, become `zips/train2014.zip` and `zips/val2014.zip` (stored, in the
    mappings' order); their names are written as given, hostile ones (`../x.jpg`) included.
    All three archives are built before any is written.
    """
    archives = {
        ANNOTATIONS_ZIP: zip_bytes(
            [
                (TRAIN_CAPTIONS_MEMBER, _json_bytes(train_json), zipfile.ZIP_DEFLATED),
                (VAL_CAPTIONS_MEMBER, _json_bytes(val_json), zipfile.ZIP_DEFLATED),
            ]
        ),
        TRAIN_IMAGES_ZIP: zip_bytes([(name, data, zipfile.ZIP_STORED) for name, data in train_members.items()]),
        VAL_IMAGES_ZIP: zip_bytes([(name, data, zipfile.ZIP_STORED) for name, data in val_members.items()]),
    }
    fs, root = fsspec.core.url_to_fs(out)
    for relative_path, data in archives.items():
        _write_atomically(fs, f"{root.rstrip('/')}/{relative_path}", data)


def generate_sample_data(out: str, **settings: int) -> dict[str, Any]:
    """Writes a seeded MSCOCO look-alike under `out` (local path or fsspec URL); returns a summary.

    `settings` are `SampleData`'s (train_images, val_images, seed, image_size), its defaults for
    any left out; a bad one is a ConfigError naming it, and nothing is written. The summary names
    the three files written and counts the images and captions of each captions file:
    ``{"out": ..., "files": {...}, "train2014": {"images": 60, "captions": 300}, "val2014": {...}}``.
    Same settings, byte-identical files.
    """
    sample = SampleData.checked(**settings)
    train_images, val_images, image_size = sample.train_images, sample.val_images, sample.image_size
    rng = random.Random(sample.seed)
    noise_rng = np.random.default_rng(sample.seed)
    total_images = train_images + val_images
    image_ids = rng.sample(range(1, MAX_IMAGE_ID), total_images)
    annotation_ids = rng.sample(range(1, MAX_ANNOTATION_ID), total_images * CAPTIONS_PER_IMAGE)
    train_captions = train_images * CAPTIONS_PER_IMAGE
    train_json, train_members = _sample_split(
        TRAIN_FOLDER, image_ids[:train_images], annotation_ids[:train_captions], image_size, rng, noise_rng
    )
    val_json, val_members = _sample_split(
        VAL_FOLDER, image_ids[train_images:], annotation_ids[train_captions:], image_size, rng, noise_rng
    )
    write_mscoco_layout(out, train_json, val_json, train_members, val_members)
    base = out.rstrip("/")
    return {
        "out": out,
        "files": {path: f"{base}/{path}" for path in (ANNOTATIONS_ZIP, TRAIN_IMAGES_ZIP, VAL_IMAGES_ZIP)},
        TRAIN_FOLDER: {"images": len(train_json["images"]), "captions": len(train_json["annotations"])},
        VAL_FOLDER: {"images": len(val_json["images"]), "captions": len(val_json["annotations"])},
    }


# --- `source: sample`: generated once per setting, stamped ---------------------------------------


def ensure_sample_data(mirror: str, sample: SampleData) -> tuple[str, dict[str, dict[str, Any]]]:
    """Generates the sample set into `mirror` unless its stamp says this very set is there.

    Returns what happened, "generated" or "skipped", and the size and SHA-256 of each of
    MSCOCO's three files, by relative path. The stamp, `<mirror>/sample.json`, records the
    settings and those hashes; it is removed before generating, so a stale one never vouches for
    half-regenerated files.

        ensure_sample_data("/tmp/raw", SampleData(seed=3))  # -> ("generated", {"zips/val2014.zip": ...})
        ensure_sample_data("/tmp/raw", SampleData(seed=3))  # -> ("skipped", the same hashes)
    """
    settings = sample.model_dump()
    stamp = join_url(mirror, SAMPLE_STAMP_FILE)
    record = read_json_object(stamp)
    if record is not None and _sample_is_current(mirror, record, settings):
        action = "skipped"
    else:
        remove(stamp)
        generate_sample_data(mirror, **settings)
        record = {"settings": settings, "files": {path: _hash_file(join_url(mirror, path)) for path in MSCOCO_FILES}}
        write_text(stamp, json.dumps(record, indent=2))
        action = "generated"
    log.info("%s the sample set in %s (%s)", action, mirror, settings)
    return action, {path: record["files"][path] for path in MSCOCO_FILES}


def _sample_is_current(mirror: str, record: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether the stamp was written for these settings and its three files are there, their sizes unchanged."""
    if record.get("settings") != settings:
        return False
    for relpath in MSCOCO_FILES:
        fs, path = fresh_fs(join_url(mirror, relpath))
        entry = record.get("files", {}).get(relpath, {})
        if not fs.exists(path) or fs.size(path) != entry.get("size"):
            return False
    return True


def _hash_file(url: str, chunk_bytes: int = 1 << 20) -> dict[str, Any]:
    """{"size", "sha256"} of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with fsspec.open(url, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}
