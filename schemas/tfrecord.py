"""TFRecord framing over any file object, so shards stream to local disk, gs:// or s3:// alike.

A record is: uint64 length, uint32 masked crc32c(length), data, uint32 masked crc32c(data),
little-endian (the format tf.io.TFRecordWriter writes and tf.data.TFRecordDataset reads).
"""
from __future__ import annotations

import struct
from typing import BinaryIO, Iterable, Iterator

import google_crc32c

_MASK_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _header(record: bytes) -> bytes:
    length = struct.pack("<Q", len(record))
    return length + struct.pack("<I", _masked_crc(length))


def write_records(handle: BinaryIO, records: Iterable[bytes]) -> int:
    """Writes framed records to an open binary file; returns how many were written.

    Header, data and footer are written separately: records hold whole JPEGs, not worth copying.
    """
    count = 0
    for record in records:
        handle.write(_header(record))
        handle.write(record)
        handle.write(struct.pack("<I", _masked_crc(record)))
        count += 1
    return count


def read_records(handle: BinaryIO) -> Iterator[bytes]:
    """Reads framed records, checking both checksums; raises ValueError on a corrupt file."""
    while True:
        header = handle.read(12)
        if not header:
            return
        if len(header) != 12:
            raise ValueError("truncated TFRecord header")
        (length,) = struct.unpack("<Q", header[:8])
        if struct.unpack("<I", header[8:])[0] != _masked_crc(header[:8]):
            raise ValueError("TFRecord length checksum mismatch")
        data = handle.read(length)
        footer = handle.read(4)
        if len(data) != length or len(footer) != 4:
            raise ValueError("truncated TFRecord")
        if struct.unpack("<I", footer)[0] != _masked_crc(data):
            raise ValueError("TFRecord data checksum mismatch")
        yield data
