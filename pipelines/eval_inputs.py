"""What the evaluation reads from a split's records: each caption as a reference, each image once,
and the blank image of the blind baseline.

    shard_records(url)                -> the serialized records of one shard (any fsspec URL)
    reference_of(serialized)          -> (391895, "a man riding a bike down a dirt road")
    split_images(files, limit=2)      -> (391895, <its JPEG bytes>), (522418, <its JPEG bytes>)
    blank_jpeg(299)                   -> a uniform grey 299 x 299 JPEG
"""
from __future__ import annotations

import io
from typing import Iterable, Iterator, Optional

import fsspec

from schemas import records
from schemas.tfrecord import read_records
from schemas.vocabulary import END_WORD, START_WORD

BLANK_GREY = 128  # the blind baseline's image: every pixel this grey


def shard_records(url: str) -> Iterator[bytes]:
    """The serialized records of one shard, read through fsspec: a local path, s3://, gs://, ..."""
    with fsspec.open(url, "rb") as handle:
        yield from read_records(handle)


def reference_of(serialized: bytes) -> tuple[int, str]:
    """One record -> (image id, its raw caption: the tokens without `<S>`/`</S>`, joined by spaces)."""
    record = records.decode_sequence_example(serialized)
    tokens = [t for t in record["tokens"] if t not in (START_WORD, END_WORD)]
    return record["image_id"], " ".join(tokens)


def split_images(files: Iterable[str], limit: Optional[int] = None) -> Iterator[tuple[int, bytes]]:
    """The split's distinct images, (image id, JPEG bytes), in record order (files in the order
    given), streamed: the first `limit` of them, or all."""
    seen: set[int] = set()
    for url in files:
        for serialized in shard_records(url):
            record = records.decode_sequence_example(serialized)
            if record["image_id"] in seen:
                continue
            seen.add(record["image_id"])
            yield record["image_id"], record["jpeg"]
            if limit is not None and len(seen) >= limit:
                return


def blank_jpeg(size: int) -> bytes:
    """A uniform grey JPEG, `size` pixels square: the blind baseline's input."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), (BLANK_GREY,) * 3).save(out, format="JPEG")
    return out.getvalue()
