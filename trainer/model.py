"""Show and Tell in Keras 3: an ImageNet encoder, an image embedding, one LSTM and a word
classifier, as im2txt (docs/im2txt.md, "Model").

    model = build_model(config.model, vocab_size=resolve_vocab_size(config.model, word_counts_text))
    logits = model({"images": images, "input_seqs": input_seqs}, training=True)   # [B, T, vocab]

Training calls the model on whole captions (teacher forcing); inference needs only
`initial_state` (the LSTM state after seeing the image) and `step` (one word in, the next
word's logits out), which `call` is built from.

Images go in as float32 [B, H, W, 3] scaled to [-1, 1] (`trainer.inputs.preprocess_image`), for
every encoder: Inception v3 takes that range natively, MobileNetV3 is built without its own
rescaling layer, and EfficientNet (which rescales [0, 255] itself) gets [-1, 1] mapped back to
[0, 255] in front.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import Callable

import fsspec
import keras
import tensorflow as tf
from keras import layers

from schemas.config import Model
from schemas.errors import ShowtellError
from schemas.vocabulary import parse_word_counts

# Encoder name -> (keras.applications constructor, its options for [-1, 1] input, whether it
# rescales [0, 255] input itself and so needs [-1, 1] mapped back in front).
ENCODERS: dict[str, tuple[Callable[..., keras.Model], dict, bool]] = {
    "inception_v3": (keras.applications.InceptionV3, {}, False),
    "mobilenet_v3_small": (keras.applications.MobileNetV3Small, {"include_preprocessing": False}, False),
    "mobilenet_v3_large": (keras.applications.MobileNetV3Large, {"include_preprocessing": False}, False),
    "efficientnet_b0": (keras.applications.EfficientNetB0, {}, True),
}

# `model.encoder_weights` values that are not a URL; keras.applications' `weights` for each.
NAMED_WEIGHTS = {"imagenet": "imagenet", "none": None}


def build_encoder(model_cfg: Model) -> keras.Model:
    """The image encoder: `model_cfg.encoder` without its classifier, global-average pooled,
    taking [B, image_size, image_size, 3] in [-1, 1], with `model_cfg.encoder_weights` loaded:
    `imagenet` (Keras' download), `none` (random), or any fsspec URL of a weights file of the
    keras.applications model (`.weights.h5`, or a legacy `.h5` such as Keras' own ImageNet
    files, mirrored).
    """
    application, options, takes_0_255 = ENCODERS[model_cfg.encoder]
    size = model_cfg.image_size
    images = keras.Input((size, size, 3), name="images")
    # In the application's own graph, not a model around it, so its weight files still fit.
    application_input = layers.Rescaling(127.5, offset=127.5)(images) if takes_0_255 else images
    try:
        encoder = application(
            include_top=False,
            pooling="avg",
            input_shape=(size, size, 3),  # checked against the encoder's minimum size
            input_tensor=application_input,
            weights=NAMED_WEIGHTS.get(model_cfg.encoder_weights),
            **options,
        )
    except ValueError as error:  # e.g. Inception v3 below 75 pixels
        raise ShowtellError(f"model.encoder {model_cfg.encoder} at model.image_size {size}: {error}") from None
    if model_cfg.encoder_weights not in NAMED_WEIGHTS:
        load_encoder_weights(encoder, model_cfg.encoder_weights, model_cfg.encoder)
    if model_cfg.batch_norm_momentum is not None:
        for layer in encoder.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = model_cfg.batch_norm_momentum
    return encoder


def load_encoder_weights(encoder: keras.Model, url: str, encoder_name: str) -> None:
    """Loads a weights file at any fsspec URL into `encoder`, through a local copy (Keras reads
    only local files, and picks the format by the file name, which the copy keeps)."""
    with tempfile.TemporaryDirectory(prefix="showtell-encoder-") as folder:
        local_path = os.path.join(folder, url.rstrip("/").rsplit("/", 1)[-1])
        try:
            with fsspec.open(url, "rb") as source, open(local_path, "wb") as copy:
                shutil.copyfileobj(source, copy)
        except FileNotFoundError:
            raise ShowtellError(f"model.encoder_weights: {url} not found") from None
        except OSError as error:
            raise ShowtellError(f"model.encoder_weights: cannot read {url} ({error})") from None
        # Keras warns once per layer that does not fit before it raises: keep them only on success.
        with warnings.catch_warnings(record=True) as load_warnings:
            warnings.simplefilter("always")
            try:
                encoder.load_weights(local_path)
            except (ValueError, OSError, KeyError) as error:
                raise ShowtellError(
                    f"model.encoder_weights: {url} does not fit the {encoder_name} encoder ({error})"
                ) from None
    for warning in load_warnings:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _uniform(init_scale: float) -> keras.initializers.Initializer:
    # A fresh initializer per weight: Keras draws the same values each time one instance is reused.
    return keras.initializers.RandomUniform(-init_scale, init_scale)


class ShowAndTell(keras.Model):
    """im2txt's captioner. The image embedding is the LSTM's input once, from a zero state,
    before `<S>`; that step's output is discarded and its state starts the caption:

        state  = LSTM(image_embedding(encoder(images)), zero_state)        # initial_state
        output, state = LSTM(word_embedding(word_t), state)                # step, t = 0..T-1
        logits_t = Dense(output)                                           # predicts word t+1

    Dropout (rate 1 - `dropout_keep`) on the LSTM's inputs and outputs when training, as im2txt's
    DropoutWrapper. Every weight outside the encoder starts uniform in [-init_scale, init_scale]
    (biases at zero, the LSTM's forget gate at one: BasicLSTMCell's forget_bias=1.0). The LSTM
    state is a list [h, c], each [N, num_lstm_units]. Logits are float32 under any mixed-precision
    policy.
    """

    def __init__(self, model_cfg: Model, vocab_size: int, name: str = "show_and_tell"):
        super().__init__(name=name)
        self.model_cfg = model_cfg
        self.vocab_size = vocab_size
        scale = model_cfg.init_scale
        dropout_rate = 1.0 - model_cfg.dropout_keep
        self.encoder = build_encoder(model_cfg)
        # No bias, no activation: im2txt's fully_connected(..., activation_fn=None, biases_initializer=None).
        self.image_embedding = layers.Dense(
            model_cfg.embedding_size, use_bias=False, kernel_initializer=_uniform(scale), name="image_embedding"
        )
        self.word_embedding = layers.Embedding(
            vocab_size, model_cfg.embedding_size, embeddings_initializer=_uniform(scale), name="word_embedding"
        )
        self.lstm_cell = layers.LSTMCell(
            model_cfg.num_lstm_units,
            kernel_initializer=_uniform(scale),
            recurrent_initializer=_uniform(scale),
            name="lstm_cell",
        )
        self.lstm = layers.RNN(self.lstm_cell, return_sequences=True, name="lstm")  # the same cell, over time
        self.lstm_input_dropout = layers.Dropout(dropout_rate, name="lstm_input_dropout")
        self.lstm_output_dropout = layers.Dropout(dropout_rate, name="lstm_output_dropout")
        self.logits = layers.Dense(vocab_size, kernel_initializer=_uniform(scale), dtype="float32", name="logits")

    def set_encoder_trainable(self, trainable: bool) -> None:
        """Phase 1 (False): the encoder's weights leave `trainable_variables` and its batch norms
        run in inference mode. Phase 2 (True): everything trains. Retrace any tf.function after."""
        self.encoder.trainable = trainable

    def initial_state(self, images: tf.Tensor, training: bool = False) -> list[tf.Tensor]:
        """The LSTM state [h, c] after the image embedding was fed once from a zero state."""
        features = self.encoder(images, training=training and self.encoder.trainable)
        return self.initial_state_from_features(features, training=training)

    def initial_state_from_features(self, features: tf.Tensor, training: bool = False) -> list[tf.Tensor]:
        """`initial_state` from the encoder's pooled features [N, feature_size] (phase 1's feature
        cache: pipelines/feature_cache.py) instead of images."""
        image_embeddings = self.image_embedding(features)
        zero_state = self.lstm_cell.get_initial_state(batch_size=tf.shape(features)[0])
        _, state = self.lstm_cell(self.lstm_input_dropout(image_embeddings, training=training), zero_state)
        return state

    def step(self, input_words: tf.Tensor, state: list[tf.Tensor]) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """One inference step: word ids [N] and state [h, c] -> (next-word logits [N, vocab], new state)."""
        output, new_state = self.lstm_cell(self._lstm_inputs(input_words, training=False), state)
        return self._word_logits(output, training=False), new_state

    def call(self, inputs: dict, training: bool = False) -> tf.Tensor:
        """{"images": float32 [B, H, W, 3] in [-1, 1], "input_seqs": int [B, T]} -> logits [B, T, vocab].

        With "features" (float32 [B, feature_size], the frozen encoder's, cached) in place of
        "images", the encoder is skipped: phase 1 from the feature cache.
        """
        if "features" in inputs:
            state = self.initial_state_from_features(inputs["features"], training=training)
        else:
            state = self.initial_state(inputs["images"], training=training)
        lstm_inputs = self._lstm_inputs(inputs["input_seqs"], training=training)
        outputs = self.lstm(lstm_inputs, initial_state=state, training=training)
        return self._word_logits(outputs, training=training)

    def _lstm_inputs(self, word_ids: tf.Tensor, training: bool) -> tf.Tensor:
        """Word ids of any shape -> their embeddings, dropped out when training."""
        return self.lstm_input_dropout(self.word_embedding(word_ids), training=training)

    def _word_logits(self, lstm_outputs: tf.Tensor, training: bool) -> tf.Tensor:
        """LSTM outputs [..., units] -> next-word logits [..., vocab], dropped out when training."""
        return self.logits(self.lstm_output_dropout(lstm_outputs, training=training))


def build_model(model_cfg: Model, vocab_size: int) -> ShowAndTell:
    """A ShowAndTell with every variable created (called once on a one-image batch) and the
    encoder's weights loaded. Call it inside `strategy.scope()` for distributed training."""
    model = ShowAndTell(model_cfg, vocab_size)
    size = model_cfg.image_size
    model({"images": tf.zeros([1, size, size, 3]), "input_seqs": tf.zeros([1, 1], tf.int64)})
    return model


def resolve_vocab_size(model_cfg: Model, word_counts_text: str) -> int:
    """`model.vocab_size`, or the words of word_counts.txt plus one for `<UNK>` when it is null.

    A set `model.vocab_size` may leave slack (im2txt: 12,000 for 11,519 words) but no less.
    """
    needed = len(parse_word_counts(word_counts_text).words) + 1
    if model_cfg.vocab_size is None:
        return needed
    if model_cfg.vocab_size < needed:
        raise ShowtellError(
            f"model.vocab_size is {model_cfg.vocab_size} but word_counts.txt needs {needed} "
            f"({needed - 1} words + <UNK>); raise it or set it to null"
        )
    return model_cfg.vocab_size
