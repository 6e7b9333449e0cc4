"""inference/export.py and `showtell export`: the tiny published `final/` (tests/captioning.py) as a
SavedModel, loaded by plain TensorFlow and by showtell, captioning exactly as its checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from inference.captioner import Captioner, load_captioner
from inference.export import export_saved_model
from orchestration.cli import main as cli_main
from schemas.config import Model
from schemas.errors import ShowtellError
from schemas.layout import EXPORT_METADATA_FILE
from schemas.storage import remove
from schemas.vocabulary import WORD_COUNTS_FILE, parse_word_counts
from tests.captioning import MODEL, NUM_WORDS, WORD_COUNTS, assert_same_captions, image, publish_tiny_final

UNITS = MODEL["num_lstm_units"]
IMAGES = [image(0), image(1, "PNG"), image(2)]


@pytest.fixture(scope="module")
def final(tmp_path_factory) -> str:
    return publish_tiny_final(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def exported(final) -> str:
    return export_saved_model(final, str(Path(final).parent.parent / "saved_model"))


@pytest.fixture(scope="module")
def from_checkpoint(final) -> Captioner:
    return load_captioner(final)


@pytest.fixture(scope="module")
def checkpoint_captions(from_checkpoint) -> list:
    return from_checkpoint.caption(IMAGES, beam_size=3, max_caption_length=8)


def test_the_export_captions_exactly_as_its_checkpoint(from_checkpoint, exported, checkpoint_captions):
    from_export = load_captioner(exported)

    assert_same_captions(from_export.caption(IMAGES, beam_size=3, max_caption_length=8), checkpoint_captions)
    assert (from_export.words, from_export.start_id, from_export.end_id) == (
        from_checkpoint.words,
        from_checkpoint.start_id,
        from_checkpoint.end_id,
    )
    assert (from_export.image_size, from_export.vocab_size) == (MODEL["image_size"], NUM_WORDS + 1)
    state, expected_state = from_export.initial_state(IMAGES), from_checkpoint.initial_state(IMAGES)
    words = tf.constant([3, 4, 5])
    logits, _ = from_export.step(words, state)
    expected_logits, _ = from_checkpoint.step(words, expected_state)
    np.testing.assert_array_equal(state["state_h"], expected_state["state_h"])
    np.testing.assert_array_equal(logits, expected_logits)


def test_the_saved_model_loads_and_runs_with_plain_tensorflow(exported, from_checkpoint):
    # A fresh interpreter that imports TensorFlow only: no showtell module, no Keras model class.
    # Its `caption` signature returns, in one call, the captions of showtell's beam search.
    script = textwrap.dedent(
        f"""
        import json, sys
        import tensorflow as tf
        SHOWTELL_PACKAGES = ("trainer", "schemas", "pipelines", "orchestration")
        model = tf.saved_model.load({exported!r})
        specs = {{}}
        for name, function in model.signatures.items():
            inputs = function.structured_input_signature[1]
            outputs = function.structured_outputs
            specs[name] = {{
                "inputs": {{k: [v.dtype.name, v.shape.as_list()] for k, v in inputs.items()}},
                "outputs": {{k: [v.dtype.name, v.shape.as_list()] for k, v in outputs.items()}},
            }}
        images = tf.constant([open(path, "rb").read() for path in sys.argv[1:]])
        state = model.signatures["initial_state"](images=images)
        out = model.signatures["step"](input_words=tf.constant([1, 1], tf.int64), **state)
        same = model.step(tf.constant([1, 1], tf.int64), state["state_h"], state["state_c"])
        captions = model.signatures["caption"](images=images)
        print(json.dumps({{
            "captions": [[c.decode() for c in row] for row in captions["captions"].numpy()],
            "log_probs": captions["log_probs"].numpy().tolist(),
            "specs": specs,
            "softmax_sums": out["softmax"].numpy().sum(axis=1).tolist(),
            "softmax_is_softmax": bool(tf.reduce_all(tf.abs(tf.nn.softmax(out["logits"]) - out["softmax"]) < 1e-6)),
            "methods_agree": bool(tf.reduce_all(same["logits"] == out["logits"])),
            "showtell_imported": sorted(m for m in sys.modules if m.split(".")[0] in SHOWTELL_PACKAGES),
        }}))
        """
    )
    folder = Path(exported).parent
    paths = [folder / "a.jpg", folder / "b.png"]
    for path, data in zip(paths, IMAGES):
        path.write_bytes(data)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-c", script, *map(str, paths)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert report["specs"] == {
        "caption": {
            "inputs": {"images": ["string", [None]]},
            "outputs": {
                "captions": ["string", [None, 3]],
                "word_ids": ["int64", [None, 3, 20]],
                "log_probs": ["float32", [None, 3]],
                "scores": ["float32", [None, 3]],
                "finished": ["bool", [None]],
            },
        },
        "initial_state": {
            "inputs": {"images": ["string", [None]]},
            "outputs": {"state_h": ["float32", [None, UNITS]], "state_c": ["float32", [None, UNITS]]},
        },
        "step": {
            "inputs": {
                "input_words": ["int64", [None]],
                "state_h": ["float32", [None, UNITS]],
                "state_c": ["float32", [None, UNITS]],
            },
            "outputs": {
                "logits": ["float32", [None, NUM_WORDS + 1]],
                "softmax": ["float32", [None, NUM_WORDS + 1]],
                "state_h": ["float32", [None, UNITS]],
                "state_c": ["float32", [None, UNITS]],
            },
        },
    }
    np.testing.assert_allclose(report["softmax_sums"], [1.0, 1.0], rtol=1e-5)
    assert report["softmax_is_softmax"] and report["methods_agree"]
    assert report["showtell_imported"] == []
    expected = from_checkpoint.caption(IMAGES[:2])  # showtell's Python beam search, eval's default settings
    assert report["captions"] == [[sentence for sentence, _ in captions] for captions in expected]
    np.testing.assert_allclose(np.exp(report["log_probs"]), [[p for _, p in c] for c in expected], rtol=1e-4)


def test_the_export_folder_holds_vocabulary_and_metadata_and_nothing_half_written(final, exported):
    folder = Path(exported)

    assert {"saved_model.pb", "variables", WORD_COUNTS_FILE, EXPORT_METADATA_FILE} <= set(os.listdir(folder))
    assert (folder / WORD_COUNTS_FILE).read_text() == (Path(final) / WORD_COUNTS_FILE).read_text()
    metadata = json.loads((folder / EXPORT_METADATA_FILE).read_text())
    assert metadata == {
        "checkpoint": final,
        "phase": 1,
        "step": 7,
        "image_size": MODEL["image_size"],
        "vocab_size": NUM_WORDS + 1,
        "num_lstm_units": UNITS,
        "start_id": 1,
        "end_id": 2,
        "unknown_id": NUM_WORDS,
        "vocabulary_id": parse_word_counts(WORD_COUNTS).id,
        "caption": {"beam_size": 3, "max_caption_length": 20, "length_normalization": 0.0},
        "model": Model(**MODEL).model_dump(mode="json"),
        "fingerprint": json.loads((Path(final) / "state.json").read_text())["fingerprint"],
    }
    assert [name for name in os.listdir(folder.parent) if ".staging-" in name] == []


def test_export_cli_writes_to_a_url_and_caption_cli_reads_it_back(final, checkpoint_captions, tmp_path, capsys):
    url = f"memory://showtell-test-{uuid.uuid4().hex[:8]}/export"
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(IMAGES[0])
    try:
        assert cli_main(["-q", "export", "--checkpoint", final, url]) == 0
        assert capsys.readouterr().out == f"{url}\n"

        assert cli_main(["-q", "caption", "--checkpoint", url, "--max-caption-length", "8", str(photo)]) == 0
    finally:
        remove(url.rsplit("/", 1)[0])
    lines = [f"  {i}) {sentence} (p={p:f})" for i, (sentence, p) in enumerate(checkpoint_captions[0])]
    assert capsys.readouterr().out.splitlines() == [f"Captions for image {photo}:", *lines]


def test_export_refuses_what_is_not_a_final_checkpoint(exported, tmp_path, capsys):
    assert cli_main(["-q", "export", "--checkpoint", exported, str(tmp_path / "again")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"showtell export: error: {exported}: already a SavedModel; export takes a published final/ checkpoint"
    ]
    assert not (tmp_path / "again").exists()


def test_a_corrupt_saved_model_is_a_clear_error(exported, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in (WORD_COUNTS_FILE, EXPORT_METADATA_FILE):
        (corrupt / name).write_bytes((Path(exported) / name).read_bytes())
    (corrupt / "saved_model.pb").write_bytes(b"\x08\x01 not a protocol buffer")

    with pytest.raises(ShowtellError) as raised:
        load_captioner(str(corrupt))
    assert str(raised.value).startswith(f"{corrupt}: cannot load this SavedModel: ")
    assert "\n" not in str(raised.value)


def test_an_export_whose_word_counts_is_not_the_vocabulary_it_records_is_refused(exported, tmp_path):
    replaced = tmp_path / "replaced"
    shutil.copytree(exported, replaced)
    swapped = WORD_COUNTS.replace("red 40\nblue 35\n", "blue 40\nred 35\n")  # as many words, another order
    (replaced / WORD_COUNTS_FILE).write_text(swapped)

    with pytest.raises(ShowtellError) as raised:
        load_captioner(str(replaced))
    assert str(raised.value) == (
        f"{replaced}: its {EXPORT_METADATA_FILE} records vocabulary {parse_word_counts(WORD_COUNTS).id} but its "
        f"word_counts.txt is vocabulary {parse_word_counts(swapped).id}: an inconsistent export; put back the "
        "word_counts.txt it was exported with"
    )


def test_an_export_that_records_no_vocabulary_loads_as_it_is(exported, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(exported, older)
    metadata = json.loads((older / EXPORT_METADATA_FILE).read_text())
    del metadata["vocabulary_id"]  # as `showtell export` wrote it before it recorded the vocabulary
    (older / EXPORT_METADATA_FILE).write_text(json.dumps(metadata))

    assert load_captioner(str(older)).words == list(parse_word_counts(WORD_COUNTS).words)
