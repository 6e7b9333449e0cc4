"""pipelines/images.py `check_image`: which bytes go into records, checked with real TensorFlow."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipelines import images
from pipelines.images import check_image

MAX_PIXELS = 10**6
WIDTH, HEIGHT = 37, 23  # odd, non-square, so a transposed or resized decode shows


def _rgb() -> Image.Image:
    """A smooth colour gradient: JPEG round-trips it closely."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    pixels = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, (x + y) * 255 // (WIDTH + HEIGHT)], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR and no pixel data: Pillow reads its size; no decoder can read pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _decoded_shape(data: bytes) -> tuple[int, ...]:
    return tuple(tf.io.decode_jpeg(data, channels=3).shape)


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, images.MISSING),
        (b"", images.EMPTY),
        (b"<html><body>404 Not Found</body></html>", images.NOT_AN_IMAGE),
        (b"\xff\xd8\xff", images.NOT_AN_IMAGE),  # a JPEG marker and nothing else
    ],
)
def test_unusable_bytes_are_skipped_with_a_reason(data, reason):
    verdict = check_image(data, MAX_PIXELS)

    assert verdict.skip_reason == reason
    assert verdict.jpeg is None
    assert not verdict.reencoded


def test_truncated_jpeg_is_corrupt():
    jpeg = _encode(_rgb(), "JPEG")
    scan_start = jpeg.index(b"\xff\xda")  # start of scan: the header before it is whole
    cut = (scan_start + len(jpeg)) // 2

    verdict = check_image(jpeg[:cut], MAX_PIXELS)

    assert verdict.skip_reason == images.CORRUPT
    assert verdict.jpeg is None
    assert verdict.source_format == "JPEG"


@pytest.mark.parametrize(
    "mode, fmt",
    [
        ("RGB", "JPEG"),
        ("L", "JPEG"),  # grayscale JPEG
        ("CMYK", "JPEG"),  # CMYK JPEG
        ("RGB", "PNG"),  # a PNG under a .jpg name
        ("RGBA", "PNG"),
    ],
)
def test_images_tensorflow_decodes_are_kept_byte_for_byte(mode, fmt):
    data = _encode(_rgb().convert(mode), fmt)

    verdict = check_image(data, MAX_PIXELS)

    assert verdict.skip_reason is None
    assert verdict.jpeg == data
    assert not verdict.reencoded
    assert verdict.source_format == fmt
    assert _decoded_shape(verdict.jpeg) == (HEIGHT, WIDTH, 3)


def test_tiff_is_reencoded_to_a_jpeg_tensorflow_reads_at_the_same_size():
    data = _encode(_rgb(), "TIFF")
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_jpeg(data, channels=3)  # the premise: TensorFlow can't read TIFF

    verdict = check_image(data, MAX_PIXELS)

    assert verdict.skip_reason is None
    assert verdict.reencoded
    assert verdict.source_format == "TIFF"
    assert verdict.jpeg != data
    assert Image.open(io.BytesIO(verdict.jpeg)).format == "JPEG"
    assert _decoded_shape(verdict.jpeg) == (HEIGHT, WIDTH, 3)


def test_reencoded_tiff_keeps_its_pixels_close():
    source = _rgb()

    verdict = check_image(_encode(source, "TIFF"), MAX_PIXELS)

    decoded = tf.io.decode_jpeg(verdict.jpeg, channels=3).numpy().astype(int)
    assert np.abs(decoded - np.asarray(source, dtype=int)).mean() < 3  # JPEG q95 of a gradient: close, not exact


def test_every_kept_image_decodes_to_height_width_3():
    data = _encode(_rgb(), "WEBP")

    verdict = check_image(data, MAX_PIXELS)

    assert verdict.skip_reason is None
    assert _decoded_shape(verdict.jpeg) == (HEIGHT, WIDTH, 3)


def test_image_at_exactly_max_pixels_is_kept_one_more_is_not():
    data = _encode(_rgb(), "JPEG")

    assert check_image(data, WIDTH * HEIGHT).skip_reason is None
    assert check_image(data, WIDTH * HEIGHT - 1).skip_reason == images.TOO_LARGE


@pytest.mark.parametrize(
    "width, height",
    [
        (5000, 4000),  # 20 Mpx: over our limit, under Pillow's bomb check
        (100_000, 100_000),  # 10 Gpx: over Pillow's DecompressionBomb limit too
    ],
)
def test_too_many_pixels_is_decided_from_the_header_without_decoding(width, height):
    data = _png_header_only(width, height)
    # Without the size check this would be corrupt_image: there are no pixels to decode.
    assert check_image(_png_header_only(10, 10), MAX_PIXELS).skip_reason == images.CORRUPT

    verdict = check_image(data, MAX_PIXELS)

    assert verdict.skip_reason == images.TOO_LARGE
    assert verdict.jpeg is None


def test_a_real_large_image_over_the_limit_is_skipped():
    data = _encode(Image.new("1", (4000, 3000)), "PNG")  # 12 Mpx, a few kB

    assert check_image(data, 10_000_000).skip_reason == images.TOO_LARGE


def test_check_header_passes_what_tensorflow_reads_undecoded_and_decides_the_rest_as_check_image():
    jpeg = _encode(_rgb(), "JPEG")
    truncated = jpeg[: (jpeg.index(b"\xff\xda") + len(jpeg)) // 2]
    tiff = _encode(_rgb(), "TIFF")

    # A damaged JPEG passes on its header: the graph that decodes it finds the damage.
    assert images.check_header(truncated, MAX_PIXELS).jpeg == truncated
    assert images.check_header(jpeg, MAX_PIXELS) == check_image(jpeg, MAX_PIXELS)
    assert images.check_header(tiff, MAX_PIXELS) == check_image(tiff, MAX_PIXELS)  # re-encoded, as there
    assert images.check_header(b"<html>", MAX_PIXELS).skip_reason == images.NOT_AN_IMAGE
    assert images.check_header(jpeg, WIDTH * HEIGHT - 1).skip_reason == images.TOO_LARGE
