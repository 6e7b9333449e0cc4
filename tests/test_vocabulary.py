"""pipelines/vocabulary.py and schemas/vocabulary.py: tf.Transform's `count word` file, im2txt's
`word count` file, and the TensorFlow lookup the transform graph uses, which must agree with
`Vocabulary.ids`."""

from __future__ import annotations

import pytest
import tensorflow as tf

from pipelines.vocabulary import lookup_counted_vocabulary, parse_tft_vocabulary
from schemas.vocabulary import Vocabulary, parse_word_counts, vocabulary_id

TFT_LINES = ["9 a\n", "7 <S>\n", "7 </S>\n", "5 dog\n", "4 café\n", "4 .\n", "4 n't\n"]
VOCAB = Vocabulary(("a", "<S>", "</S>", "dog", "café", ".", "n't"), (9, 7, 7, 5, 4, 4, 4))


def test_parse_tft_vocabulary_reads_count_word_lines_in_file_order():
    assert parse_tft_vocabulary(TFT_LINES) == VOCAB


def test_parse_tft_vocabulary_keeps_file_order_even_when_not_sorted():
    vocabulary = parse_tft_vocabulary(["1 zebra\n", "3 apple\n", "2 mango"])

    assert vocabulary.words == ("zebra", "apple", "mango")
    assert vocabulary.counts == (1, 3, 2)


def test_parse_tft_vocabulary_skips_blank_lines():
    assert parse_tft_vocabulary(["\n", "2 a\n", "\n"]) == Vocabulary(("a",), (2,))


def test_word_counts_is_im2txts_word_count_format():
    assert VOCAB.to_word_counts() == "a 9\n<S> 7\n</S> 7\ndog 5\ncafé 4\n. 4\nn't 4\n"


def test_word_counts_round_trip():
    assert parse_word_counts(VOCAB.to_word_counts()) == VOCAB


def test_word_counts_of_an_empty_vocabulary_is_empty_and_round_trips():
    empty = Vocabulary((), ())

    assert empty.to_word_counts() == ""
    assert parse_word_counts("") == empty
    assert empty.ids(["a"]) == [0]


def test_vocabulary_id_depends_on_the_words_in_order_and_not_on_the_counts():
    vocabulary = parse_word_counts("a 9\n<S> 7\n</S> 7\ndog 5\n")
    recounted = parse_word_counts("a 90\n<S> 70\n</S> 70\ndog 50\n")
    reordered = parse_word_counts("<S> 9\na 7\n</S> 7\ndog 5\n")
    grown = parse_word_counts("a 9\n<S> 7\n</S> 7\ndog 5\ncat 4\n")
    assert vocabulary.id == recounted.id == vocabulary_id(["a", "<S>", "</S>", "dog"])
    assert len({vocabulary.id, reordered.id, grown.id}) == 3
    assert len(vocabulary.id) == 16 and int(vocabulary.id, 16) >= 0


def test_ids_are_line_numbers_and_unknown_words_get_len_vocab():
    assert VOCAB.unknown_id == 7
    assert VOCAB.ids(["<S>", "a", "dog", "zebra", "café", "cafe", "</S>", "", "A"]) == [1, 0, 3, 7, 4, 7, 2, 7, 7]


def _write_tft_file(tmp_path) -> str:
    path = tmp_path / "word_counts"
    path.write_text("".join(TFT_LINES), encoding="utf-8")
    return str(path)


SENTENCES = [
    ["<S>", "a", "dog", "</S>"],
    ["<S>", "a", "café", "zebra", "n't", "."],
    ["<S>", "unknown", "</S>"],
]


def test_tensorflow_lookup_on_a_dense_tensor_matches_vocabulary_ids(tmp_path):
    width = max(len(s) for s in SENTENCES)
    padded = [s + ["dog"] * (width - len(s)) for s in SENTENCES]

    ids, size = lookup_counted_vocabulary(tf.constant(padded), _write_tft_file(tmp_path))

    assert ids.numpy().tolist() == [VOCAB.ids(s) for s in padded]
    assert int(size) == len(VOCAB.words) + 1  # the words plus the one out-of-vocabulary bucket


def test_tensorflow_lookup_on_a_sparse_tensor_matches_vocabulary_ids(tmp_path):
    tokens = tf.ragged.constant(SENTENCES).to_sparse()

    ids, _ = lookup_counted_vocabulary(tokens, _write_tft_file(tmp_path))

    assert isinstance(ids, tf.SparseTensor)
    assert ids.indices.numpy().tolist() == tokens.indices.numpy().tolist()
    assert tf.RaggedTensor.from_sparse(ids).to_list() == [VOCAB.ids(s) for s in SENTENCES]


@pytest.mark.parametrize("word", ["zebra", "<UNK>", "", "DOG"])
def test_tensorflow_lookup_sends_every_unknown_word_to_len_vocab(tmp_path, word):
    ids, _ = lookup_counted_vocabulary(tf.constant([word]), _write_tft_file(tmp_path))

    assert ids.numpy().tolist() == [VOCAB.unknown_id]
