"""A tiny published `final/` checkpoint and real image files, shared by the captioning and export
tests. The model is random (MobileNetV3-Small at 32 px, 16 units) with wide initial weights, so
its next-word distributions are peaked and its beams are far from ties."""
from __future__ import annotations

import tempfile
from pathlib import Path

import keras
import numpy as np

from schemas.config import build_config, join_url
from schemas.vocabulary import WORD_COUNTS_FILE
from tests.datasets import encode, picture
from trainer import checkpoints as ckpt
from trainer.model import build_model, resolve_vocab_size

MODEL = {
    "encoder": "mobilenet_v3_small",
    "image_size": 32,
    "encoder_weights": "none",
    "embedding_size": 16,
    "num_lstm_units": 16,
    "init_scale": 2.0,
}
# im2txt's word_counts.txt: `word count` lines by descending count, <S> and </S> counted as words.
WORD_COUNTS = "a 120\n<S> 50\n</S> 50\nred 40\nblue 35\ncircle 30\nsquare 28\non 25\nwhite 20\n. 18\n"
NUM_WORDS = 10  # <UNK> is id 10; the model's vocab_size is 11


def publish_tiny_final(root: Path, word_counts_text: str = WORD_COUNTS) -> str:
    """Builds the tiny model over the vocabulary `word_counts_text` (a word_counts.txt's text) and
    publishes it under `root` with checkpoints.py's own writers, as training does; returns the URL
    of its `final/`."""
    keras.utils.set_random_seed(2)  # a seed whose best captions have words
    config = build_config({"run_root": str(root), "model": MODEL})
    word_counts = root / WORD_COUNTS_FILE
    word_counts.write_text(word_counts_text, encoding="utf-8")
    model = build_model(config.model, resolve_vocab_size(config.model, word_counts_text))
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        state = {"phase": 1, "step": 7, "fingerprint": ckpt.weights_fingerprint(model)}
        ckpt.save_checkpoint(checkpoint_dir, model, keras.optimizers.SGD(), state)
        phase_dir = join_url(str(root), "train", ckpt.phase_name(1))
        return ckpt.publish_final(checkpoint_dir, phase_dir, config.model_dump(mode="json"), str(word_counts))


def export_tiny(root: Path) -> str:
    """The tiny model published under `root` and exported (with its `caption` signature at eval's
    default settings) to `root/export`; returns the export's folder."""
    from inference.export import export_saved_model

    return export_saved_model(publish_tiny_final(root), str(root / "export"))


def image(seed: int, fmt: str = "JPEG", size: int = 48) -> bytes:
    """A real encoded picture (a red square on near-white, with noise that differs by seed)."""
    return encode(picture(size, seed), fmt)


def assert_same_captions(actual: list, expected: list) -> None:
    """Captioner.caption results: the same sentences in the same order, the same probabilities."""
    assert [[s for s, _ in c] for c in actual] == [[s for s, _ in c] for c in expected]
    np.testing.assert_allclose([[p for _, p in c] for c in actual], [[p for _, p in c] for c in expected], rtol=1e-6)
