"""Warm start across vocabularies (trainer/warm_start.py): before its first step, a warm-started
model predicts the words both vocabularies share exactly as the model it started from."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from schemas.config import Model
from schemas.errors import ShowtellError
from schemas.vocabulary import parse_word_counts
from tests.captioning import MODEL, WORD_COUNTS, publish_tiny_final
from trainer import checkpoints as ckpt
from trainer.warm_start import read_initial_model, vocabulary_remap, warm_start_weights

# The old vocabulary's words in another order and with two new ones (nothing dropped) ...
GROWN = "a 150\n<S> 60\n</S> 60\nblue 45\nred 41\ngreen 40\ncircle 30\nsquare 28\non 25\ntriangle 22\nwhite 20\n. 18\n"
# ... and with two dropped (white, square) and one new (green).
SHIFTED = "a 150\n<S> 60\n</S> 60\nred 41\ngreen 40\nblue 35\ncircle 30\non 25\n. 18\n"
CAPTION = "<S> a red circle on a blue circle . </S>".split()  # words of both vocabularies


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """A tiny random published final/ (vocabulary WORD_COUNTS), as the model a night starts from."""
    final = publish_tiny_final(tmp_path_factory.mktemp("old"))
    return read_initial_model(final)


def _warm_model(initial, word_counts: str, **model_settings):
    model = ckpt.build_inference_model(Model(**{**MODEL, **model_settings}), word_counts)
    remap = warm_start_weights(initial, model, parse_word_counts(word_counts))
    return model, remap


def _log_probs(model, word_counts: str) -> np.ndarray:
    """log p(next word) at each position of CAPTION: [len(CAPTION), vocab_size]."""
    ids = parse_word_counts(word_counts).ids(CAPTION)
    images = tf.random.stateless_uniform([1, 32, 32, 3], seed=[1, 2], minval=-1.0, maxval=1.0)
    logits = model({"images": images, "input_seqs": tf.constant([ids], tf.int64)}, training=False)
    return tf.nn.log_softmax(logits).numpy()[0]


def _old_model(initial):
    model = ckpt.build_inference_model(initial.model_cfg, WORD_COUNTS)
    for variable in model.weights:
        variable.assign(initial.weights[variable.path])
    return model


def _by_word(log_probs: np.ndarray, word_counts: str, words: list[str]) -> np.ndarray:
    return log_probs[:, parse_word_counts(word_counts).ids(words)]


def test_remap_keeps_shared_words_rows_gives_new_words_unks_and_drops_the_rest():
    old = parse_word_counts("a 3\n<S> 2\n</S> 2\ndog 1\n")
    new = parse_word_counts("a 4\n<S> 2\n</S> 2\ncat 1\n")
    remap = vocabulary_remap(old, new, old_size=5, new_size=5)
    assert remap.rows == (0, 1, 2, 4, 4) and remap.added_ids == (3, 4)
    assert remap.summary() == {"kept": 3, "added": 1, "dropped": 1}


def test_slack_ids_take_old_slack_rows_where_there_are_some_and_none_past_them():
    old = parse_word_counts("a 3\n<S> 2\n</S> 2\n")
    new = parse_word_counts("a 3\n<S> 2\n</S> 2\ncat 1\n")
    assert vocabulary_remap(old, new, old_size=6, new_size=8).rows == (0, 1, 2, 3, 3, 4, 5, None)


def test_with_no_word_dropped_shared_words_log_probabilities_equal_the_old_models(old):
    new_model, remap = _warm_model(old, GROWN)
    assert remap.summary() == {"kept": 10, "added": 2, "dropped": 0}
    old_lp, new_lp = _log_probs(_old_model(old), WORD_COUNTS), _log_probs(new_model, GROWN)
    shared = parse_word_counts(WORD_COUNTS).words
    np.testing.assert_allclose(_by_word(new_lp, GROWN, shared), _by_word(old_lp, WORD_COUNTS, shared), atol=1e-5)
    # <UNK> and the two new words share the probability the old model gave <UNK>.
    unk_mass = np.logaddexp.reduce(new_lp[:, list(remap.added_ids)], axis=1)
    np.testing.assert_allclose(unk_mass, old_lp[:, len(shared)], atol=1e-5)


def test_with_words_dropped_shared_words_log_probabilities_are_the_old_ones_renormalised(old):
    new_model, remap = _warm_model(old, SHIFTED)
    assert remap.summary() == {"kept": 8, "added": 1, "dropped": 2}
    old_lp, new_lp = _log_probs(_old_model(old), WORD_COUNTS), _log_probs(new_model, SHIFTED)
    dropped = np.logaddexp.reduce(_by_word(old_lp, WORD_COUNTS, ["white", "square"]), axis=1)
    kept = [w for w in parse_word_counts(SHIFTED).words if w != "green"]
    expected = _by_word(old_lp, WORD_COUNTS, kept) - np.log1p(-np.exp(dropped))[:, None]
    np.testing.assert_allclose(_by_word(new_lp, SHIFTED, kept), expected, atol=1e-5)


def test_slack_ids_of_a_larger_vocab_size_take_no_probability(old):
    new_model, _ = _warm_model(old, GROWN, vocab_size=20)
    old_lp, new_lp = _log_probs(_old_model(old), WORD_COUNTS), _log_probs(new_model, GROWN)
    shared = parse_word_counts(WORD_COUNTS).words
    np.testing.assert_allclose(_by_word(new_lp, GROWN, shared), _by_word(old_lp, WORD_COUNTS, shared), atol=1e-5)
    assert np.exp(new_lp[:, 13:]).max() == 0.0


def test_a_model_of_other_settings_cannot_start_this_one_and_the_error_names_them(old):
    with pytest.raises(ShowtellError, match=r"model.num_lstm_units 16, here 8"):
        _warm_model(old, GROWN, num_lstm_units=8)


def test_an_export_starts_a_model_with_the_same_weights_as_its_final_checkpoint(old, tmp_path):
    from inference.export import export_saved_model

    exported = read_initial_model(export_saved_model(old.url, str(tmp_path / "export")))

    assert exported.vocabulary == old.vocabulary and exported.vocab_size == old.vocab_size
    assert exported.weights.keys() == old.weights.keys()
    assert all(np.array_equal(exported.weights[path], value) for path, value in old.weights.items())


def test_what_is_neither_a_final_nor_an_export_is_a_clear_error(tmp_path):
    with pytest.raises(ShowtellError, match=r"neither a final/ checkpoint .* nor a `showtell export` folder"):
        read_initial_model(str(tmp_path))
