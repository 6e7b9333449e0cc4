"""`showtell download`, `preprocess` and `sample-data` on S3: a real S3 server on 127.0.0.1 (moto in
server mode) through s3fs, as they run against AWS.

The endpoint reaches every client the standard AWS way, by `AWS_ENDPOINT_URL` (tests/s3_server.py):
s3fs (aiobotocore), boto3, and the DirectRunner's worker processes, which inherit the environment; the pipeline
runs in `multi_processing` mode, so shards are written to S3 by other processes than the one
that publishes them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import boto3
import fsspec
import pytest
import s3fs
import yaml

from orchestration.cli import main as cli_main
from pipelines import zips
from schemas import records
from schemas.config import MSCOCO_FILES
from schemas.layout import PREPROCESS_REPORT_FILE, RECORD_SCHEMA_FILE, WORD_FREQUENCIES_FILE
from schemas.storage import copy_dir, exists, read_text
from schemas.tfrecord import read_records
from schemas.vocabulary import WORD_COUNTS_FILE, parse_word_counts
from tests.s3_server import s3_fixture

BUCKET = "showtell-test"
SHARDS = {"train": 2, "val": 1, "test": 1}
SAMPLE = {"train_images": 20, "val_images": 10, "image_size": 48}


s3 = s3_fixture(BUCKET)  # a moto S3 server on 127.0.0.1 with BUCKET; an s3fs file system on it


def _write_config(path: Path, settings: dict) -> str:
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return str(path)


def _under(fs: fsspec.AbstractFileSystem, prefix: str) -> set[str]:
    """Every object under `prefix`, relative to it, as the store lists them now."""
    fs.invalidate_cache()
    return {path[len(prefix) + 1 :] for path in fs.find(prefix)}


def _sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return hashlib.sha256(fs.cat_file(path)).hexdigest()


def _decoded_records(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    with fs.open(path, "rb") as handle:
        return [records.decode_sequence_example(record) for record in read_records(handle)]


@pytest.fixture(scope="module")
def published(s3, tmp_path_factory) -> dict:
    """`showtell download` then `showtell preprocess` with run_root on S3, through the CLI."""
    config = _write_config(
        tmp_path_factory.mktemp("config") / "s3.yaml",
        {
            "run_root": f"s3://{BUCKET}/run",
            "data": {"source": "sample", "sample": SAMPLE, "shards": SHARDS},
            "beam": {"direct_running_mode": "multi_processing", "direct_num_workers": 2},
        },
    )
    for step in ("download", "preprocess"):
        assert cli_main(["-q", step, "--config", config]) == 0, step
    data = f"{BUCKET}/run/data"
    written = {
        split: [record for name in records.shard_names(split, n) for record in _decoded_records(s3, f"{data}/{name}")]
        for split, n in SHARDS.items()
    }
    return {"data": data, "records": written, "report": json.loads(s3.cat_file(f"{data}/{PREPROCESS_REPORT_FILE}"))}


@pytest.mark.slow
def test_run_root_holds_the_mirror_and_the_published_data_and_nothing_else(s3, published):
    shards = {name for split, n in SHARDS.items() for name in records.shard_names(split, n)}
    transform = {
        "transform_fn/saved_model.pb",
        "transform_fn/assets/word_counts",
        "transformed_metadata/schema.pbtxt",
    }
    data = _under(s3, published["data"])
    assert shards | transform | {WORD_COUNTS_FILE, RECORD_SCHEMA_FILE, PREPROCESS_REPORT_FILE} <= data
    assert {path for path in data if "/" not in path} == shards | {
        WORD_COUNTS_FILE,
        WORD_FREQUENCIES_FILE,
        RECORD_SCHEMA_FILE,
        PREPROCESS_REPORT_FILE,
    }
    assert {path.split("/")[0] for path in data if "/" in path} == {"transform_fn", "transformed_metadata"}
    # The mirror, the steps' logs, and no staging folder, tf.Transform temp folder or partial download left behind.
    raw = {f"raw/{path}" for path in (*MSCOCO_FILES, "sample.json")}
    logs = {"logs/download.log", "logs/preprocess.log"}
    assert _under(s3, f"{BUCKET}/run") == raw | logs | {f"data/{path}" for path in data}


@pytest.mark.slow
def test_report_adds_up_and_matches_the_records_in_the_shards(published):
    report, written = published["report"], published["records"]
    assert report["output_dir"] == f"s3://{published['data']}"
    for split, entry in report["splits"].items():
        for unit in ("images", "captions"):
            part = entry[unit]
            assert part["listed"] == part["written"] + sum(part["skipped"].values()), (split, unit)
        assert entry["records_written"] == entry["captions"]["written"] == len(written[split]), split
        assert entry["images"]["written"] == len({r["image_id"] for r in written[split]}), split
    assert report["records_written"] == sum(map(len, written.values())) > 100
    train, val, test = ({r["image_id"] for r in written[s]} for s in ("train", "val", "test"))
    assert train and val and test and not (train & val or train & test or val & test)


@pytest.mark.slow
def test_records_decode_with_caption_ids_from_word_counts(s3, published):
    vocabulary = parse_word_counts(read_text(f"s3://{published['data']}/{WORD_COUNTS_FILE}"))
    index = {word: i for i, word in enumerate(vocabulary.words)}
    assert published["report"]["vocabulary"]["unknown_id"] == len(vocabulary.words)
    for split in published["records"].values():
        for record in split:
            assert record["tokens"][0] == "<S>" and record["tokens"][-1] == "</S>"
            assert record["ids"] == [index.get(token, len(vocabulary.words)) for token in record["tokens"]]
            assert record["jpeg"][:2] == b"\xff\xd8"  # JPEG start-of-image


@pytest.mark.slow
def test_transform_graph_copied_from_s3_maps_tokens_to_the_records_ids(published, tmp_path):
    import tensorflow as tf
    import tensorflow_transform as tft

    local = tmp_path / "data"  # tf.io.gfile has no s3://: read the published graph from a copy
    for folder in ("transform_fn", "transformed_metadata"):
        copy_dir(f"s3://{published['data']}/{folder}", str(local / folder))
    sample = published["records"]["train"][:5]
    tokens = tf.ragged.constant([r["tokens"] for r in sample]).to_sparse()
    ids = tft.TFTransformOutput(str(local)).transform_features_layer()({"tokens": tokens})["caption_ids"]
    dense = tf.sparse.to_dense(ids, default_value=-1).numpy().tolist()
    assert [[i for i in row if i >= 0] for row in dense] == [r["ids"] for r in sample]


@pytest.fixture(scope="module")
def s3_source(s3) -> str:
    """MSCOCO's layout on S3, written by `showtell sample-data`."""
    source = f"s3://{BUCKET}/src"
    assert (
        cli_main(["-q", "sample-data", source, "--train-images", "4", "--val-images", "2", "--image-size", "48"]) == 0
    )
    return source


@pytest.mark.parametrize("mirror", ["local", "s3"])
def test_an_s3_source_written_by_sample_data_mirrors_verified_and_then_skips(s3, s3_source, mirror, tmp_path, capsys):
    mirror_url = str(tmp_path / "raw") if mirror == "local" else f"s3://{BUCKET}/mirror-{tmp_path.name}"
    settings = {"run_root": str(tmp_path / "run"), "data": {"source": s3_source, "mirror": mirror_url}}
    config = _write_config(tmp_path / "c.yaml", settings)
    capsys.readouterr()  # sample-data's summary

    assert cli_main(["download", "--config", config]) == 0  # not quiet: it prints what it did
    assert cli_main(["download", "--config", config]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["downloaded"] * 3 + ["skipped"] * 3
    mirror_fs, mirror_root = fsspec.core.url_to_fs(mirror_url)
    for relpath in MSCOCO_FILES:
        mirrored = f"{mirror_root}/{relpath}"
        assert _sha256(mirror_fs, mirrored) == _sha256(s3, f"{BUCKET}/src/{relpath}"), relpath
        sidecar = json.loads(mirror_fs.cat_file(f"{mirrored}.verified.json"))
        assert sidecar["md5"] == s3.info(f"{BUCKET}/src/{relpath}")["ETag"].strip('"')  # checked against S3's MD5
        assert not mirror_fs.exists(f"{mirrored}.partial")


def test_a_distributed_runner_with_an_s3_run_root_fails_at_once_naming_tensorflow_io(s3, tmp_path, capsys):
    run_root = f"s3://{BUCKET}/dataflow-{tmp_path.name}"
    config = _write_config(tmp_path / "c.yaml", {"run_root": run_root, "beam": {"runner": "DataflowRunner"}})

    assert cli_main(["-q", "preprocess", "--config", config]) == 2

    error = capsys.readouterr().err.strip()
    assert "\n" not in error and run_root in error and "tensorflow-io" in error and "DataflowRunner" in error
    assert not s3.exists(run_root)


def test_exists_and_read_text_see_what_another_client_wrote_after_a_listing_was_cached(s3):
    other = boto3.client("s3")  # another process, as far as s3fs's caches know
    other.put_object(Bucket=BUCKET, Key="fresh/a.txt", Body=b"first")
    assert s3.ls(f"{BUCKET}/fresh") == [f"{BUCKET}/fresh/a.txt"]  # the folder's listing is now cached

    other.put_object(Bucket=BUCKET, Key="fresh/b.txt", Body=b"new")
    other.put_object(Bucket=BUCKET, Key="fresh/a.txt", Body=b"first, and longer now")

    assert exists(f"s3://{BUCKET}/fresh/b.txt")
    assert read_text(f"s3://{BUCKET}/fresh/a.txt") == "first, and longer now"


def test_reading_a_zip_member_on_s3_fetches_about_that_member_not_the_stores_read_ahead(s3, monkeypatch):
    members = {f"train2014/{i:03d}.jpg": os.urandom(200_000) for i in range(60)}  # a 12 MB zip
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    s3.pipe_file(f"{BUCKET}/big/train2014.zip", buffer.getvalue())
    fetched: list[int] = []
    fetch_range = s3fs.core.S3File._fetch_range

    def counted_fetch_range(self: s3fs.core.S3File, start: int, end: int) -> bytes:
        fetched.append(end - start)
        return fetch_range(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted_fetch_range)
    url = f"s3://{BUCKET}/big/train2014.zip"
    assert set(zips.member_names(url)) == set(members)
    fetched.clear()

    # Early members: s3fs's default read-ahead (50 MiB) would fetch the rest of the zip for the first.
    chosen = ["train2014/030.jpg", "train2014/005.jpg", "train2014/017.jpg"]
    assert [zips.read_member(url, name) for name in chosen] == [members[name] for name in chosen]
    assert sum(fetched) <= 3 * (200_000 + zips.READ_AHEAD_BYTES + 1024)
