"""The export's `caption` signature (inference/caption_signature.py): the whole beam search in one
graph call, checked against the Python beam search over the same export's `step` signature (on
the tiny model at several settings, and on the demo's trained model over 64 images), from
TensorFlow's own `saved_model_cli`, and through `showtell caption`."""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from inference.beam_search import Caption, beam_search
from inference.caption_signature import NO_WORD, Search
from inference.captioner import Captioner, load_captioner
from inference.export import export_saved_model
from orchestration.cli import main as cli_main
from tests.captioning import image, publish_tiny_final

IMAGES = [image(seed, "PNG" if seed % 3 == 0 else "JPEG") for seed in range(12)]
SCORE_TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # the same float32 ops, traced into one graph or run one by one


@pytest.fixture(scope="module")
def final(tmp_path_factory) -> str:
    return publish_tiny_final(tmp_path_factory.mktemp("caption_signature"))


def export(final: str, folder: Path, search: Search) -> tuple[str, Captioner]:
    out = export_saved_model(final, str(folder / "export"), search)
    return out, load_captioner(out)


def graph_outputs(export_dir: str, images: list[bytes]) -> dict[str, np.ndarray]:
    """The `caption` signature's outputs, called as TF Serving would: by signature name."""
    outputs = tf.saved_model.load(export_dir).signatures["caption"](images=tf.constant(images, tf.string))
    return {name: tensor.numpy() for name, tensor in outputs.items()}


def assert_graph_equals_python(outputs: dict[str, np.ndarray], python: list[list[Caption]], captioner: Captioner):
    """Image by image, slot by slot: the same words (and sentence), the same scores to float
    tolerance, the same finished flag; slots past the Python search's captions are empty."""
    beam_size = outputs["log_probs"].shape[1]
    assert len(outputs["captions"]) == len(python)
    for image_index, captions in enumerate(python):
        assert bool(outputs["finished"][image_index]) == captions[0].finished, image_index
        for slot in range(beam_size):
            word_ids = outputs["word_ids"][image_index, slot]
            if slot >= len(captions):
                assert outputs["log_probs"][image_index, slot] == -np.inf
                assert outputs["captions"][image_index, slot] == b"" and set(word_ids) == {NO_WORD}
                continue
            caption = captions[slot]
            length = len(caption.word_ids)
            assert tuple(word_ids[:length]) == caption.word_ids, (image_index, slot)
            assert set(word_ids[length:]) <= {NO_WORD}
            assert outputs["captions"][image_index, slot].decode() == captioner.sentence(caption.word_ids)
            np.testing.assert_allclose(outputs["log_probs"][image_index, slot], caption.log_prob, **SCORE_TOLERANCE)
            np.testing.assert_allclose(outputs["scores"][image_index, slot], caption.score, **SCORE_TOLERANCE)


@pytest.mark.parametrize(
    "search",
    [Search(3, 20, 0.0), Search(1, 6, 0.0), Search(4, 3, 0.0), Search(5, 12, 0.7)],
    ids=lambda s: f"beam{s.beam_size}-len{s.max_caption_length}-norm{s.length_normalization}",
)
def test_the_caption_signature_returns_the_python_beam_searchs_words_and_scores(final, tmp_path, search):
    export_dir, captioner = export(final, tmp_path, search)

    outputs = graph_outputs(export_dir, IMAGES)
    python = beam_search(
        captioner,  # over the same export's initial_state and step signatures, one call per decoding step
        tf.constant(IMAGES),
        start_id=captioner.start_id,
        end_id=captioner.end_id,
        **dataclasses.asdict(search),
    )

    assert outputs["captions"].shape == (len(IMAGES), search.beam_size)
    assert outputs["word_ids"].shape == (len(IMAGES), search.beam_size, search.max_caption_length)
    assert_graph_equals_python(outputs, python, captioner)


def test_no_images_give_empty_outputs_of_the_signatures_shapes(final, tmp_path):
    export_dir, _ = export(final, tmp_path, Search(2, 5, 0.0))

    outputs = graph_outputs(export_dir, [])

    assert outputs["captions"].shape == (0, 2) and outputs["word_ids"].shape == (0, 2, 5)
    assert outputs["log_probs"].shape == (0, 2) and outputs["finished"].shape == (0,)


def test_saved_model_cli_runs_the_caption_signature(final, tmp_path):
    export_dir, captioner = export(final, tmp_path, Search(3, 20, 0.0))
    images = np.array(IMAGES[:4], dtype=object)  # TensorFlow's own CLI reads inputs from a .npy
    np.save(tmp_path / "images.npy", images, allow_pickle=True)
    outdir = tmp_path / "outputs"
    command = [
        str(Path(sys.executable).parent / "saved_model_cli"),  # installed with TensorFlow
        "run",
        "--dir",
        export_dir,
        "--tag_set",
        "serve",
        "--signature_def",
        "caption",
        "--inputs",
        f"images={tmp_path / 'images.npy'}",
        "--outdir",
        str(outdir),
    ]

    subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})

    sentences = np.load(outdir / "captions.npy", allow_pickle=True)
    log_probs = np.load(outdir / "log_probs.npy")
    expected = captioner.caption(IMAGES[:4], beam_size=3, max_caption_length=20)
    assert [[s.decode() for s in row] for row in sentences] == [[s for s, _ in row] for row in expected]
    np.testing.assert_allclose(np.exp(log_probs), [[p for _, p in row] for row in expected], rtol=1e-4)


def test_caption_cli_defaults_to_the_exports_settings_and_says_when_others_bypass_its_signature(
    final, tmp_path, capsys, caplog
):
    export_dir, _ = export(final, tmp_path, Search(2, 8, 0.0))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(IMAGES[1])

    with caplog.at_level(logging.INFO, logger="showtell.caption"):
        assert cli_main(["-q", "caption", "--checkpoint", export_dir, str(photo)]) == 0
        by_signature = capsys.readouterr().out
        assert cli_main(["-q", "caption", "--checkpoint", export_dir, "--beam-size", "3", str(photo)]) == 0
        by_python = capsys.readouterr().out

    assert by_signature.count(" (p=") == 2 and by_python.count(" (p=") == 3  # "  0) circle . (p=0.028435)"
    assert [record.getMessage() for record in caplog.records if "signature" in record.getMessage()] == [
        "the export's caption signature has beam_size 2, max_caption_length 8, length_normalization 0.0; "
        "searching with beam_size 3, max_caption_length 8, length_normalization 0.0 over its step signature "
        "instead (slower)"
    ]


@pytest.mark.slow
def test_on_the_demos_model_the_signature_captions_64_images_as_the_python_beam_search(demo_run, tmp_path):
    final = str(demo_run.run_root / "train" / "phase2" / "final")
    export_dir, captioner = export(final, tmp_path, Search.of(demo_run.config.eval))
    with zipfile.ZipFile(next((demo_run.run_root / "raw").rglob("val2014.zip"))) as archive:
        names = sorted(name for name in archive.namelist() if name.endswith(".jpg"))[:64]
        images = [archive.read(name) for name in names]
    assert len(images) == 64

    outputs = graph_outputs(export_dir, images)
    python = beam_search(
        captioner,
        tf.constant(images),
        start_id=captioner.start_id,
        end_id=captioner.end_id,
        **dataclasses.asdict(Search.of(demo_run.config.eval)),
    )

    assert_graph_equals_python(outputs, python, captioner)
    assert len({row[0] for row in outputs["captions"]}) > 1  # a trained model: not one caption for every image
