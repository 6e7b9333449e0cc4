"""MSCOCO captions: reading the annotation JSON, im2txt's splits and tokeniser. Pure functions.

Splits (docs/im2txt.md, "Data"): with N images in captions_val2014.json's `images` list,

    train = every train2014 image + val[0 : int(0.85 N)]
    val   = val[int(0.85 N) : int(0.90 N)]
    test  = val[int(0.90 N) :]

    >>> [split_of_val_position(i, 20) for i in (0, 16, 17, 18, 19)]
    ['train', 'train', 'val', 'test', 'test']
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field, replace
from typing import Any

from schemas.errors import ShowtellError
from schemas.vocabulary import END_WORD, START_WORD

TRAIN_FRACTION = 0.85  # of the val2014 images list that goes to training
VAL_END_FRACTION = 0.90  # val2014 images list positions [0.85 N, 0.90 N) are the val split


@dataclass(frozen=True)
class AnnotationSource:
    """One MSCOCO captions file and the image zip its file names refer to."""

    annotations_zip: str  # URL of annotations_trainval2014.zip
    member: str  # the captions JSON inside it, e.g. "annotations/captions_val2014.json"
    images_zip: str  # URL of the matching image zip, e.g. ".../zips/val2014.zip"
    folder: str  # folder of the images inside that zip, e.g. "val2014"
    all_train: bool  # True for train2014 (every image is training); False for val2014 (split by position)


@dataclass(frozen=True)
class Caption:
    annotation_id: int  # MSCOCO annotation id (stable across runs: the shuffle key uses it)
    text: str  # the caption as written, stripped
    # im2txt's tokens, `<S>` ... `</S>`; empty until `tokenized()`, which the pipeline runs per
    # image on every worker (expanding a whole captions file happens in one place).
    tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaptionedImage:
    """An image listed in a captions file, with its split, where its bytes are, and its captions."""

    image_id: int  # MSCOCO image id
    split: str  # "train", "val" or "test"
    images_zip: str  # URL of the zip holding the image
    member: str | None  # the image's path inside the zip; None if its file_name is unsafe
    captions: tuple[Caption, ...] = field(default=())  # non-blank captions, in file order


@dataclass
class CaptionsFile:
    """A captions file, expanded: the listed images plus what was dropped on the way."""

    images: list[CaptionedImage]  # in the file's `images` order
    orphan_annotations: int  # annotations whose image_id is not listed in `images`
    blank_captions: int  # captions empty after stripping (dropped: neither listed nor written)
    duplicate_images: int  # repeated image ids (the first listing is kept)


def split_of_val_position(position: int, num_images: int) -> str:
    """im2txt's split for the image at `position` of captions_val2014.json's images list."""
    if position < int(TRAIN_FRACTION * num_images):
        return "train"
    if position < int(VAL_END_FRACTION * num_images):
        return "val"
    return "test"


def tokenize_caption(text: str) -> tuple[str, ...]:
    """im2txt's tokens: lower-case, NLTK's word tokenizer, `<S>` first and `</S>` last.

    `preserve_line=True` uses the Treebank tokenizer without punkt sentence splitting (punkt
    needs a download); a mid-caption full stop may then stay attached to its word.

    >>> tokenize_caption("A man riding a wave.")
    ('<S>', 'a', 'man', 'riding', 'a', 'wave', '.', '</S>')
    """
    from nltk.tokenize import word_tokenize

    return (START_WORD, *word_tokenize(text.lower(), preserve_line=True), END_WORD)


def safe_member(folder: str, file_name: str) -> str | None:
    """`folder/file_name` if it stays inside `folder`, else None (absolute paths, `..`, backslashes)."""
    if not file_name or "\\" in file_name or file_name.startswith("/"):
        return None
    member = posixpath.normpath(posixpath.join(folder, file_name))
    return member if member.startswith(folder.rstrip("/") + "/") else None


def is_unsafe_zip_name(name: str) -> bool:
    """A zip member name that would escape its folder if extracted (`../x.jpg`, `/etc/x`, `C:\\x`)."""
    normalized = posixpath.normpath(name.replace("\\", "/"))
    return normalized.startswith(("/", "../")) or normalized == ".." or (len(name) > 1 and name[1] == ":")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise ShowtellError(f"{where}: malformed captions file: {what}")


def parse_captions_json(raw: bytes, where: str) -> dict[str, Any]:
    """Parses and checks a captions JSON's structure; ShowtellError names the file and the fault."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShowtellError(f"{where}: malformed captions file: not valid JSON ({error})") from None
    _require(isinstance(document, dict), where, "top level is not an object")
    for key in ("images", "annotations"):
        _require(isinstance(document.get(key), list), where, f"`{key}` is missing or not a list")
    for i, image in enumerate(document["images"]):
        _require(isinstance(image, dict), where, f"images[{i}] is not an object")
        _require(_is_int(image.get("id")), where, f"images[{i}].id is missing or not an integer")
        _require(isinstance(image.get("file_name"), str), where, f"images[{i}].file_name is missing or not a string")
    for i, annotation in enumerate(document["annotations"]):
        _require(isinstance(annotation, dict), where, f"annotations[{i}] is not an object")
        _require(_is_int(annotation.get("id")), where, f"annotations[{i}].id is missing or not an integer")
        _require(
            _is_int(annotation.get("image_id")), where, f"annotations[{i}].image_id is missing or not an integer"
        )
        _require(
            isinstance(annotation.get("caption"), str), where, f"annotations[{i}].caption is missing or not a string"
        )
    return document


def expand_captions(document: dict[str, Any], source: AnnotationSource) -> CaptionsFile:
    """Lists a (checked) captions document's images with their split and captions (not yet tokenised)."""
    captions_by_image: dict[int, list[Caption]] = {}
    listed_ids = {image["id"] for image in document["images"]}
    orphans = blanks = 0
    for annotation in document["annotations"]:
        text = annotation["caption"].strip()
        if not text:
            blanks += 1
        elif annotation["image_id"] not in listed_ids:
            orphans += 1
        else:
            caption = Caption(annotation["id"], text)
            captions_by_image.setdefault(annotation["image_id"], []).append(caption)

    images, seen, duplicates = [], set(), 0
    num_images = len(document["images"])
    for position, image in enumerate(document["images"]):
        if image["id"] in seen:
            duplicates += 1
            continue
        seen.add(image["id"])
        split = "train" if source.all_train else split_of_val_position(position, num_images)
        images.append(
            CaptionedImage(
                image_id=image["id"],
                split=split,
                images_zip=source.images_zip,
                member=safe_member(source.folder, image["file_name"]),
                captions=tuple(captions_by_image.get(image["id"], ())),
            )
        )
    return CaptionsFile(images, orphan_annotations=orphans, blank_captions=blanks, duplicate_images=duplicates)


def load_captions_document(source: AnnotationSource) -> dict[str, Any]:
    """Reads and checks one captions JSON from the annotations zip (any fsspec URL)."""
    from pipelines.zips import read_member

    where = f"{source.annotations_zip}!{source.member}"
    raw = read_member(source.annotations_zip, source.member)
    if raw is None:
        raise ShowtellError(f"{where}: not found in the annotations zip (run `showtell download` first?)")
    return parse_captions_json(raw, where)


def read_captions_file(source: AnnotationSource) -> CaptionsFile:
    """Reads one captions JSON and expands it: images with their split and captions."""
    return expand_captions(load_captions_document(source), source)


def tokenized(image: CaptionedImage) -> CaptionedImage:
    """The image with every caption's tokens filled in."""
    captions = tuple(replace(c, tokens=tokenize_caption(c.text)) for c in image.captions)
    return replace(image, captions=captions)
