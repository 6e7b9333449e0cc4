"""im2txt's record format, defined once for the preprocessing writer and the trainer's reader.

One `tf.train.SequenceExample` per (image, caption) pair (docs/im2txt.md, "Data"):

    context:       image/image_id     int64   the MSCOCO image id
                   image/data         bytes   the JPEG bytes (decodable by tf.io.decode_jpeg)
    feature_lists: image/caption      bytes   one token per step: [b"<S>", b"a", b"dog", b"</S>"]
                   image/caption_ids  int64   the tokens' ids:   [1, 4, 230, 2]

Shards are named like im2txt's: `train-00000-of-00256`.

Their tensorflow-metadata schema (`record_schema`) is `schemas/schema.pbtxt`; the one preprocessing
writes next to the shards (`data/schema.pbtxt`) also names the vocabulary of `image/caption_ids`,
by its id (`schemas.vocabulary.vocabulary_id`), as that feature's natural-language domain:

    feature { name: "image/caption_ids" ... natural_language_domain { vocabulary: "3f1c0d5e9a7b2468" } }
"""
from __future__ import annotations

from typing import Optional, Sequence

IMAGE_ID_KEY = "image/image_id"
IMAGE_DATA_KEY = "image/data"
CAPTION_KEY = "image/caption"
CAPTION_IDS_KEY = "image/caption_ids"

# tensorflow-metadata puts SequenceExample feature lists under this struct (as tfx_bsl does).
SEQUENCE_COLUMN = "##SEQUENCE##"


def shard_name(split: str, index: int, num_shards: int) -> str:
    """`shard_name("train", 3, 256)` -> "train-00003-of-00256"."""
    return f"{split}-{index:05d}-of-{num_shards:05d}"


def shard_names(split: str, num_shards: int) -> list[str]:
    return [shard_name(split, i, num_shards) for i in range(num_shards)]


def encode_sequence_example(image_id: int, jpeg: bytes, tokens: Sequence[str], ids: Sequence[int]) -> bytes:
    """Serialises one record. `tokens` and `ids` have the same length, `<S>` and `</S>` included."""
    from tensorflow.core.example import example_pb2, feature_pb2

    if len(tokens) != len(ids):
        raise ValueError(f"image {image_id}: {len(tokens)} tokens but {len(ids)} ids")
    context = feature_pb2.Features(
        feature={
            IMAGE_ID_KEY: feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[image_id])),
            IMAGE_DATA_KEY: feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[jpeg])),
        }
    )
    caption = [feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[t.encode("utf-8")])) for t in tokens]
    caption_ids = [feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[int(i)])) for i in ids]
    lists = feature_pb2.FeatureLists(
        feature_list={
            CAPTION_KEY: feature_pb2.FeatureList(feature=caption),
            CAPTION_IDS_KEY: feature_pb2.FeatureList(feature=caption_ids),
        }
    )
    return example_pb2.SequenceExample(context=context, feature_lists=lists).SerializeToString(deterministic=True)


def decode_sequence_example(serialized: bytes) -> dict:
    """Plain-Python view of one record: {"image_id", "jpeg", "tokens", "ids"} (for tests and tools)."""
    from tensorflow.core.example import example_pb2

    example = example_pb2.SequenceExample.FromString(serialized)
    ctx = example.context.feature
    lists = example.feature_lists.feature_list
    return {
        "image_id": ctx[IMAGE_ID_KEY].int64_list.value[0],
        "jpeg": ctx[IMAGE_DATA_KEY].bytes_list.value[0],
        "tokens": [f.bytes_list.value[0].decode("utf-8") for f in lists[CAPTION_KEY].feature],
        "ids": [f.int64_list.value[0] for f in lists[CAPTION_IDS_KEY].feature],
    }


def parse_sequence_example(serialized):
    """TensorFlow parse of one serialized record (a scalar string tensor), for tf.data pipelines.

    Returns (image_id: int64 [], jpeg: string [], caption_ids: int64 [T]).
    """
    import tensorflow as tf

    context, sequence = tf.io.parse_single_sequence_example(
        serialized,
        context_features={
            IMAGE_ID_KEY: tf.io.FixedLenFeature([], dtype=tf.int64),
            IMAGE_DATA_KEY: tf.io.FixedLenFeature([], dtype=tf.string),
        },
        sequence_features={CAPTION_IDS_KEY: tf.io.FixedLenSequenceFeature([], dtype=tf.int64)},
    )
    return context[IMAGE_ID_KEY], context[IMAGE_DATA_KEY], sequence[CAPTION_IDS_KEY]


def record_schema(vocabulary_id: Optional[str] = None):
    """The records as a tensorflow-metadata Schema: what `schemas/schema.pbtxt` holds, and with a
    `vocabulary_id`, what `data/schema.pbtxt` holds: `image/caption_ids` then has a
    natural_language_domain whose `vocabulary` (the name TFDV's `StatsOptions.vocab_paths` maps
    to a vocabulary file) is that id, the vocabulary its values are word ids of."""
    from tensorflow_metadata.proto.v0 import schema_pb2

    schema = schema_pb2.Schema()
    for name, kind in ((IMAGE_ID_KEY, schema_pb2.INT), (IMAGE_DATA_KEY, schema_pb2.BYTES)):
        feature = schema.feature.add(name=name, type=kind)
        feature.value_count.min = feature.value_count.max = 1
        feature.presence.min_fraction = 1.0
    sequence = schema.feature.add(name=SEQUENCE_COLUMN, type=schema_pb2.STRUCT)
    for name, kind in ((CAPTION_KEY, schema_pb2.BYTES), (CAPTION_IDS_KEY, schema_pb2.INT)):
        feature = sequence.struct_domain.feature.add(name=name, type=kind)
        feature.value_count.min = 2  # at least <S> and </S>
        feature.presence.min_fraction = 1.0
        if name == CAPTION_IDS_KEY and vocabulary_id is not None:
            feature.natural_language_domain.vocabulary = vocabulary_id
    return schema


def record_schema_text(vocabulary_id: Optional[str] = None) -> str:
    """`record_schema(vocabulary_id)` as protobuf text (schema.pbtxt)."""
    from google.protobuf import text_format

    return text_format.MessageToString(record_schema(vocabulary_id))


def schema_vocabulary_id(schema_text: str) -> Optional[str]:
    """The vocabulary id a schema.pbtxt names for `image/caption_ids`; None when it names none
    (`schemas/schema.pbtxt`, or data preprocessed before showtell recorded it)."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    schema = text_format.Parse(schema_text, schema_pb2.Schema())
    for feature in schema.feature:
        for inner in feature.struct_domain.feature:
            if inner.name == CAPTION_IDS_KEY and inner.natural_language_domain.vocabulary:
                return inner.natural_language_domain.vocabulary
    return None
