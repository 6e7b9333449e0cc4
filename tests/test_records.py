"""schemas/records.py + schemas/tfrecord.py: im2txt's SequenceExample records and TFRecord framing,
checked against TensorFlow's own reader and writer."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import tensorflow as tf

from schemas import records
from schemas.tfrecord import read_records, write_records

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "schema.pbtxt"

JPEG = bytes(range(256)) * 3  # arbitrary binary payload, NULs and high bytes included
TOKENS = ["<S>", "a", "café", "on", "the", "mat", ".", "</S>"]
IDS = [1, 4, 11519, 8, 3, 12, 0, 2]


def _records(n: int = 3) -> list[bytes]:
    return [
        records.encode_sequence_example(100 + i, JPEG + bytes([i]), TOKENS[: 2 + i], IDS[: 2 + i]) for i in range(n)
    ]


def test_encoded_record_round_trips_through_decode():
    serialized = records.encode_sequence_example(318556, JPEG, TOKENS, IDS)

    assert records.decode_sequence_example(serialized) == {
        "image_id": 318556,
        "jpeg": JPEG,
        "tokens": TOKENS,
        "ids": IDS,
    }


def test_encoded_record_uses_im2txt_feature_names():
    example = tf.train.SequenceExample.FromString(records.encode_sequence_example(7, JPEG, TOKENS, IDS))

    assert set(example.context.feature) == {"image/image_id", "image/data"}
    assert set(example.feature_lists.feature_list) == {"image/caption", "image/caption_ids"}
    assert [f.bytes_list.value[0] for f in example.feature_lists.feature_list["image/caption"].feature] == [
        t.encode("utf-8") for t in TOKENS
    ]


def test_encoding_is_deterministic():
    first = records.encode_sequence_example(42, JPEG, TOKENS, IDS)
    second = records.encode_sequence_example(42, bytes(JPEG), list(TOKENS), tuple(IDS))

    assert first == second


@pytest.mark.parametrize("tokens, ids", [(["<S>", "</S>"], [1]), (["<S>"], [1, 2]), ([], [0])])
def test_mismatched_tokens_and_ids_raise(tokens, ids):
    with pytest.raises(ValueError, match=r"image 9: \d+ tokens but \d+ ids"):
        records.encode_sequence_example(9, JPEG, tokens, ids)


def test_records_written_here_parse_in_tensorflow(tmp_path):
    path = tmp_path / "train-00000-of-00001"
    expected = _records(3)
    with open(path, "wb") as handle:
        assert write_records(handle, expected) == 3

    parsed = [
        (int(image_id), bytes(jpeg.numpy()), ids.numpy().tolist())
        for image_id, jpeg, ids in tf.data.TFRecordDataset(str(path)).map(records.parse_sequence_example)
    ]

    assert parsed == [(100 + i, JPEG + bytes([i]), IDS[: 2 + i]) for i in range(3)]


def test_records_written_by_tensorflow_read_back_here(tmp_path):
    path = tmp_path / "shard"
    payloads = _records(2) + [b"", b"\x00" * 70000]
    with tf.io.TFRecordWriter(str(path)) as writer:
        for payload in payloads:
            writer.write(payload)

    with open(path, "rb") as handle:
        assert list(read_records(handle)) == payloads


def test_framing_is_byte_identical_to_tensorflows(tmp_path):
    payloads = _records(2)
    with tf.io.TFRecordWriter(str(tmp_path / "tf")) as writer:
        for payload in payloads:
            writer.write(payload)
    ours = io.BytesIO()
    write_records(ours, payloads)

    assert ours.getvalue() == (tmp_path / "tf").read_bytes()


def test_empty_file_reads_as_no_records():
    assert list(read_records(io.BytesIO(b""))) == []


def _framed(payloads: list[bytes]) -> bytes:
    out = io.BytesIO()
    write_records(out, payloads)
    return out.getvalue()


@pytest.mark.parametrize(
    "offset, fault",
    [
        (0, "length checksum"),  # a byte of the length
        (9, "length checksum"),  # a byte of the length's CRC
        (12, "data checksum"),  # the first byte of the record
        (-1, "data checksum"),  # a byte of the last record's CRC
    ],
)
def test_read_records_raises_on_a_flipped_byte(offset, fault):
    data = bytearray(_framed(_records(2)))
    data[offset] ^= 0x01

    with pytest.raises(ValueError, match=fault):
        list(read_records(io.BytesIO(bytes(data))))


@pytest.mark.parametrize("cut", [1, 4, 11, 12, 30])
def test_read_records_raises_on_truncation(cut):
    data = _framed(_records(2))

    with pytest.raises(ValueError, match="truncated"):
        list(read_records(io.BytesIO(data[:-cut])))


def test_read_records_raises_on_a_truncated_header():
    first, second = _records(2)
    data = _framed([first, second])[: len(_framed([first])) + 5]

    with pytest.raises(ValueError, match="truncated TFRecord header"):
        list(read_records(io.BytesIO(data)))


def test_records_before_the_damage_are_still_yielded():
    data = _framed(_records(2))
    reader = read_records(io.BytesIO(data[:-5]))

    assert next(reader) == _records(2)[0]
    with pytest.raises(ValueError):
        next(reader)


@pytest.mark.parametrize(
    "split, index, count, name",
    [
        ("train", 3, 256, "train-00003-of-00256"),
        ("train", 0, 256, "train-00000-of-00256"),
        ("val", 3, 4, "val-00003-of-00004"),
        ("test", 7, 8, "test-00007-of-00008"),
    ],
)
def test_shard_name_is_im2txts(split, index, count, name):
    assert records.shard_name(split, index, count) == name


def test_shard_names_lists_every_shard_in_order():
    assert records.shard_names("val", 4) == [f"val-0000{i}-of-00004" for i in range(4)]


def test_checked_in_schema_matches_the_code():
    assert SCHEMA_FILE.read_text(encoding="utf-8") == records.record_schema_text()


def test_schema_covers_exactly_the_encoded_features():
    schema = records.record_schema()
    context = {f.name for f in schema.feature if f.name != records.SEQUENCE_COLUMN}
    (sequence,) = [f for f in schema.feature if f.name == records.SEQUENCE_COLUMN]
    example = tf.train.SequenceExample.FromString(records.encode_sequence_example(1, JPEG, TOKENS, IDS))

    assert context == set(example.context.feature)
    assert {f.name for f in sequence.struct_domain.feature} == set(example.feature_lists.feature_list)


def test_the_datas_schema_names_the_vocabulary_of_the_caption_ids_and_loads_with_tensorflow_metadata():
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    text = records.record_schema_text("3f1c0d5e9a7b2468")
    schema = text_format.Parse(text, schema_pb2.Schema())
    (sequence,) = [f for f in schema.feature if f.name == records.SEQUENCE_COLUMN]
    domains = {f.name: f.WhichOneof("domain_info") for f in sequence.struct_domain.feature}
    (caption_ids,) = [f for f in sequence.struct_domain.feature if f.name == records.CAPTION_IDS_KEY]
    caption_ids.ClearField("natural_language_domain")

    assert records.schema_vocabulary_id(text) == "3f1c0d5e9a7b2468"
    assert domains == {records.CAPTION_KEY: None, records.CAPTION_IDS_KEY: "natural_language_domain"}
    assert schema == records.record_schema()  # the checked-in schema, plus that domain only
    assert records.schema_vocabulary_id(SCHEMA_FILE.read_text(encoding="utf-8")) is None
