"""Issue 16's vocabulary contract in trainer/checkpoints.py: a checkpoint is loaded and published
only with the vocabulary its state.json records; one that records none (written before showtell
recorded it) is taken as it is. On the tiny published `final/` of tests/captioning.py, whose files
the tests copy into checkpoints that name one vocabulary or another."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from inference.captioner import load_captioner
from schemas.config import build_config
from schemas.errors import ShowtellError
from schemas.layout import FINAL_DIR, STATE_FILE, WEIGHTS_FILE
from schemas.vocabulary import parse_word_counts
from tests.captioning import MODEL, WORD_COUNTS, publish_tiny_final
from trainer import checkpoints as ckpt

OWN = parse_word_counts(WORD_COUNTS).id
# As many words as WORD_COUNTS (the tiny model's weights fit it), two of them in the other order.
SWAPPED = WORD_COUNTS.replace("red 40\nblue 35\n", "blue 40\nred 35\n")
OTHER = parse_word_counts(SWAPPED).id


@pytest.fixture(scope="module")
def final(tmp_path_factory) -> Path:
    return Path(publish_tiny_final(tmp_path_factory.mktemp("contract")))


def _with_vocabulary(folder: Path, vocabulary_id: str | None) -> Path:
    """`folder`'s state.json naming `vocabulary_id` (None: naming none, as an older showtell wrote it)."""
    state = json.loads((folder / STATE_FILE).read_text())
    state.pop("vocabulary_id", None)
    if vocabulary_id is not None:
        state["vocabulary_id"] = vocabulary_id
    (folder / STATE_FILE).write_text(json.dumps(state))
    return folder


def _kept(final: Path, folder: Path, vocabulary_id: str | None) -> Path:
    """A checkpoint as Ray keeps them (weights and state.json only), of the final's weights."""
    folder.mkdir(parents=True)
    for name in (WEIGHTS_FILE, STATE_FILE):
        shutil.copy(final / name, folder)
    return _with_vocabulary(folder, vocabulary_id)


def test_a_kept_checkpoint_loads_only_under_the_vocabulary_its_state_records(final, tmp_path):
    kept = _kept(final, tmp_path / "checkpoint_000000007", OWN)
    model_cfg = build_config({"run_root": str(tmp_path), "model": MODEL}).model
    loader = ckpt.CheckpointLoader()

    with pytest.raises(ShowtellError) as refused:
        loader.load(str(kept), model_cfg, SWAPPED)
    loaded = loader.load(str(kept), model_cfg, WORD_COUNTS)

    assert str(refused.value) == (
        f"checkpoint {kept} was trained on vocabulary {OWN}, not on {OTHER} (the word_counts.txt it is loaded "
        "with): use it with the word_counts.txt of the data it was trained on"
    )
    assert ckpt.weights_fingerprint(loaded.model) == json.loads((kept / STATE_FILE).read_text())["fingerprint"]


def test_a_checkpoint_whose_state_records_no_vocabulary_loads_as_it_is(final, tmp_path):
    kept = _kept(final, tmp_path / "checkpoint_000000007", None)
    model_cfg = build_config({"run_root": str(tmp_path), "model": MODEL}).model

    loaded = ckpt.CheckpointLoader().load(str(kept), model_cfg, SWAPPED)

    assert loaded.word_counts == SWAPPED


def test_a_final_whose_state_records_another_vocabulary_than_its_word_counts_is_refused(final, tmp_path):
    inconsistent = tmp_path / FINAL_DIR
    shutil.copytree(final, inconsistent)
    _with_vocabulary(inconsistent, OTHER)
    expected = (
        f"{inconsistent}: its state.json records vocabulary {OTHER} but its word_counts.txt is vocabulary {OWN}: "
        "an inconsistent checkpoint; put back the word_counts.txt of the data it was trained on"
    )

    with pytest.raises(ShowtellError) as by_the_loader:
        ckpt.CheckpointLoader().load(str(inconsistent))
    with pytest.raises(ShowtellError) as by_the_captioner:
        load_captioner(str(inconsistent))

    assert str(by_the_loader.value) == str(by_the_captioner.value) == expected


def test_a_final_whose_state_records_its_own_vocabulary_loads(final, tmp_path):
    consistent = tmp_path / FINAL_DIR
    shutil.copytree(final, consistent)
    _with_vocabulary(consistent, OWN)

    assert load_captioner(str(consistent)).words == list(parse_word_counts(WORD_COUNTS).words)


def test_publishing_a_checkpoint_with_another_vocabulary_is_refused_and_publishes_nothing(final, tmp_path):
    kept = _kept(final, tmp_path / "checkpoint_000000007", OTHER)
    word_counts = tmp_path / "word_counts.txt"
    word_counts.write_text(WORD_COUNTS)
    phase_dir = tmp_path / "phase1"
    config_tree = build_config({"run_root": str(tmp_path), "model": MODEL}).model_dump(mode="json")

    with pytest.raises(ShowtellError) as refused:
        ckpt.publish_final(str(kept), str(phase_dir), config_tree, str(word_counts))

    assert str(refused.value) == (
        f"checkpoint {kept} was trained on vocabulary {OTHER}, not on {OWN} ({word_counts}): "
        "use it with the word_counts.txt of the data it was trained on"
    )
    assert not phase_dir.exists()
