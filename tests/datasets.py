"""Small MSCOCO-layout datasets for tests: the generated sample, plus every bad input the
preprocessing issue names, injected into train2014 (so they all belong to the train split)."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.sample_data import generate_sample_data, write_mscoco_layout
from schemas.config import ANNOTATIONS_ZIP, TRAIN_IMAGES_ZIP, VAL_IMAGES_ZIP

TRAIN_JSON = "annotations/captions_train2014.json"
VAL_JSON = "annotations/captions_val2014.json"


def _read_zip(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


@dataclass
class Layout:
    """An MSCOCO layout held in memory, to edit and write back."""

    train_json: dict
    val_json: dict
    train_members: dict[str, bytes]
    val_members: dict[str, bytes]

    @classmethod
    def read(cls, root: Path) -> "Layout":
        annotations = _read_zip(root / ANNOTATIONS_ZIP)
        return cls(
            json.loads(annotations[TRAIN_JSON]),
            json.loads(annotations[VAL_JSON]),
            _read_zip(root / TRAIN_IMAGES_ZIP),
            _read_zip(root / VAL_IMAGES_ZIP),
        )

    def write(self, root: Path) -> Path:
        write_mscoco_layout(str(root), self.train_json, self.val_json, self.train_members, self.val_members)
        return root

    def add_train_image(
        self, image_id: int, data: bytes | None, captions: list[str], file_name: str | None = None
    ) -> None:
        """Lists an image in captions_train2014.json; `data=None` leaves it out of the zip."""
        file_name = file_name or f"COCO_train2014_{image_id:012d}.jpg"
        self.train_json["images"].append({"id": image_id, "file_name": file_name, "width": 96, "height": 96})
        next_id = max(a["id"] for a in self.train_json["annotations"] + self.val_json["annotations"]) + 1
        for offset, caption in enumerate(captions):
            self.train_json["annotations"].append({"id": next_id + offset, "image_id": image_id, "caption": caption})
        if data is not None:
            self.train_members[f"train2014/{file_name}"] = data


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def picture(size: int = 96, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.full((size, size, 3), 240, np.uint8)
    pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (200, 30, 30)
    pixels = np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


CAPTIONS = ["a red square on a white background"] * 5


@dataclass
class DefectiveDataset:
    """Where the dataset is and what each injected image should become."""

    root: Path
    skipped: dict[int, str] = field(default_factory=dict)  # image id -> expected skip reason
    kept: dict[int, str] = field(default_factory=dict)  # image id -> what it is ("grayscale", ...)
    reencoded: dict[int, str] = field(default_factory=dict)  # image id -> its source format
    blank_caption_image: int = 0  # a sample image that got one extra, blank caption
    orphan_annotations: int = 1
    unsafe_members: int = 2  # "../../x.jpg" and "train2014/../../evil.jpg"
    max_image_pixels: int = 100_000  # the config the test must use for the oversized image


def make_defective_dataset(root: Path, train_images: int = 24, val_images: int = 20) -> DefectiveDataset:
    """The generated sample with the issue's bad inputs added; see DefectiveDataset for the expectations."""
    clean = root / "clean"
    generate_sample_data(str(clean), train_images=train_images, val_images=val_images, seed=7)
    layout = Layout.read(clean)
    expect = DefectiveDataset(root / "mscoco")
    good_jpeg = encode(picture(), "JPEG", quality=90)

    layout.add_train_image(900001, None, CAPTIONS)
    expect.skipped[900001] = "missing_image"
    layout.add_train_image(900002, b"", CAPTIONS)
    expect.skipped[900002] = "empty_file"
    layout.add_train_image(900003, good_jpeg[: len(good_jpeg) // 2], CAPTIONS)
    expect.skipped[900003] = "corrupt_image"
    layout.add_train_image(900004, b"<html><body><h1>404 Not Found</h1></body></html>", CAPTIONS)
    expect.skipped[900004] = "not_an_image"
    layout.add_train_image(900005, good_jpeg, [])
    expect.skipped[900005] = "no_captions"
    layout.add_train_image(900006, good_jpeg, CAPTIONS, file_name="../../evil.jpg")
    expect.skipped[900006] = "unsafe_file_name"
    layout.add_train_image(900007, encode(picture(400), "JPEG"), CAPTIONS)
    expect.skipped[900007] = "too_many_pixels"

    layout.add_train_image(900010, encode(picture().convert("L"), "JPEG"), CAPTIONS)
    expect.kept[900010] = "grayscale"
    layout.add_train_image(900011, encode(picture().convert("CMYK"), "JPEG"), CAPTIONS)
    expect.kept[900011] = "cmyk"
    layout.add_train_image(900012, encode(picture(), "PNG"), CAPTIONS)
    expect.kept[900012] = "png"
    layout.add_train_image(900013, encode(picture(), "TIFF"), CAPTIONS)
    expect.kept[900013] = "tiff"
    expect.reencoded[900013] = "TIFF"

    first = layout.train_json["images"][0]["id"]
    layout.train_json["annotations"].append({"id": 990001, "image_id": first, "caption": "   \n "})
    expect.blank_caption_image = first
    layout.train_json["annotations"].append({"id": 990002, "image_id": 999999, "caption": "an orphan caption"})
    layout.train_members["../../x.jpg"] = good_jpeg
    layout.write(expect.root)
    return expect
