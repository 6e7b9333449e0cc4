"""The caption vocabulary's analysis: tf.Transform counts the words; the format of the
`word_counts.txt` it becomes is `schemas/vocabulary.py`'s.

`tft.vocabulary(..., store_frequency=True)` writes `count word` lines sorted by descending count
(ties broken its own way). `word_counts.txt` is that file's lines, reordered to im2txt's
`word count`, in the same order, so a word's id is its 0-based line number in both and the ids
in the records (looked up from the same lines) agree with the exported transform graph.
`<UNK>` is id len(vocab): the vocabulary's single out-of-vocabulary bucket.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import apache_beam as beam

from schemas.vocabulary import Vocabulary

TFT_VOCAB_NAME = "word_counts"  # the vocabulary's asset name inside the transform graph
TOKENS_FEATURE = "tokens"  # raw feature the transform graph takes: one caption's tokens
IDS_FEATURE = "caption_ids"  # transformed feature: the tokens' ids


def parse_tft_vocabulary(lines: Iterable[str]) -> Vocabulary:
    """Reads tft.vocabulary's `count word` lines (store_frequency=True) in file order."""
    words, counts = [], []
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        count, _, word = line.partition(" ")
        words.append(word)
        counts.append(int(count))
    return Vocabulary(tuple(words), tuple(counts))


def lookup_counted_vocabulary(tokens, vocabulary_path):
    """Ids of `tokens` (Tensor or SparseTensor) in a `count word` file: the word's line number,
    or len(vocab) (the one out-of-vocabulary bucket) for any other word.

    `tft.apply_vocabulary` alone would read each whole line as the key; the file stores counts.
    """
    import tensorflow as tf

    initializer = tf.lookup.TextFileInitializer(
        vocabulary_path,
        key_dtype=tf.string,
        key_index=1,
        value_dtype=tf.int64,
        value_index=tf.lookup.TextFileIndex.LINE_NUMBER,
        delimiter=" ",
    )
    table = tf.lookup.StaticVocabularyTable(initializer, num_oov_buckets=1)
    if isinstance(tokens, tf.SparseTensor):
        return tf.sparse.map_values(table.lookup, tokens), table.size()
    return table.lookup(tokens), table.size()


def make_preprocessing_fn(min_word_count: int) -> Callable[[dict], dict]:
    """The tf.Transform graph: caption tokens -> ids, vocabulary analysed over training captions."""

    def preprocessing_fn(inputs: dict) -> dict:
        import tensorflow_transform as tft

        tokens = inputs[TOKENS_FEATURE]
        vocab = tft.vocabulary(
            tokens, frequency_threshold=min_word_count, vocab_filename=TFT_VOCAB_NAME, store_frequency=True
        )
        ids = tft.apply_vocabulary(tokens, vocab, num_oov_buckets=1, lookup_fn=lookup_counted_vocabulary)
        return {IDS_FEATURE: ids}

    return preprocessing_fn


def raw_metadata():
    import tensorflow as tf
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    spec = {TOKENS_FEATURE: tf.io.VarLenFeature(tf.string)}
    return dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(spec))


def read_vocabulary_asset(saved_model_dir: str) -> Vocabulary:
    """Reads the vocabulary out of the transform graph (a SavedModel) AnalyzeDataset produced."""
    import tensorflow as tf

    with tf.io.gfile.GFile(os.path.join(saved_model_dir, "assets", TFT_VOCAB_NAME), "r") as handle:
        return parse_tft_vocabulary(handle)


class AnalyzeVocabulary(beam.PTransform):
    """PCollection of token tuples -> (transform_fn, a PCollection holding one Vocabulary).

    transform_fn is tf.Transform's (saved model dir PCollection, metadata) pair.

    Must be applied inside a `tensorflow_transform.beam.Context`.
    """

    def __init__(self, min_word_count: int):
        super().__init__()
        self._min_word_count = min_word_count

    def expand(self, token_lists):
        import tensorflow_transform.beam as tft_beam

        instances = token_lists | "ToInstances" >> beam.Map(lambda tokens: {TOKENS_FEATURE: list(tokens)})
        transform_fn = (instances, raw_metadata()) | "Analyze" >> tft_beam.AnalyzeDataset(
            make_preprocessing_fn(self._min_word_count)
        )
        saved_model_dir, _ = transform_fn
        vocabulary = saved_model_dir | "ReadVocabulary" >> beam.Map(read_vocabulary_asset)
        return transform_fn, vocabulary
