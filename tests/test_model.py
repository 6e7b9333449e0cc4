"""trainer/model.py: Show and Tell's layers, its image-first decoding, freezing, and encoder weights.

A small MobileNetV3 at 64 pixels with random weights stands in for Inception v3 (whose ImageNet
weights are a download): the code paths are the same.
"""
from __future__ import annotations

import fsspec
import keras
import numpy as np
import pytest
import tensorflow as tf

from schemas.config import Model
from schemas.errors import ShowtellError
from trainer import model as showtell_model
from trainer.ops import clip_by_global_norm, masked_cross_entropy

VOCAB_SIZE = 40
SMALL = Model(
    encoder="mobilenet_v3_small", image_size=64, encoder_weights="none", embedding_size=32, num_lstm_units=24
)
DECODER_WEIGHTS = 7  # image embedding kernel, word embeddings, LSTM kernel + recurrent + bias, logits kernel + bias


def _batch(seed: int = 0) -> dict:
    images = tf.random.stateless_uniform([3, 64, 64, 3], seed=[seed, 1], minval=-1.0, maxval=1.0)
    input_seqs = tf.constant([[1, 4, 5, 6, 7], [1, 8, 9, 0, 0], [1, 4, 0, 0, 0]], tf.int64)
    return {"images": images, "input_seqs": input_seqs}


@pytest.fixture(scope="module")
def model() -> showtell_model.ShowAndTell:
    """Built once for the tests that do not change it."""
    keras.utils.set_random_seed(0)
    return showtell_model.build_model(SMALL, VOCAB_SIZE)


@pytest.fixture
def fresh_model() -> showtell_model.ShowAndTell:
    """For the tests that freeze, train or otherwise change a model."""
    keras.utils.set_random_seed(1)
    return showtell_model.build_model(SMALL, VOCAB_SIZE)


def _same_arrays(first: list, second: list) -> bool:
    return len(first) == len(second) and all(np.array_equal(a, b) for a, b in zip(first, second))


def test_logits_have_one_row_per_input_word(model):
    logits = model(_batch(), training=False)

    assert logits.shape == (3, 5, VOCAB_SIZE)
    assert logits.dtype == tf.float32


def test_call_is_the_image_step_then_one_step_per_word(model):
    batch = _batch()

    logits = model(batch, training=False).numpy()

    state = model.initial_state(batch["images"])
    unrolled = []
    for t in range(batch["input_seqs"].shape[1]):
        step_logits, state = model.step(batch["input_seqs"][:, t], state)
        unrolled.append(step_logits.numpy())
    np.testing.assert_allclose(logits, np.stack(unrolled, axis=1), atol=1e-5)
    assert [s.shape for s in state] == [(3, SMALL.num_lstm_units)] * 2


@pytest.fixture
def model_without_dropout() -> showtell_model.ShowAndTell:
    keras.utils.set_random_seed(2)
    return showtell_model.build_model(SMALL.model_copy(update={"dropout_keep": 1.0}), VOCAB_SIZE)


def test_the_first_word_is_predicted_from_the_image(model_without_dropout):
    # training=True: random encoder weights give near-zero features with inference-mode batch
    # norms (their moving statistics are 0 and 1); batch statistics give image-dependent ones.
    batch = _batch()
    other_images = dict(batch, images=_batch(seed=5)["images"])

    first = model_without_dropout(batch, training=True)[:, 0].numpy()
    again = model_without_dropout(batch, training=True)[:, 0].numpy()
    with_other_images = model_without_dropout(other_images, training=True)[:, 0].numpy()

    np.testing.assert_allclose(first, again, atol=1e-7)
    assert np.abs(first - with_other_images).max() > 0.01 * np.abs(first).max()


def test_decoder_weights_start_uniform_within_init_scale(model):
    scale = SMALL.init_scale
    matrices = [
        model.image_embedding.kernel,
        model.word_embedding.embeddings,
        model.lstm_cell.kernel,
        model.lstm_cell.recurrent_kernel,
        model.logits.kernel,
    ]

    for matrix in matrices:
        values = matrix.numpy()
        assert np.abs(values).max() <= scale, matrix.path
        assert np.abs(values).max() > 0.9 * scale, matrix.path  # drawn over the whole range
    assert model.image_embedding.bias is None  # im2txt's image embedding has no bias
    np.testing.assert_array_equal(model.logits.bias.numpy(), 0.0)
    units = SMALL.num_lstm_units
    expected_lstm_bias = np.zeros(4 * units)
    expected_lstm_bias[units : 2 * units] = 1.0  # forget gate: BasicLSTMCell's forget_bias=1.0
    np.testing.assert_array_equal(model.lstm_cell.bias.numpy(), expected_lstm_bias)


def _moving_means(encoder: keras.Model) -> list[np.ndarray]:
    return [layer.moving_mean.numpy() for layer in encoder.layers if isinstance(layer, keras.layers.BatchNormalization)]


def test_phase1_freezes_the_encoder_and_its_batch_norms(fresh_model):
    fresh_model.set_encoder_trainable(False)

    assert len(fresh_model.trainable_variables) == DECODER_WEIGHTS
    encoder_ids = {id(v) for v in fresh_model.encoder.variables}
    assert not encoder_ids & {id(v) for v in fresh_model.trainable_variables}
    before = _moving_means(fresh_model.encoder)
    fresh_model(_batch(), training=True)
    assert _same_arrays(before, _moving_means(fresh_model.encoder))


def test_phase2_trains_everything_again(fresh_model):
    fresh_model.set_encoder_trainable(False)
    fresh_model.set_encoder_trainable(True)

    assert len(fresh_model.trainable_variables) == DECODER_WEIGHTS + len(fresh_model.encoder.trainable_variables)
    assert fresh_model.encoder.trainable_variables
    before = _moving_means(fresh_model.encoder)
    fresh_model(_batch(), training=True)
    assert not _same_arrays(before, _moving_means(fresh_model.encoder))


def test_a_short_batch_norm_momentum_lets_inference_features_catch_up_with_training():
    # A randomly initialised encoder trained briefly: with MobileNetV3's own momentum (0.999) the
    # moving statistics stay near their initial values, so inference-mode features are far from
    # training-mode ones (and alike for every image); with a short momentum they converge.
    images = _batch()["images"]
    gaps = {}
    for momentum in (None, 0.5):
        keras.utils.set_random_seed(2)
        encoder = showtell_model.build_encoder(SMALL.model_copy(update={"batch_norm_momentum": momentum}))
        for _ in range(20):
            encoder(images, training=True)
        gap = encoder(images, training=True) - encoder(images, training=False)
        gaps[momentum] = float(tf.reduce_mean(tf.abs(gap)))

    assert gaps[0.5] < gaps[None] / 10, gaps


def test_dropout_acts_only_when_training(fresh_model):
    fresh_model.set_encoder_trainable(False)  # batch norms in inference mode: dropout is the only change
    batch = _batch()

    evaluated = [fresh_model(batch, training=False).numpy() for _ in range(2)]
    trained = [fresh_model(batch, training=True).numpy() for _ in range(2)]

    np.testing.assert_array_equal(evaluated[0], evaluated[1])
    assert not np.allclose(trained[0], trained[1])
    assert not np.allclose(trained[0], evaluated[0])


def test_no_dropout_when_keep_is_one(model_without_dropout):
    model_without_dropout.set_encoder_trainable(False)
    batch = _batch()

    trained = model_without_dropout(batch, training=True).numpy()

    np.testing.assert_allclose(trained, model_without_dropout(batch, training=False).numpy(), atol=1e-6)


def test_a_distributed_train_step_updates_the_decoder_only_in_phase1():
    """The training loop's shape: strategy.run inside a tf.function, the loss summed over real
    words then divided by their all-reduced count. (MultiWorkerMirroredStrategy runs the same
    replica code; it is exercised across processes by the training tests.)"""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = showtell_model.build_model(SMALL, VOCAB_SIZE)
        model.set_encoder_trainable(False)
        optimizer = keras.optimizers.SGD(learning_rate=1.0)
    encoder_before = [w.copy() for w in model.encoder.get_weights()]
    logits_before = model.logits.kernel.numpy().copy()
    batch = _batch()
    targets = tf.concat([batch["input_seqs"][:, 1:], tf.zeros([3, 1], tf.int64)], axis=1)
    mask = tf.cast(targets > 0, tf.int32)

    @tf.function
    def train_step(features, targets, mask):
        def replica_step(features, targets, mask):
            with tf.GradientTape() as tape:
                loss_sum, words = masked_cross_entropy(model(features, training=True), targets, mask)
                loss = loss_sum / tf.distribute.get_replica_context().all_reduce("sum", words)
            grads, _ = clip_by_global_norm(tape.gradient(loss, model.trainable_variables), 5.0)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return strategy.reduce("sum", strategy.run(replica_step, (features, targets, mask)), axis=None)

    losses = [float(train_step(batch, targets, mask)) for _ in range(3)]

    assert losses[-1] < losses[0]
    assert not np.array_equal(model.logits.kernel.numpy(), logits_before)
    assert _same_arrays(encoder_before, model.encoder.get_weights())


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_logits_are_float32_under_mixed_precision(policy):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = showtell_model.build_model(SMALL, VOCAB_SIZE)
        logits = model(_batch(), training=False)
        _, state = model.step(tf.constant([1, 2, 3]), model.initial_state(_batch()["images"]))
    finally:
        keras.mixed_precision.set_global_policy(previous)

    assert model.lstm_cell.compute_dtype == policy.removeprefix("mixed_")
    assert logits.dtype == tf.float32
    assert state[0].dtype == policy.removeprefix("mixed_")


def test_efficientnet_takes_minus_one_to_one_and_feeds_itself_0_to_255(tmp_path):
    encoder = showtell_model.build_encoder(Model(encoder="efficientnet_b0", image_size=32, encoder_weights="none"))
    encoder.save_weights(str(tmp_path / "efficientnet.weights.h5"))
    plain = keras.applications.EfficientNetB0(include_top=False, pooling="avg", input_shape=(32, 32, 3), weights=None)
    plain.load_weights(str(tmp_path / "efficientnet.weights.h5"))  # the application's own weight files fit
    images = tf.random.stateless_uniform([2, 32, 32, 3], seed=[4, 4], minval=-1.0, maxval=1.0)

    np.testing.assert_allclose(encoder(images).numpy(), plain((images + 1.0) * 127.5).numpy(), atol=1e-5)


def test_too_small_an_image_for_the_encoder_is_a_clear_error():
    with pytest.raises(ShowtellError, match=r"model.encoder inception_v3 at model.image_size 32: .*75"):
        showtell_model.build_encoder(Model(encoder="inception_v3", image_size=32, encoder_weights="none"))


@pytest.fixture(scope="module")
def saved_encoder(tmp_path_factory):
    """A random encoder and its weights file."""
    keras.utils.set_random_seed(3)
    encoder = showtell_model.build_encoder(SMALL)
    path = tmp_path_factory.mktemp("weights") / "enc.weights.h5"
    encoder.save_weights(str(path))
    return encoder, path


def test_encoder_weights_load_from_a_file_url(saved_encoder):
    encoder, path = saved_encoder

    loaded = showtell_model.build_encoder(SMALL.model_copy(update={"encoder_weights": f"file://{path}"}))

    assert _same_arrays(encoder.get_weights(), loaded.get_weights())


def test_encoder_weights_load_from_any_fsspec_url(saved_encoder):
    encoder, path = saved_encoder
    url = "memory://showtell-test/enc.weights.h5"
    with fsspec.open(url, "wb") as handle:
        handle.write(path.read_bytes())

    loaded = showtell_model.build_model(SMALL.model_copy(update={"encoder_weights": url}), VOCAB_SIZE)

    assert _same_arrays(encoder.get_weights(), loaded.encoder.get_weights())


def test_a_missing_weights_url_is_a_clear_error(tmp_path):
    url = f"file://{tmp_path}/nowhere.weights.h5"

    with pytest.raises(ShowtellError, match=f"model.encoder_weights: {url} not found"):
        showtell_model.build_encoder(SMALL.model_copy(update={"encoder_weights": url}))


def test_weights_of_another_encoder_are_a_clear_error(saved_encoder):
    _, path = saved_encoder
    large = SMALL.model_copy(update={"encoder": "mobilenet_v3_large", "encoder_weights": str(path)})

    with pytest.raises(ShowtellError, match=f"{path} does not fit the mobilenet_v3_large encoder"):
        showtell_model.build_encoder(large)


def test_vocab_size_is_the_words_plus_unk_unless_set():
    word_counts = "<S> 500\n</S> 500\na 400\nred 120\n"

    assert showtell_model.resolve_vocab_size(SMALL, word_counts) == 5
    assert showtell_model.resolve_vocab_size(SMALL.model_copy(update={"vocab_size": 12_000}), word_counts) == 12_000
    assert showtell_model.resolve_vocab_size(SMALL.model_copy(update={"vocab_size": 5}), word_counts) == 5


def test_a_vocab_size_too_small_for_the_words_is_a_clear_error():
    with pytest.raises(ShowtellError, match=r"model.vocab_size is 4 but word_counts.txt needs 5 \(4 words \+ <UNK>\)"):
        showtell_model.resolve_vocab_size(SMALL.model_copy(update={"vocab_size": 4}), "<S> 5\n</S> 5\na 4\nb 4\n")


def test_whole_model_weights_round_trip_through_a_weights_file(model, tmp_path):
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    keras.utils.set_random_seed(9)
    restored = showtell_model.build_model(SMALL, VOCAB_SIZE)

    restored.load_weights(path)

    np.testing.assert_array_equal(restored(_batch()).numpy(), model(_batch()).numpy())
