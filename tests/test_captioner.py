"""inference/captioner.py and `showtell caption`: a tiny random model published as a real `final/`,
captioning real JPEG and PNG files (tests/captioning.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from inference.captioner import Captioner, load_captioner
from orchestration.cli import main as cli_main
from schemas.errors import ShowtellError
from schemas.layout import CONFIG_FILE, WEIGHTS_FILE
from tests.captioning import MODEL, NUM_WORDS, WORD_COUNTS, assert_same_captions, image, publish_tiny_final
from tests.console import ENGINE_INTERNALS
from tests.run_table import REPO
from trainer.inputs import preprocess_image

UNITS = MODEL["num_lstm_units"]
CAPTION_LINE = re.compile(r"^  (\d)\) (.*) \(p=(\d\.\d{6})\)$")  # im2txt's `  0) a man ... (p=0.040413)`


@pytest.fixture(scope="module")
def final(tmp_path_factory) -> str:
    return publish_tiny_final(tmp_path_factory.mktemp("captioner"))


@pytest.fixture(scope="module")
def captioner(final) -> Captioner:
    return load_captioner(final)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    files = {"jpeg": folder / "photo.jpg", "png": folder / "drawing.png", "text": folder / "notes.jpg"}
    files["jpeg"].write_bytes(image(0))
    files["png"].write_bytes(image(1, "PNG"))
    files["text"].write_text("not a picture\n")
    return files


def test_captioner_is_a_step_model_over_encoded_images(captioner):
    model = captioner.endpoints.owner
    images = [image(0), image(1, "PNG"), image(2)]

    state = captioner.initial_state(images)
    logits, new_state = captioner.step(tf.fill([3], captioner.start_id), state)  # int32 words are cast
    captioner.initial_state(images[:1])  # another batch size: the same trace

    assert captioner.start_id == 1 and captioner.end_id == 2 and captioner.words[0] == "a"
    assert len(captioner.words) == NUM_WORDS and captioner.vocab_size == NUM_WORDS + 1
    assert set(state) == set(new_state) == {"state_h", "state_c"}
    assert state["state_h"].shape == state["state_c"].shape == (3, UNITS)
    assert logits.shape == (3, NUM_WORDS + 1) and logits.dtype == tf.float32
    # In-graph decoding is trainer.inputs.preprocess_image's eval path, JPEG and PNG alike.
    pixels = tf.stack([preprocess_image(tf.constant(b), MODEL["image_size"], training=False) for b in images])
    h, c = model.initial_state(pixels)
    for actual, expected in ((state["state_h"], h), (state["state_c"], c)):  # graph vs eager rounding
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    expected_logits, _ = model.step(tf.fill([3], 1), [h, c])
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-6)
    assert captioner.endpoints.initial_state.experimental_get_tracing_count() == 1
    assert captioner.endpoints.step.experimental_get_tracing_count() == 1


def test_caption_gives_sentences_best_first_whatever_the_batching(captioner):
    images = [image(0), image(1, "PNG"), image(2)]

    one_batch = captioner.caption(images, beam_size=3, max_caption_length=8)
    small_batches = captioner.caption(images, beam_size=3, max_caption_length=8, batch_size=2)

    assert len(one_batch) == 3
    for captions in one_batch:
        assert 1 <= len(captions) <= 3
        probabilities = [p for _, p in captions]
        assert probabilities == sorted(probabilities, reverse=True) and all(0 < p <= 1 for p in probabilities)
        for sentence, _ in captions:
            assert "<S>" not in sentence and "</S>" not in sentence and len(sentence.split()) <= 8
    assert one_batch[0][0][0]  # the tiny model's best caption has words
    assert_same_captions(small_batches, one_batch)


def test_caption_each_gives_every_decodable_image_its_captions_and_each_other_its_reason(captioner):
    good = [image(0), image(1, "PNG"), image(2)]
    mixed = [good[0], b"not a picture", good[1], b"\xff\xd8\xff broken", good[2]]

    results = captioner.caption_each(mixed, beam_size=2, max_caption_length=6)

    expected = captioner.caption(good, beam_size=2, max_caption_length=6)
    assert_same_captions([results[0], results[2], results[4]], expected)
    assert [str(results[i]).startswith("not an image that can be decoded (") for i in (1, 3)] == [True, True]
    assert_same_captions(captioner.caption_each(good, beam_size=2, max_caption_length=6), expected)


def test_sentence_leaves_out_start_and_end_and_names_unknown_ids(captioner):
    assert captioner.sentence([captioner.start_id, 3, 5, NUM_WORDS, NUM_WORDS + 4, captioner.end_id]) == (
        "red circle <UNK> <UNK>"
    )
    assert captioner.sentence(np.array([9, 0], np.int64)) == ". a"


def test_a_vocabulary_without_start_and_end_words_is_refused(captioner):
    with pytest.raises(ShowtellError, match=r"no <S> or </S> line"):
        Captioner.from_model(captioner.endpoints.owner, "a 3\nred 2\n")
    with pytest.raises(ShowtellError, match=r"12 words \+ <UNK> but the model has only 11 ids"):
        Captioner.from_model(captioner.endpoints.owner, WORD_COUNTS + "big 1\nsmall 1\n")


def test_load_captioner_names_the_path_of_a_missing_strange_incomplete_or_corrupt_checkpoint(final, tmp_path):
    strange = tmp_path / "strange"
    strange.mkdir()
    (strange / "notes.txt").write_text("hello")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    shutil.copy(Path(final) / CONFIG_FILE, incomplete)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(final, corrupt)
    (corrupt / WEIGHTS_FILE).write_bytes(b"\x89HDF\r\n not really")

    cases = {
        tmp_path / "missing": "not found",
        strange: "neither a published final/ checkpoint",
        incomplete: "incomplete final/ checkpoint, no model.weights.h5, word_counts.txt, state.json",
        corrupt: "cannot load this final/ checkpoint",
    }
    for path, why in cases.items():
        with pytest.raises(ShowtellError) as raised:
            load_captioner(str(path))
        assert str(raised.value).startswith(f"{path}: {why}")
        assert "\n" not in str(raised.value)


def test_caption_cli_prints_im2txt_text(final, image_files, capsys):
    jpeg, png = str(image_files["jpeg"]), str(image_files["png"])

    code = cli_main(["-q", "caption", "--checkpoint", final, "--beam-size", "2", jpeg, png])

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == f"Captions for image {jpeg}:" and out[3] == f"Captions for image {png}:"
    for line, rank in zip(out[1:3] + out[4:6], (0, 1, 0, 1)):
        match = CAPTION_LINE.match(line)
        assert match and int(match[1]) == rank, line
    assert len(out) == 6


def test_caption_cli_prints_captions_and_showtells_lines_only_keeping_tensorflows_in_a_log(
    final, image_files, tmp_path
):
    command = [sys.executable, "-m", "orchestration.cli", "caption", "--checkpoint", final, str(image_files["jpeg"])]
    env = {**os.environ, "TMPDIR": str(tmp_path)}

    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)

    assert done.stdout.splitlines()[0] == f"Captions for image {image_files['jpeg']}:"
    loading, *others, shown = done.stderr.splitlines()
    assert " INFO showtell.caption: loading the final/ checkpoint at " in loading and others == []
    assert re.fullmatch(r"\S+ \S+ caption: 1/1 images \(100%\), .* elapsed, 00:00 left", shown)  # the display
    assert ENGINE_INTERNALS.search((tmp_path / "showtell" / "caption.log").read_text())


def test_caption_cli_reports_each_bad_file_and_still_captions_the_good_ones(final, image_files, tmp_path, capsys):
    missing, folder = tmp_path / "missing.jpg", tmp_path
    paths = [str(image_files["jpeg"]), str(image_files["text"]), str(missing), str(folder), str(image_files["png"])]

    code = cli_main(["-q", "caption", "--checkpoint", final, "--json", "--max-caption-length", "6", *paths])

    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert code == 1
    assert document["checkpoint"] == final and [entry["path"] for entry in document["images"]] == paths
    good, text, absent, directory, png = document["images"]
    for entry in (good, png):
        assert "error" not in entry and 1 <= len(entry["captions"]) <= 3
        assert all(set(c) == {"sentence", "p"} and 0 < c["p"] <= 1 for c in entry["captions"])
    assert text["error"].startswith("not an image that can be decoded") and "captions" not in text
    assert absent["error"] == "not found" and directory["error"] == "a folder, not an image file"
    errors = [line for line in captured.err.splitlines() if line.startswith("showtell caption: error:")]
    assert errors == [f"showtell caption: error: {e['path']}: {e['error']}" for e in (text, absent, directory)]


def test_caption_cli_rejects_a_folder_that_is_no_checkpoint_in_one_line(image_files, tmp_path, capsys):
    (tmp_path / "readme.txt").write_text("no model here")

    code = cli_main(["-q", "caption", "--checkpoint", str(tmp_path), str(image_files["jpeg"])])

    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.strip().splitlines() == [
        f"showtell caption: error: {tmp_path}: neither a published final/ checkpoint "
        "(model.weights.h5, config.yaml, word_counts.txt, state.json) nor a SavedModel from `showtell export`"
    ]


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--beam-size", "0"], "--beam-size (eval.beam_size): Input should be greater than 0 (got 0)"),
        (
            ["--length-normalization", "inf"],
            "--length-normalization (eval.length_normalization): Input should be a finite number (got inf)",
        ),
    ],
)
def test_caption_cli_checks_its_settings_as_the_eval_keys_they_mirror_before_loading_anything(
    flags, problem, tmp_path, capsys
):
    code = cli_main(["-q", "caption", "--checkpoint", str(tmp_path / "missing"), *flags, str(tmp_path / "a.jpg")])

    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.strip().splitlines() == [f"showtell caption: error: {problem}"]
