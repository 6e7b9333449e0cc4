"""The feature cache's record format, defined once for its writer (pipelines/feature_cache.py)
and phase 1's reader (trainer/inputs.py's `make_feature_dataset`).

One `tf.train.Example` per image, holding its encoder features and every caption it has:

    image/image_id        int64    the MSCOCO image id
    image/features        bytes    float32 [views, feature_size], row-major (view 0: the central crop)
    image/views           int64    views
    image/caption_ids     int64    the captions' ids, one after another: [1, 4, 230, 2, 1, 4, 17, 2]
    image/caption_lengths int64    each caption's length, <S> and </S> included: [4, 4]

Shards are named like the data's (`train-00000-of-00256`), one per data shard.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

IMAGE_ID_KEY = "image/image_id"
FEATURES_KEY = "image/features"
VIEWS_KEY = "image/views"
CAPTION_IDS_KEY = "image/caption_ids"
CAPTION_LENGTHS_KEY = "image/caption_lengths"
# float32, as computed: float16 would halve the cache, but flushes the tiny features of an untrained
# encoder (1e-10 for a random MobileNet) to zero.
FEATURE_DTYPE = np.float32


def encode_feature_example(image_id: int, features: np.ndarray, captions: Sequence[Sequence[int]]) -> bytes:
    """Serialises one image: `features` [views, feature_size], and its captions' ids."""
    from tensorflow.core.example import example_pb2, feature_pb2

    if features.ndim != 2:
        raise ValueError(f"image {image_id}: features must be [views, feature_size], got shape {features.shape}")

    def ints(values: Sequence[int]) -> feature_pb2.Feature:
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[int(v) for v in values]))

    feature = {
        IMAGE_ID_KEY: ints([image_id]),
        FEATURES_KEY: feature_pb2.Feature(
            bytes_list=feature_pb2.BytesList(value=[np.ascontiguousarray(features, FEATURE_DTYPE).tobytes()])
        ),
        VIEWS_KEY: ints([features.shape[0]]),
        CAPTION_IDS_KEY: ints([word for caption in captions for word in caption]),
        CAPTION_LENGTHS_KEY: ints([len(caption) for caption in captions]),
    }
    return example_pb2.Example(features=feature_pb2.Features(feature=feature)).SerializeToString(deterministic=True)


def parse_feature_example(serialized, feature_size: int):
    """TensorFlow parse of one serialized record (a scalar string tensor), for tf.data pipelines:
    (image_id int64 [], features float32 [views, feature_size], captions int64 ragged [captions, None])."""
    import tensorflow as tf

    parsed = tf.io.parse_single_example(
        serialized,
        {
            IMAGE_ID_KEY: tf.io.FixedLenFeature([], tf.int64),
            FEATURES_KEY: tf.io.FixedLenFeature([], tf.string),
            VIEWS_KEY: tf.io.FixedLenFeature([], tf.int64),
            CAPTION_IDS_KEY: tf.io.VarLenFeature(tf.int64),
            CAPTION_LENGTHS_KEY: tf.io.VarLenFeature(tf.int64),
        },
    )
    features = tf.reshape(tf.io.decode_raw(parsed[FEATURES_KEY], tf.float32), [parsed[VIEWS_KEY], feature_size])
    captions = tf.RaggedTensor.from_row_lengths(
        tf.sparse.to_dense(parsed[CAPTION_IDS_KEY]), tf.sparse.to_dense(parsed[CAPTION_LENGTHS_KEY])
    )
    return parsed[IMAGE_ID_KEY], features, captions


def decode_feature_example(serialized: bytes) -> dict:
    """Plain-Python view of one record: {"image_id", "features" (float32 [views, D]), "captions"}."""
    from tensorflow.core.example import example_pb2

    feature = example_pb2.Example.FromString(serialized).features.feature
    views = feature[VIEWS_KEY].int64_list.value[0]
    features = np.frombuffer(feature[FEATURES_KEY].bytes_list.value[0], FEATURE_DTYPE)
    ids = list(feature[CAPTION_IDS_KEY].int64_list.value)
    captions, start = [], 0
    for length in feature[CAPTION_LENGTHS_KEY].int64_list.value:
        captions.append(ids[start : start + length])
        start += length
    image_id = feature[IMAGE_ID_KEY].int64_list.value[0]
    return {"image_id": image_id, "features": features.reshape(views, -1), "captions": captions}
