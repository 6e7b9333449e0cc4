"""The sample MSCOCO look-alike: layout, JSON structure, decodable JPEGs, determinism, captions
that describe the pixels, atomic writes, and the `showtell sample-data` command."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipelines.captions import tokenize_caption
from pipelines.sample_data import (
    CAPTIONS_PER_IMAGE,
    COLOURS,
    ImageSpec,
    ShapeSpec,
    captions_for,
    coco_file_name,
    generate_sample_data,
    write_mscoco_layout,
)
from schemas.config import ConfigError, SampleData, build_config
from schemas.errors import ShowtellError

REPO_ROOT = Path(__file__).resolve().parents[1]
ZIP_PATHS = ("annotations/annotations_trainval2014.zip", "zips/train2014.zip", "zips/val2014.zip")
CAPTION_MEMBERS = ["annotations/captions_train2014.json", "annotations/captions_val2014.json"]
MENTION = re.compile(r"\b(?:(small|large) )?(red|green|blue|yellow) (circle|square|triangle|star)\b")


def read_zip(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def captions_documents(out: Path) -> tuple[dict, dict]:
    members = read_zip(out / ZIP_PATHS[0])
    return json.loads(members[CAPTION_MEMBERS[0]]), json.loads(members[CAPTION_MEMBERS[1]])


def captions_by_image(document: dict) -> dict[int, list[str]]:
    grouped: dict[int, list[str]] = {}
    for annotation in document["annotations"]:
        grouped.setdefault(annotation["image_id"], []).append(annotation["caption"])
    return grouped


@pytest.fixture(scope="module")
def default_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    generate_sample_data(str(out))
    return out


# --- Reading shapes back from pixels: background, hue, coverage, size, kind. ---

# What the colour words mean, independently of the generator's palette: pure hues.
HUES = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 220, 0)}
HUE_NAMES = sorted(HUES)
HUE_RGB = np.array([HUES[name] for name in HUE_NAMES], dtype=float)


def column_runs(columns: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True columns: the shapes, which never share a column."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], columns.astype(int), [0]])))
    return list(zip(edges[0::2], edges[1::2]))


def shapes_in(pixels: np.ndarray, image_size: int) -> list[tuple[str, str, str]]:
    """(size, colour, kind) of each shape in an RGB image, left to right, measured from pixels."""
    pixels = pixels.astype(float)
    background = np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]), axis=0)
    references = np.vstack([background, HUE_RGB])
    labels = np.argmin(((pixels[:, :, None, :] - references) ** 2).sum(-1), axis=-1)  # 0: background
    found = []
    for start, stop in column_runs((labels > 0).any(axis=0)):
        strip, strip_labels = pixels[:, start:stop], labels[:, start:stop]
        hue_index = Counter(strip_labels[strip_labels > 0].tolist()).most_common(1)[0][0]
        colour = np.median(strip[strip_labels == hue_index], axis=0)  # the fill as drawn
        # Per-pixel coverage by the shape: 0 on background, 1 inside, fractional on antialiased edges.
        reach = colour - background
        coverage = np.clip((strip - background) @ reach / (reach @ reach), 0, 1)
        rows, columns = np.flatnonzero((coverage > 0.5).any(axis=1)), np.flatnonzero((coverage > 0.5).any(axis=0))
        top, bottom, left, right = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
        fill = coverage[top:bottom, left:right].sum() / ((bottom - top) * (right - left))
        # Below a star's lowest inner vertex its centre column is empty; a triangle's is full.
        low_centre = coverage[top + int(0.9 * (bottom - top)), (left + right) // 2]
        if fill > 0.86:
            kind = "square"
        elif fill > 0.65:
            kind = "circle"
        else:
            kind = "triangle" if low_centre > 0.5 else "star"
        size = "large" if right - left > 0.3 * image_size else "small"
        found.append((size, HUE_NAMES[hue_index - 1], kind))
    return found


def check_caption(caption: str, drawn: list[tuple[str, str, str]]) -> None:
    """Every (size) colour shape the caption names is drawn, all are named, left/right is right."""
    mentions = MENTION.findall(caption.lower())
    assert sorted((colour, kind) for _, colour, kind in mentions) == sorted((c, k) for _, c, k in drawn), caption
    for size, colour, kind in mentions:
        assert not size or (size, colour, kind) in drawn, caption
    if len(drawn) == 2:
        first = (mentions[0][1], mentions[0][2])
        if " to the left of " in caption or " on the left and " in caption:
            assert first == drawn[0][1:], caption
        if " to the right of " in caption:
            assert first == drawn[1][1:], caption


# --- Tests ---


def test_writes_the_mscoco_download_layout(tmp_path: Path) -> None:
    summary = generate_sample_data(str(tmp_path), train_images=3, val_images=2)
    written = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file())
    assert written == sorted(ZIP_PATHS)  # and no temporary files left behind
    assert summary == {
        "out": str(tmp_path),
        "files": {path: f"{tmp_path}/{path}" for path in ZIP_PATHS},
        "train2014": {"images": 3, "captions": 15},
        "val2014": {"images": 2, "captions": 10},
    }
    with zipfile.ZipFile(tmp_path / ZIP_PATHS[0]) as archive:
        assert archive.namelist() == CAPTION_MEMBERS
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    train, val = captions_documents(tmp_path)
    for folder, document in (("train2014", train), ("val2014", val)):
        with zipfile.ZipFile(tmp_path / f"zips/{folder}.zip") as archive:
            expected = [f"{folder}/COCO_{folder}_{image['id']:012d}.jpg" for image in document["images"]]
            assert archive.namelist() == expected
            assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
            assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_captions_json_has_mscoco_structure(default_sample: Path) -> None:
    train, val = captions_documents(default_sample)
    all_image_ids = [image["id"] for document in (train, val) for image in document["images"]]
    all_annotation_ids = [annotation["id"] for document in (train, val) for annotation in document["annotations"]]
    assert len(set(all_image_ids)) == len(all_image_ids) == 100
    assert len(set(all_annotation_ids)) == len(all_annotation_ids) == 500
    assert sorted(all_image_ids) != list(range(min(all_image_ids), min(all_image_ids) + 100))  # not consecutive
    for folder, document in (("train2014", train), ("val2014", val)):
        assert set(document) >= {"info", "licenses", "images", "annotations"}
        members = set(read_zip(default_sample / f"zips/{folder}.zip"))
        listed = {image["id"]: image for image in document["images"]}
        for image_id, image in listed.items():
            assert image["file_name"] == coco_file_name(folder, image_id) == f"COCO_{folder}_{image_id:012d}.jpg"
            assert f"{folder}/{image['file_name']}" in members
            assert (image["width"], image["height"]) == (96, 96)
        grouped = captions_by_image(document)
        assert set(grouped) == set(listed)  # every annotation's image is listed, every image captioned
        assert all(len(captions) == CAPTIONS_PER_IMAGE for captions in grouped.values())
        annotation_order = [annotation["image_id"] for annotation in document["annotations"]]
        assert annotation_order != sorted(annotation_order, key=list(listed).index)  # shuffled, not grouped


def test_every_jpeg_decodes_with_tensorflow_to_its_listed_size(tmp_path: Path) -> None:
    import tensorflow as tf

    generate_sample_data(str(tmp_path), train_images=4, val_images=3, image_size=40)
    train, val = captions_documents(tmp_path)
    for folder, document in (("train2014", train), ("val2014", val)):
        members = read_zip(tmp_path / f"zips/{folder}.zip")
        for image in document["images"]:
            data = members[f"{folder}/{image['file_name']}"]
            assert data[:2] == b"\xff\xd8"
            decoded = tf.io.decode_jpeg(data, channels=3)
            assert tuple(decoded.shape) == (image["height"], image["width"], 3) == (40, 40, 3)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_sample_data(str(tmp_path / name), train_images=5, val_images=4, seed=seed)
    for path in ZIP_PATHS:
        first, again, other = ((tmp_path / name / path).read_bytes() for name in "abc")
        assert first == again, path
        assert first != other, path


def test_captions_describe_the_shapes_in_the_pixels(default_sample: Path) -> None:
    from PIL import Image

    train, val = captions_documents(default_sample)
    pairs_seen = 0
    for folder, document in (("train2014", train), ("val2014", val)):
        members = read_zip(default_sample / f"zips/{folder}.zip")
        grouped = captions_by_image(document)
        for image in document["images"]:
            with Image.open(io.BytesIO(members[f"{folder}/{image['file_name']}"])) as decoded:
                drawn = shapes_in(np.asarray(decoded.convert("RGB")), image["width"])
            assert len(drawn) in (1, 2), image["file_name"]
            pairs_seen += len(drawn) == 2
            for caption in grouped[image["id"]]:
                check_caption(caption, drawn)
    assert 20 <= pairs_seen <= 80  # both single shapes and pairs occur


def test_vocabulary_is_small_and_every_word_is_frequent(default_sample: Path) -> None:
    train, _ = captions_documents(default_sample)
    counts = Counter(token for annotation in train["annotations"] for token in tokenize_caption(annotation["caption"]))
    assert 30 <= len(counts) <= 60
    assert min(counts.values()) >= 4  # im2txt's min_word_count keeps every word
    lengths = [len(annotation["caption"].split()) for annotation in train["annotations"]]
    assert 5 <= min(lengths) and max(lengths) <= 15
    texts = [annotation["caption"] for annotation in train["annotations"]]
    assert any(text[0].isupper() for text in texts) and any(text[0].islower() for text in texts)
    assert any(text.endswith(".") for text in texts) and not all(text.endswith(".") for text in texts)


def test_captions_for_names_both_shapes_in_distinct_phrasings() -> None:
    import random

    left = ShapeSpec(kind="star", colour="blue", size="large", centre=(0.25, 0.5), rgb=COLOURS["blue"])
    right = ShapeSpec(kind="square", colour="yellow", size="small", centre=(0.75, 0.5), rgb=COLOURS["yellow"])
    captions = captions_for(ImageSpec(shapes=(left, right), background=(250, 250, 250)), random.Random(0))
    assert len(captions) == len({caption.lower().rstrip(".") for caption in captions}) == CAPTIONS_PER_IMAGE
    for caption in captions:
        check_caption(caption, [("large", "blue", "star"), ("small", "yellow", "square")])


@pytest.mark.parametrize(
    "arguments",
    [
        {"train_images": 0},
        {"val_images": -1},
        {"train_images": 2.5},
        {"seed": -1},
        {"image_size": 31},
        {"image_size": 4096},
    ],
)
def test_invalid_arguments_raise_showtell_error_and_write_nothing(tmp_path: Path, arguments: dict) -> None:
    with pytest.raises(ShowtellError, match="sample data: (train_images|val_images|seed|image_size) must be"):
        generate_sample_data(str(tmp_path / "out"), **arguments)
    assert not (tmp_path / "out").exists()


def test_more_images_than_the_generators_ids_allow_are_refused_naming_the_limit(tmp_path: Path) -> None:
    too_many = {"train_images": SampleData.MAX_IMAGES, "val_images": 1}
    with pytest.raises(ConfigError, match=r"sample data: at most 100,000 images in all, got 100,001$"):
        generate_sample_data(str(tmp_path / "out"), **too_many)
    with pytest.raises(ConfigError, match=r"sample data: seed must be .*; image_size must be .*; tiles: unknown key$"):
        generate_sample_data(str(tmp_path / "out"), seed=-1, image_size=8, tiles=4)
    assert not (tmp_path / "out").exists()


def test_a_config_files_data_sample_is_held_to_the_same_limits() -> None:
    with pytest.raises(ConfigError, match=r"data\.sample\.image_size: Input should be less than or equal to 1024"):
        build_config({"run_root": "r"}, ["data.sample.image_size=4096"])
    with pytest.raises(ConfigError, match=r"data\.sample: Value error, at most 100,000 images in all"):
        build_config({"run_root": "r"}, ["data.sample.train_images=99999", "data.sample.val_images=2"])


def test_write_mscoco_layout_writes_custom_members_to_any_fsspec_url() -> None:
    out = "memory://showtell-sample-test/raw"
    hostile = {"../../x.jpg": b"not a jpeg", "train2014/COCO_train2014_000000000001.jpg": b"\xff\xd8"}
    try:
        write_mscoco_layout(out, b"{truncated", {"images": [], "annotations": []}, hostile, {})
        fs = fsspec.filesystem("memory")
        assert sorted(fs.find("/showtell-sample-test")) == [f"/showtell-sample-test/raw/{path}" for path in ZIP_PATHS]
        with fs.open(f"/showtell-sample-test/raw/{ZIP_PATHS[1]}", "rb") as stream, zipfile.ZipFile(stream) as archive:
            assert archive.namelist() == list(hostile)  # names kept as given, in the given order
            assert archive.read("../../x.jpg") == b"not a jpeg"
        with fs.open(f"/showtell-sample-test/raw/{ZIP_PATHS[0]}", "rb") as stream, zipfile.ZipFile(stream) as archive:
            assert archive.read(CAPTION_MEMBERS[0]) == b"{truncated"
            assert json.loads(archive.read(CAPTION_MEMBERS[1])) == {"images": [], "annotations": []}
        with fs.open(f"/showtell-sample-test/raw/{ZIP_PATHS[2]}", "rb") as stream, zipfile.ZipFile(stream) as archive:
            assert archive.namelist() == []
    finally:
        fsspec.filesystem("memory").rm("/showtell-sample-test", recursive=True)


def test_a_bad_member_fails_before_any_file_is_replaced(tmp_path: Path) -> None:
    generate_sample_data(str(tmp_path), train_images=2, val_images=2)
    before = {path: (tmp_path / path).read_bytes() for path in ZIP_PATHS}
    not_bytes: dict = {"val2014/b.jpg": None}
    with pytest.raises(TypeError):
        write_mscoco_layout(str(tmp_path), {}, {}, {"train2014/a.jpg": b"ok"}, not_bytes)
    assert {path: (tmp_path / path).read_bytes() for path in ZIP_PATHS} == before
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(ZIP_PATHS)


def test_a_crash_before_the_rename_leaves_the_final_paths_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate_sample_data(str(tmp_path), train_images=2, val_images=2, seed=1)
    before = {path: (tmp_path / path).read_bytes() for path in ZIP_PATHS}

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(LocalFileSystem, "mv", crash)
    with pytest.raises(OSError, match="simulated crash"):
        generate_sample_data(str(tmp_path), train_images=2, val_images=2, seed=2)
    assert {path: (tmp_path / path).read_bytes() for path in ZIP_PATHS} == before


def test_cli_sample_data_prints_its_summary_as_json(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "orchestration.cli", "sample-data", str(tmp_path / "out")]
    done = subprocess.run(
        [*command, "--train-images", "3", "--val-images", "2"], capture_output=True, text=True, env=env, cwd=REPO_ROOT
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["train2014"] == {"images": 3, "captions": 15} and summary["val2014"] == {"images": 2, "captions": 10}
    assert all(Path(path).is_file() for path in summary["files"].values())

    failed = subprocess.run([*command, "--image-size", "8"], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [
        "showtell sample-data: error: sample data: image_size must be an integer from 32 to 1024, got 8"
    ]
