"""orchestration/manifest.py: config values, file signatures, fingerprints and the manifest file."""

from __future__ import annotations

import json
import os
import uuid

import fsspec
import pytest

from orchestration import manifest as mf
from schemas.config import build_config
from schemas.errors import ShowtellError


def _config(*overrides: str):
    return build_config({"run_root": "/runs/x"}, list(overrides))


def test_config_values_reads_leaves_and_whole_sections_by_dotted_key():
    values = mf.config_values(_config("train.phase2.steps=7"), ["train.phase2.steps", "promote"])

    assert values == {"train.phase2.steps": 7, "promote": {"models_root": None, "metric": "CIDEr", "tolerance": 0.0}}


def test_config_values_rejects_a_key_the_schema_lacks():
    with pytest.raises(KeyError, match="train.phase3"):
        mf.config_values(_config(), ["train.phase3"])


def test_a_small_files_signature_is_its_content_hash_whatever_its_time(tmp_path):
    path = tmp_path / "best.json"
    path.write_text('{"value": 1}')
    before = mf.signature(str(path))

    os.utime(path, (1, 1))
    assert mf.signature(str(path)) == before
    assert before.startswith("sha256:")

    path.write_text('{"value": 2}')
    assert mf.signature(str(path)) != before


def test_a_big_files_signature_is_its_size_and_time(tmp_path, monkeypatch):
    monkeypatch.setattr(mf, "SMALL_FILE_BYTES", 4)
    path = tmp_path / "train2014.zip"
    path.write_bytes(b"0123456789")
    before = mf.signature(str(path))
    assert before.startswith("size:10:time:")

    os.utime(path, (1, 1))  # same bytes, touched: it counts as changed
    assert mf.signature(str(path)) != before


def test_a_folders_signature_covers_every_file_below_it(tmp_path):
    folder = tmp_path / "export"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"graph")
    (folder / "variables" / "variables.index").write_bytes(b"index")
    first = mf.signature(str(folder))
    assert first.startswith("folder:2:") and mf.signature(str(folder)) == first

    (folder / "variables" / "variables.index").write_bytes(b"index, changed")
    second = mf.signature(str(folder))
    (folder / "extra.txt").write_text("x")
    third = mf.signature(str(folder))

    assert len({first, second, third}) == 3


def test_a_missing_input_signs_as_missing_and_an_object_store_file_signs_too(tmp_path):
    assert mf.signature(str(tmp_path / "absent")) == mf.MISSING
    url = f"memory://manifest-{uuid.uuid4().hex}/best.json"
    with fsspec.open(url, "w") as handle:
        handle.write("{}")
    assert mf.signature(url).startswith("sha256:")


def test_fingerprint_ignores_key_order_and_follows_values():
    one = {"config": {"a": 1, "b": {"c": 2}}, "inputs": {}, "upstream": None}
    same = {"upstream": None, "inputs": {}, "config": {"b": {"c": 2}, "a": 1}}
    other = {"config": {"a": 1, "b": {"c": 3}}, "inputs": {}, "upstream": None}

    assert mf.fingerprint(one) == mf.fingerprint(same) != mf.fingerprint(other)


def test_describe_change_names_the_leaf_key_the_input_and_the_upstream_step():
    def basis(steps: int, digest: str, done: str) -> dict:
        return {
            "config": {"train.phase2": {"steps": steps, "batch_size": 8}},
            "inputs": {"a/best.json": digest},
            "upstream": {"step": "evaluate", "done": done},
        }

    old, new = basis(4, "sha256:1", "t1"), basis(6, "sha256:2", "t2")

    text = mf.describe_change(old, new)

    assert text == "config train.phase2.steps 4 -> 6; evaluate re-ran; input a/best.json changed"
    assert mf.describe_change(old, new, base="a/").endswith("; input best.json changed")
    assert mf.describe_change(None, new) == "no earlier run recorded"
    assert "input a/best.json is missing" in mf.describe_change(old, {**old, "inputs": {"a/best.json": mf.MISSING}})
    assert mf.describe_change(old, new, limit=2).endswith("evaluate re-ran (+1 more)")


def test_manifest_starts_empty_and_saves_whole_after_each_change(tmp_path):
    manifest = mf.Manifest.load(str(tmp_path))
    assert manifest.step("download") is None

    manifest.set_step("download", {"state": mf.DONE, "end": "t"})
    manifest.set_run({"run_id": "r1"})

    again = mf.Manifest.load(str(tmp_path))
    assert again.step("download") == {"state": mf.DONE, "end": "t"}
    assert again.data["last_run"] == {"run_id": "r1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [mf.MANIFEST_FILE]  # no temp files left


def test_a_corrupt_manifest_is_a_clear_error_naming_it(tmp_path):
    (tmp_path / mf.MANIFEST_FILE).write_text("{not json")

    with pytest.raises(ShowtellError, match=r"manifest.json: not valid JSON; fix it, or remove it"):
        mf.Manifest.load(str(tmp_path))


def test_a_manifest_of_another_version_is_refused(tmp_path):
    (tmp_path / mf.MANIFEST_FILE).write_text(json.dumps({"version": 99, "steps": {}}))

    with pytest.raises(ShowtellError, match="manifest version 99"):
        mf.Manifest.load(str(tmp_path))


def test_upstream_token_is_the_steps_end_only_when_done():
    assert mf.upstream_token("a", {"state": mf.DONE, "end": "t"}) == {"step": "a", "done": "t"}
    assert mf.upstream_token("a", {"state": mf.RUNNING, "end": None}) == {"step": "a", "done": None}
    assert mf.upstream_token("a", None) == {"step": "a", "done": None}


def test_a_guard_that_raises_stops_every_save(tmp_path):
    def lost() -> None:
        raise ShowtellError("lost the lock")

    manifest = mf.Manifest.load(str(tmp_path), guard=lost)

    with pytest.raises(ShowtellError, match="lost the lock"):
        manifest.set_step("download", {"state": mf.DONE})
    assert not (tmp_path / mf.MANIFEST_FILE).exists()


def test_only_grown_accepts_growth_of_the_named_leaves_alone():
    def basis(steps: int, rate: float = 2.0, inputs: str = "sha256:1") -> dict:
        return {
            "config": {"train.phase1": {"steps": steps, "learning_rate": rate}},
            "inputs": {"f": inputs},
            "upstream": None,
        }

    leaves = ["train.phase1.steps"]
    assert mf.only_grown(basis(10), basis(20), leaves)
    assert not mf.only_grown(basis(20), basis(10), leaves)  # fewer steps: start again
    assert not mf.only_grown(basis(10), basis(20, rate=1.0), leaves)  # and something else
    assert not mf.only_grown(basis(10), basis(20, inputs="sha256:2"), leaves)  # other inputs
    assert not mf.only_grown(basis(10), basis(20), [])  # a step that cannot go on
    assert not mf.only_grown(None, basis(20), leaves)
