"""orchestration/manifest.py: config values, file signatures, fingerprints and the manifest file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid

import fsspec
import pytest

from orchestration import manifest as mf
from schemas.config import build_config, join_url
from schemas.errors import ShowtellError


def _config(*overrides: str):
    return build_config({"run_root": "/runs/x"}, list(overrides))


def test_config_values_reads_leaves_and_whole_sections_by_dotted_key():
    values = mf.config_values(_config("train.phase2.steps=7"), ["train.phase2.steps", "promote"])

    promote = {"models_root": None, "metric": "CIDEr", "tolerance": 0.0, "min_value": None}
    assert values == {"train.phase2.steps": 7, "promote": promote}


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


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _big(monkeypatch) -> None:
    """Files over 4 bytes count as big (signed through vouchers and the cache)."""
    monkeypatch.setattr(mf, "SMALL_FILE_BYTES", 4)


def test_a_big_files_signature_is_its_content_hash_not_its_size_or_time(tmp_path, monkeypatch):
    _big(monkeypatch)
    path = tmp_path / "train2014.zip"
    path.write_bytes(b"0123456789")
    before = mf.signature(str(path))
    assert before == _sha(b"0123456789")

    os.utime(path, (1, 1))  # same bytes, touched (as a copy does): the same
    assert mf.signature(str(path)) == before
    path.write_bytes(b"9876543210")  # other bytes of the same size: changed
    assert mf.signature(str(path)) == _sha(b"9876543210")


@pytest.mark.parametrize("size", [3, 10], ids=["small", "big"])
def test_a_file_signs_the_same_on_a_local_disk_and_on_an_object_store(tmp_path, monkeypatch, size):
    _big(monkeypatch)
    data = bytes(range(size))
    (tmp_path / "f.bin").write_bytes(data)
    url = f"memory://manifest-{uuid.uuid4().hex}/f.bin"
    fsspec.open(url, "wb").__enter__().write(data) if False else fsspec.filesystem("memory").pipe_file(url, data)

    assert mf.signature(str(tmp_path / "f.bin")) == mf.signature(url) == _sha(data)


def _sidecar(path, sha256: str, size: int) -> None:
    """`<path>.verified.json` as pipelines/download.py writes it."""
    record = {"size": size, "sha256": sha256, "md5": "0" * 32, "source": "s3://src/x", "etag": None, "mtime": None}
    (path.parent / (path.name + mf.DOWNLOAD_SIDECAR_SUFFIX)).write_text(json.dumps(record))


def test_a_download_sidecar_vouches_for_a_big_files_hash_so_it_is_not_read(tmp_path, monkeypatch):
    _big(monkeypatch)
    path = tmp_path / "train2014.zip"
    path.write_bytes(b"0123456789")
    _sidecar(path, "ab" * 32, 10)  # not the real hash: a signature that is this one was not read

    assert mf.signature(str(path)) == "sha256:" + "ab" * 32


def test_a_sidecar_of_another_size_or_older_than_its_file_vouches_for_nothing(tmp_path, monkeypatch):
    _big(monkeypatch)
    path = tmp_path / "train2014.zip"
    path.write_bytes(b"0123456789")
    _sidecar(path, "ab" * 32, 11)
    assert mf.signature(str(path)) == _sha(b"0123456789")

    _sidecar(path, "ab" * 32, 10)
    later = path.stat().st_mtime + 60
    os.utime(path, (later, later))  # the file was rewritten after its sidecar: the sidecar is stale
    assert mf.signature(str(path)) == _sha(b"0123456789")


def test_the_sample_sets_stamp_vouches_for_its_files_under_the_mirror(tmp_path, monkeypatch):
    _big(monkeypatch)
    mirror = tmp_path / "run" / "raw"
    (mirror / "zips").mkdir(parents=True)
    (mirror / "zips" / "val2014.zip").write_bytes(b"0123456789")
    stamp = {"settings": {}, "files": {"zips/val2014.zip": {"size": 10, "sha256": "cd" * 32}}}
    (mirror / mf.SAMPLE_STAMP_FILE).write_text(json.dumps(stamp))
    url = str(mirror / "zips" / "val2014.zip")

    assert mf.Signer().sign(url, mf.Places(str(tmp_path / "run"), str(mirror))) == "sha256:" + "cd" * 32
    assert mf.Signer().sign(url) == _sha(b"0123456789")  # outside a mirror, sample.json means nothing


def test_a_big_files_hash_is_cached_by_its_key_and_stamp_and_a_copy_keeping_stamps_uses_it(tmp_path, monkeypatch):
    _big(monkeypatch)
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "big.bin").write_bytes(b"0123456789")
    cache: dict = {}
    signer = mf.Signer(cache)

    assert signer.sign(str(run / "data" / "big.bin"), mf.Places(str(run))) == _sha(b"0123456789")
    assert signer.updated and list(cache) == ["{run_root}/data/big.bin"]
    assert cache["{run_root}/data/big.bin"]["stamp"].startswith("size:10:mtime:")

    cache["{run_root}/data/big.bin"]["signature"] = "sha256:cached"  # a signature that is this one was not read
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)  # keeps modification times
    again = mf.Signer(cache)
    assert again.sign(str(copy / "data" / "big.bin"), mf.Places(str(copy))) == "sha256:cached"
    assert not again.updated

    (copy / "data" / "big.bin").write_bytes(b"01234567890")  # another stamp: hashed afresh
    assert again.sign(str(copy / "data" / "big.bin"), mf.Places(str(copy))) == _sha(b"01234567890")
    assert again.updated and cache["{run_root}/data/big.bin"]["signature"] == _sha(b"01234567890")


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


def test_a_folder_signs_the_same_wherever_it_lies_and_on_an_object_store(tmp_path, monkeypatch):
    _big(monkeypatch)
    folder = tmp_path / "export"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"graph, a big file")
    (folder / "variables" / "variables.index").write_bytes(b"idx")
    store = f"memory://manifest-{uuid.uuid4().hex}/export"
    fsspec.filesystem("memory").put(str(folder), store, recursive=True)
    shutil.copytree(folder, tmp_path / "copy")

    assert mf.signature(str(folder)) == mf.signature(str(tmp_path / "copy")) == mf.signature(store)


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
            "inputs": {"{run_root}/eval/best.json": digest},
            "upstream": {"step": "evaluate", "done": done},
        }

    old, new = basis(4, "sha256:1", "t1"), basis(6, "sha256:2", "t2")

    text = mf.describe_change(old, new)

    assert text == "config train.phase2.steps 4 -> 6; evaluate re-ran; input eval/best.json changed"
    assert mf.describe_change(None, new) == "no earlier run recorded"
    missing = {**old, "inputs": {"{run_root}/eval/best.json": mf.MISSING}}
    assert "input eval/best.json is missing" in mf.describe_change(old, missing)
    assert mf.describe_change(old, new, limit=2).endswith("evaluate re-ran (+1 more)")
    more = {**old, "inputs": {**old["inputs"], "{data.mirror}/zips/val2014.zip": "sha256:3"}}
    assert mf.describe_change(old, more) == "input {data.mirror}/zips/val2014.zip is new"
    edited = {**more, "inputs": {**more["inputs"], "{data.mirror}/zips/val2014.zip": "sha256:4"}}
    assert mf.describe_change(more, edited) == "input {data.mirror}/zips/val2014.zip changed"


def test_describe_change_says_when_the_inputs_were_recorded_by_path_by_an_older_showtell():
    old = {"config": {"data.mirror": "runs/local/raw"}, "inputs": {"/abs/runs/local/raw/a.zip": "size:1:time:2"}}
    new = {"config": {"data.mirror": "{run_root}/raw"}, "inputs": {"{data.mirror}/a.zip": "sha256:1"}}

    assert mf.describe_change({**old, "upstream": None}, {**new, "upstream": None}) == (
        "config data.mirror 'runs/local/raw' -> '{run_root}/raw'; "
        "its inputs were recorded by path, as an older showtell did"
    )


# --- where things are -------------------------------------------------------------------------------


def test_places_key_an_input_by_the_innermost_place_it_lies_under_else_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "local").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "runs")
    relative_places = mf.Places("runs/local", "runs/local/raw")
    absolute_places = mf.Places(str(tmp_path / "runs/local"), str(tmp_path / "runs/local/raw") + "/")

    for places in (relative_places, absolute_places):
        assert places.key("runs/local/raw/zips/val2014.zip") == "{data.mirror}/zips/val2014.zip"
        assert places.key(str(tmp_path / "alias/local/data/word_counts.txt")) == "{run_root}/data/word_counts.txt"
        assert places.key("file://" + str(tmp_path / "runs/local/export")) == "{run_root}/export"
        assert places.key("runs/other.txt") == str(tmp_path / "runs/other.txt")
        assert places.key("s3://b/x/") == "s3://b/x"
    shared = mf.Places("s3://b/runs/1", "s3://b/mirror")
    assert shared.key("s3://b/mirror/zips/val2014.zip") == "{data.mirror}/zips/val2014.zip"
    assert shared.key("s3://b/runs/1/eval/best.json") == "{run_root}/eval/best.json"


def test_places_write_config_locations_under_the_run_root_relative_to_it_and_others_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = {
        "data.mirror": "runs/local/raw",
        "data.source": "sample",
        "promote": {"models_root": str(tmp_path / "runs/local/models"), "metric": "CIDEr", "tolerance": 0.0},
        "model": {"encoder_weights": "imagenet", "image_size": 64},
        "eval.split": "test",
        "train.phase1": {"steps": 5, "note": str(tmp_path / "runs/local/notes"), "other": "runs/local/notes"},
    }
    expected = {
        "data.mirror": "{run_root}/raw",
        "data.source": "sample",
        "promote": {"models_root": "{run_root}/models", "metric": "CIDEr", "tolerance": 0.0},
        "model": {"encoder_weights": "imagenet", "image_size": 64},
        "eval.split": "test",
        # any absolute path or URL under run_root; a relative string may be a plain word: as it is
        "train.phase1": {"steps": 5, "note": "{run_root}/notes", "other": "runs/local/notes"},
    }

    assert mf.Places("runs/local").values(values) == expected
    assert mf.Places(str(tmp_path / "runs/local")).values(values) == expected
    assert mf.Places("s3://b/run").values({"data.mirror": "s3://b/run/raw/"}) == {"data.mirror": "{run_root}/raw"}
    elsewhere = mf.Places("runs/local").values({"data.source": "coco", "model.encoder_weights": "w.h5"})
    assert elsewhere == {"data.source": str(tmp_path / "coco"), "model.encoder_weights": str(tmp_path / "w.h5")}


def test_a_basis_is_the_same_for_a_run_root_spelled_relative_or_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/local/raw/zips").mkdir(parents=True)
    (tmp_path / "runs/local/raw/zips/val2014.zip").write_bytes(b"zip")
    bases = []
    for run_root in ("runs/local", str(tmp_path / "runs/local"), f"file://{tmp_path}/runs/local/"):
        config = build_config({"run_root": run_root})
        values = mf.config_values(config, ["data.source", "data.mirror"])
        inputs = [join_url(config.data.mirror, "zips/val2014.zip")]
        bases.append(mf.make_basis(values, inputs, None, mf.Places.of(config)))

    assert bases[0] == bases[1] == bases[2]
    assert bases[0]["config"]["data.mirror"] == "{run_root}/raw"
    assert bases[0]["inputs"] == {"{data.mirror}/zips/val2014.zip": _sha(b"zip")}


def test_manifest_starts_empty_and_saves_whole_after_each_change(tmp_path):
    manifest = mf.Manifest.load(str(tmp_path))
    assert manifest.step("download") is None

    manifest.set_step("download", {"state": mf.DONE, "end": "t"})
    manifest.set_run({"run_id": "r1"})

    again = mf.Manifest.load(str(tmp_path))
    assert again.step("download") == {"state": mf.DONE, "end": "t"}
    assert again.data["last_run"] == {"run_id": "r1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [mf.MANIFEST_FILE]  # no temp files left


def test_the_manifest_keeps_big_files_hashes_for_the_next_look(tmp_path, monkeypatch):
    _big(monkeypatch)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_bytes(b"0123456789")
    manifest = mf.Manifest.load(str(tmp_path))
    manifest.signer.sign(str(tmp_path / "data" / "big.bin"), mf.Places(str(tmp_path)))
    assert manifest.signer.updated

    manifest.save()

    assert not manifest.signer.updated
    hashes = mf.Manifest.load(str(tmp_path)).data[mf.HASHES]
    assert hashes["{run_root}/data/big.bin"]["signature"] == _sha(b"0123456789")


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
