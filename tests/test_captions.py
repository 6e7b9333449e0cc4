"""pipelines/captions.py: im2txt's splits and tokeniser, safe zip names, and the captions JSON."""

from __future__ import annotations

import collections
import json

import pytest

from pipelines.captions import (
    AnnotationSource,
    expand_captions,
    is_unsafe_zip_name,
    parse_captions_json,
    safe_member,
    split_of_val_position,
    tokenize_caption,
    tokenized,
)
from schemas.errors import ShowtellError

VAL = AnnotationSource(
    annotations_zip="raw/annotations/annotations_trainval2014.zip",
    member="annotations/captions_val2014.json",
    images_zip="raw/zips/val2014.zip",
    folder="val2014",
    all_train=False,
)
TRAIN = AnnotationSource(
    annotations_zip=VAL.annotations_zip,
    member="annotations/captions_train2014.json",
    images_zip="raw/zips/train2014.zip",
    folder="train2014",
    all_train=True,
)


def _reference_split(position: int, n: int) -> str:
    """docs/im2txt.md, "Data": train = val[0 : int(0.85 N)], val = val[int(0.85 N) : int(0.90 N)], test = the rest."""
    if position < int(0.85 * n):
        return "train"
    if position < int(0.90 * n):
        return "val"
    return "test"


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 19, 20, 21, 40, 99, 100, 101, 997])
def test_split_of_val_position_follows_the_reference_formula(n):
    assert [split_of_val_position(i, n) for i in range(n)] == [_reference_split(i, n) for i in range(n)]


@pytest.mark.parametrize("n", [20, 100, 1000, 40504])
def test_split_boundaries_fall_at_85_and_90_percent(n):
    train_end, val_end = int(0.85 * n), int(0.90 * n)

    assert split_of_val_position(train_end - 1, n) == "train"
    assert split_of_val_position(train_end, n) == "val"
    assert split_of_val_position(val_end - 1, n) == "val"
    assert split_of_val_position(val_end, n) == "test"
    assert split_of_val_position(n - 1, n) == "test"


def test_real_mscoco_val2014_splits_into_34428_2025_4051_positions():
    n = 40504
    counts = collections.Counter(split_of_val_position(i, n) for i in range(n))

    assert counts == {"train": 34428, "val": 2025, "test": 4051}
    assert counts["train"] == int(0.85 * n)
    assert counts["val"] == int(0.90 * n) - int(0.85 * n)


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("A man riding a wave.", ["a", "man", "riding", "a", "wave", "."]),
        ("A DOG, a Cat; and a bird!", ["a", "dog", ",", "a", "cat", ";", "and", "a", "bird", "!"]),
        ("Is this a dog?", ["is", "this", "a", "dog", "?"]),
        ("  Two   dogs \t play  ", ["two", "dogs", "play"]),
        ("The dog's bowl isn't empty", ["the", "dog", "'s", "bowl", "is", "n't", "empty"]),
        ("A CAFÉ in ZÜRICH", ["a", "café", "in", "zürich"]),
        ("Ein Straßenschild", ["ein", "straßenschild"]),
        ("", []),
    ],
)
def test_tokenize_caption_lowercases_splits_punctuation_and_wraps_in_start_end(text, tokens):
    assert tokenize_caption(text) == ("<S>", *tokens, "</S>")


def test_tokenize_caption_keeps_a_mid_caption_full_stop_attached_without_punkt():
    # Documented deviation from im2txt: no punkt sentence splitting offline (preserve_line=True),
    # so only the final full stop is split off.
    assert tokenize_caption("A dog. A cat.") == ("<S>", "a", "dog.", "a", "cat", ".", "</S>")


@pytest.mark.parametrize(
    "file_name, member",
    [
        ("COCO_val2014_000000000042.jpg", "val2014/COCO_val2014_000000000042.jpg"),
        ("sub/./x.jpg", "val2014/sub/x.jpg"),
        ("sub/../x.jpg", "val2014/x.jpg"),  # stays inside: allowed, normalised
        ("../x", None),
        ("a/../../x", None),
        ("/etc/passwd", None),
        ("C:\\x", None),
        ("a\\b.jpg", None),
        ("..\\..\\x", None),
        (".", None),
        ("x/..", None),
        ("", None),
    ],
)
def test_safe_member_keeps_names_inside_the_folder(file_name, member):
    assert safe_member("val2014", file_name) == member


def test_safe_member_accepts_a_folder_with_a_trailing_slash():
    assert safe_member("train2014/", "a.jpg") == "train2014/a.jpg"


@pytest.mark.parametrize(
    "name, unsafe",
    [
        ("../x", True),
        ("a/../../x", True),
        ("/etc/passwd", True),
        ("C:\\x", True),
        ("C:/x", True),
        ("..\\x", True),
        ("a\\..\\..\\x", True),
        ("\\\\server\\share\\x", True),
        ("..", True),
        ("train2014/COCO_train2014_000000000009.jpg", False),
        ("annotations/captions_val2014.json", False),
        ("a/../b.jpg", False),
        ("train2014/", False),
    ],
)
def test_is_unsafe_zip_name_flags_names_that_escape(name, unsafe):
    assert is_unsafe_zip_name(name) is unsafe


def _doc(images=None, annotations=None) -> dict:
    return {
        "images": images if images is not None else [{"id": 1, "file_name": "a.jpg"}],
        "annotations": annotations if annotations is not None else [{"id": 10, "image_id": 1, "caption": "A dog."}],
    }


def test_parse_captions_json_returns_a_valid_document():
    raw = json.dumps(_doc()).encode()

    assert parse_captions_json(raw, "x.json") == _doc()


@pytest.mark.parametrize(
    "raw, fault",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"[1, 2]", "top level is not an object"),
        (json.dumps({"annotations": []}).encode(), "`images` is missing or not a list"),
        (json.dumps({"images": {}, "annotations": []}).encode(), "`images` is missing or not a list"),
        (json.dumps({"images": []}).encode(), "`annotations` is missing or not a list"),
        (json.dumps(_doc(images=["a.jpg"])).encode(), "images[0] is not an object"),
        (json.dumps(_doc(images=[{"file_name": "a.jpg"}])).encode(), "images[0].id is missing or not an integer"),
        (
            json.dumps(_doc(images=[{"id": "1", "file_name": "a.jpg"}])).encode(),
            "images[0].id is missing or not an integer",
        ),
        (
            json.dumps(_doc(images=[{"id": 1, "file_name": "a.jpg"}, {"id": 2}])).encode(),
            "images[1].file_name is missing or not a string",
        ),
        (
            json.dumps(_doc(annotations=[{"id": 1, "caption": "x"}])).encode(),
            "annotations[0].image_id is missing or not an integer",
        ),
        (
            json.dumps(_doc(annotations=[{"id": 1, "image_id": 1, "caption": 5}])).encode(),
            "annotations[0].caption is missing or not a string",
        ),
        (
            json.dumps(_doc(annotations=[{"id": 1, "image_id": 1, "caption": None}])).encode(),
            "annotations[0].caption is missing or not a string",
        ),
    ],
)
def test_parse_captions_json_errors_name_the_file_and_the_fault(raw, fault):
    where = "mirror/annotations_trainval2014.zip!annotations/captions_val2014.json"

    with pytest.raises(ShowtellError) as raised:
        parse_captions_json(raw, where)

    assert str(raised.value).startswith(f"{where}: malformed captions file: ")
    assert fault in str(raised.value)


def test_expand_captions_attaches_stripped_captions_in_file_order_and_tokenized_fills_tokens():
    document = _doc(
        images=[{"id": 5, "file_name": "COCO_5.jpg"}, {"id": 3, "file_name": "COCO_3.jpg"}],
        annotations=[
            {"id": 30, "image_id": 3, "caption": "  A cat sits. "},
            {"id": 50, "image_id": 5, "caption": "A dog runs"},
            {"id": 31, "image_id": 3, "caption": "Cats!"},
        ],
    )

    expanded = expand_captions(document, TRAIN)

    assert [image.image_id for image in expanded.images] == [5, 3]
    cat = expanded.images[1]
    assert [(c.annotation_id, c.text) for c in cat.captions] == [(30, "A cat sits."), (31, "Cats!")]
    assert cat.captions[0].tokens == ()
    assert tokenized(cat).captions[0].tokens == ("<S>", "a", "cat", "sits", ".", "</S>")
    assert [c.text for c in tokenized(cat).captions] == ["A cat sits.", "Cats!"]
    assert cat.member == "train2014/COCO_3.jpg"
    assert cat.images_zip == "raw/zips/train2014.zip"
    assert (expanded.orphan_annotations, expanded.blank_captions, expanded.duplicate_images) == (0, 0, 0)


def test_expand_captions_counts_orphans_blanks_and_duplicates():
    document = _doc(
        images=[
            {"id": 1, "file_name": "a.jpg"},
            {"id": 2, "file_name": "b.jpg"},
            {"id": 1, "file_name": "a-again.jpg"},
        ],
        annotations=[
            {"id": 10, "image_id": 1, "caption": "A dog"},
            {"id": 11, "image_id": 1, "caption": "   "},
            {"id": 12, "image_id": 1, "caption": ""},
            {"id": 13, "image_id": 99, "caption": "Nobody's image"},
            {"id": 14, "image_id": 98, "caption": "Another orphan"},
            {"id": 15, "image_id": 2, "caption": "\t\n"},
        ],
    )

    expanded = expand_captions(document, TRAIN)

    assert expanded.orphan_annotations == 2
    assert expanded.blank_captions == 3
    assert expanded.duplicate_images == 1
    assert [image.image_id for image in expanded.images] == [1, 2]
    assert expanded.images[0].member == "train2014/a.jpg"  # the first listing wins
    assert [c.annotation_id for c in expanded.images[0].captions] == [10]
    assert expanded.images[1].captions == ()  # only a blank caption: kept, with none


def test_expand_captions_lists_unsafe_file_names_with_no_member():
    document = _doc(
        images=[
            {"id": 1, "file_name": "../../etc/passwd"},
            {"id": 2, "file_name": "/abs.jpg"},
            {"id": 3, "file_name": "ok.jpg"},
            {"id": 4, "file_name": "C:\\win.jpg"},
        ],
        annotations=[{"id": 10, "image_id": 1, "caption": "A dog"}],
    )

    expanded = expand_captions(document, VAL)

    assert [(image.image_id, image.member) for image in expanded.images] == [
        (1, None),
        (2, None),
        (3, "val2014/ok.jpg"),
        (4, None),
    ]
    assert expanded.images[0].captions[0].text == "A dog"


def test_expand_captions_splits_val2014_by_position_and_train2014_all_train():
    n = 20
    images = [{"id": 1000 + i, "file_name": f"{i}.jpg"} for i in range(n)]

    val_splits = [image.split for image in expand_captions(_doc(images=images, annotations=[]), VAL).images]
    train_splits = {image.split for image in expand_captions(_doc(images=images, annotations=[]), TRAIN).images}

    assert val_splits == [_reference_split(i, n) for i in range(n)]
    assert train_splits == {"train"}


def test_expand_captions_on_real_mscoco_val2014_size():
    n = 40504
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(n)]

    expanded = expand_captions(_doc(images=images, annotations=[]), VAL)

    assert collections.Counter(image.split for image in expanded.images) == {
        "train": 34428,
        "val": 2025,
        "test": 4051,
    }
