"""Checking one image's bytes before they go into records. Pure: bytes in, verdict out.

Every image that passes decodes with `tf.io.decode_jpeg(channels=3)` (the trainer's decoder).
Bytes that decoder reads are kept as they are (grayscale, CMYK, even PNG under a .jpg name);
bytes it can't read but Pillow can (e.g. TIFF) are re-encoded once to an RGB JPEG; the rest are
skipped with a reason.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

# Skip reasons, as they appear in preprocess_report.json.
MISSING = "missing_image"  # listed in the annotations, absent from the zip
EMPTY = "empty_file"  # zero bytes
NOT_AN_IMAGE = "not_an_image"  # e.g. an HTML error page saved under a .jpg name
TOO_LARGE = "too_many_pixels"  # width x height over data.max_image_pixels (never decoded)
CORRUPT = "corrupt_image"  # a truncated or damaged image that no decoder reads
UNSAFE_NAME = "unsafe_file_name"  # a file_name that points outside its image folder
NO_CAPTIONS = "no_captions"  # an image with no (non-blank) captions

REENCODE_QUALITY = 95  # JPEG quality of re-encoded images


@dataclass(frozen=True)
class ImageVerdict:
    jpeg: bytes | None  # bytes to write (None when skipped)
    skip_reason: str | None  # one of the reasons above, or None when kept
    reencoded: bool = False  # True when the bytes were re-encoded to RGB JPEG
    source_format: str | None = None  # what Pillow saw: "JPEG", "PNG", "TIFF", ...
    size: tuple[int, int] | None = None  # (width, height) from the header, once it was read


def _decodes_with_tf(data: bytes) -> bool:
    """True if tf.io.decode_jpeg reads the bytes as one height x width x 3 image.

    It reads PNG, GIF and BMP too; WebP it returns as a (1, H, W, 3) batch, which is no use.
    """
    import tensorflow as tf

    try:
        return tf.io.decode_jpeg(data, channels=3).shape.rank == 3
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        return False


def _reencode_rgb_jpeg(image) -> bytes | None:
    try:
        rgb = image.convert("RGB")  # forces a full decode; raises on truncated data
    except (OSError, ValueError, SyntaxError):
        return None
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=REENCODE_QUALITY)
    return out.getvalue()


def check_image(data: bytes | None, max_pixels: int) -> ImageVerdict:
    """Decides whether an image's bytes can be written, and which bytes.

    >>> check_image(b"", 10**6).skip_reason
    'empty_file'
    >>> check_image(b"<html>Not Found</html>", 10**6).skip_reason
    'not_an_image'
    """
    return _check(data, max_pixels, decode=True)


# Formats tf.io.decode_jpeg reads (see _decodes_with_tf): check_header passes them on undecoded.
TF_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP"})


def check_header(data: bytes | None, max_pixels: int) -> ImageVerdict:
    """check_image without decoding what TensorFlow reads (JPEG, PNG, GIF, BMP): their header
    must read and their size fit, and the pixels are left to the graph that decodes them anyway
    (a damaged one fails there, `pipelines.caption_model_handler`). Other formats are decoded
    and re-encoded as check_image does. About a tenth of check_image's time on a 640x480 JPEG."""
    return _check(data, max_pixels, decode=False)


def _check(data: bytes | None, max_pixels: int, decode: bool) -> ImageVerdict:
    from PIL import Image, UnidentifiedImageError

    if data is None:
        return ImageVerdict(None, MISSING)
    if not data:
        return ImageVerdict(None, EMPTY)
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        source_format = image.format
    except Image.DecompressionBombError:  # Pillow's own limit, far above any real photo
        return ImageVerdict(None, TOO_LARGE)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return ImageVerdict(None, NOT_AN_IMAGE)
    seen = {"source_format": source_format, "size": (width, height)}
    if width * height > max_pixels:
        return ImageVerdict(None, TOO_LARGE, **seen)
    if (not decode and source_format in TF_FORMATS) or (decode and _decodes_with_tf(data)):
        return ImageVerdict(data, None, **seen)
    reencoded = _reencode_rgb_jpeg(image)
    if reencoded is None or not _decodes_with_tf(reencoded):
        return ImageVerdict(None, CORRUPT, **seen)
    return ImageVerdict(reencoded, None, reencoded=True, **seen)
