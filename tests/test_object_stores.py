"""What goes through fsspec, on both object stores, against real servers on 127.0.0.1 (moto's S3
server, gcp-storage-emulator): schemas/storage.py's files and publish_dir, the lock, the manifest,
`showtell download`, evaluation's outputs, export and promotion. And on gs://, what the emulator
adds: preprocess refusing a distributed runner (TensorFlow's GCS client cannot reach the emulator),
another client's writes, a `storage.gcs.endpoint` that wins over STORAGE_EMULATOR_HOST, and Ray
Train's storage through pyarrow's GcsFileSystem (`schemas.stores.arrow_filesystem`).
"""
from __future__ import annotations

import json
import threading

import pyarrow.fs
import pytest
import yaml

from orchestration.cli import main as cli_main
from orchestration.lock import FolderLock, LockHeldError, read_owner
from orchestration.manifest import DONE, Manifest
from orchestration.promote import Candidate, Gate, current_model, promote, read_history
from pipelines.eval_report import build_report, write_report
from schemas import stores
from schemas.config import MSCOCO_FILES, build_config
from schemas.layout import BEST_FILE, EVAL_HTML_FILE, EVAL_REPORT_FILE
from schemas.storage import copy_dir, exists, publish_dir, read_json, read_text, remove, replace_dir, write_text
from tests.gcs_server import gcs_fixture, store_settings_restored
from tests.s3_server import s3_fixture

BUCKET = "showtell-stores"


s3 = s3_fixture(BUCKET)  # a moto S3 server on 127.0.0.1 with BUCKET; an s3fs file system on it


gcs = gcs_fixture(BUCKET)  # the GCS emulator on 127.0.0.1 with BUCKET; a gcsfs file system on it


@pytest.fixture(autouse=True)
def _settings_restored(s3, gcs):  # the servers first: their environment is kept
    with store_settings_restored():
        yield


@pytest.fixture(params=["s3", "gs"])
def scheme(request) -> str:
    return request.param


@pytest.fixture
def store(scheme, s3, gcs):
    """The fsspec file system of the store under test."""
    return s3 if scheme == "s3" else gcs


@pytest.fixture
def root(scheme, request) -> str:
    """A fresh folder of the bucket for one test."""
    return f"{scheme}://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}"


def _tree(fs, url: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    prefix = url.partition("://")[2].rstrip("/")
    return {path[len(prefix) + 1 :]: fs.cat_file(path) for path in fs.find(prefix)}


def test_small_files_and_publish_dir(store, root):
    write_text(f"{root}/dest/old.txt", "old")
    assert exists(f"{root}/dest/old.txt") and read_text(f"{root}/dest/old.txt") == "old"

    with publish_dir(f"{root}/dest", marker="marker.json") as staging:
        assert staging.startswith(f"{root}/dest.staging-")
        write_text(f"{staging}/a.txt", "a")
        write_text(f"{staging}/sub/b.txt", "b")
        write_text(f"{staging}/marker.json", "{}")

    assert _tree(store, f"{root}/dest") == {"a.txt": b"a", "sub/b.txt": b"b", "marker.json": b"{}"}
    assert _tree(store, root).keys() == {"dest/a.txt", "dest/sub/b.txt", "dest/marker.json"}  # no staging left

    with pytest.raises(RuntimeError, match="half way"):
        with publish_dir(f"{root}/dest", marker="marker.json") as staging:
            write_text(f"{staging}/a.txt", "new")
            raise RuntimeError("half way")
    assert _tree(store, f"{root}/dest")["a.txt"] == b"a"

    replace_dir(f"{root}/dest", f"{root}/moved", marker="marker.json")
    copy_dir(f"{root}/moved", f"{root}/copied", marker="marker.json")
    assert _tree(store, f"{root}/copied") == {"a.txt": b"a", "sub/b.txt": b"b", "marker.json": b"{}"}
    remove(f"{root}/copied")
    assert not exists(f"{root}/copied/a.txt")


def test_exists_and_read_text_see_what_another_client_wrote_after_a_listing_was_cached_on_gs(gcs):
    root = f"gs://{BUCKET}/another-client"
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as google_storage

    bucket = google_storage.Client(project="test", credentials=AnonymousCredentials()).bucket(BUCKET)
    folder = root.partition(f"{BUCKET}/")[2]
    bucket.blob(f"{folder}/a.txt").upload_from_string(b"first")
    assert gcs.ls(root) == [f"{BUCKET}/{folder}/a.txt"]  # the folder's listing is now cached

    bucket.blob(f"{folder}/b.txt").upload_from_string(b"new")
    bucket.blob(f"{folder}/a.txt").upload_from_string(b"first, and longer now")

    assert exists(f"{root}/b.txt")
    assert read_text(f"{root}/a.txt") == "first, and longer now"


def test_the_lock_names_its_holder_and_is_released(store, scheme, root):
    with FolderLock(root, stale_after=60, command="showtell run", settle=0.2) as first:
        assert read_owner(root).run_id == first.run_id
        if scheme == "s3":  # gcp-storage-emulator ignores the conditional write: see the next test
            with pytest.raises(LockHeldError, match=first.run_id):
                FolderLock(root, stale_after=60, settle=0.2).acquire()
    assert read_owner(root) is None
    with FolderLock(root, stale_after=60, settle=0.2) as second:  # released: the next run takes it
        assert read_owner(root).run_id == second.run_id


def test_the_lock_is_created_with_a_conditional_write_which_the_gcs_emulator_ignores(gcs):
    """gcsfs's `xb` sends ifGenerationMatch=0, which real GCS refuses for an existing object with
    412; gcp-storage-emulator overwrites instead. So on the emulator a second run could take a
    live lock: its refusal is tested on S3 (above) and local disks (test_lock.py), not on GCS."""
    path = f"{BUCKET}/conditional/.showtell.lock"
    with gcs.open(path, "xb") as handle:
        handle.write(b"first")
    with gcs.open(path, "xb") as handle:  # real GCS: FileExistsError
        handle.write(b"second")
    assert gcs.cat_file(path) == b"second"


def test_the_manifest_is_saved_and_loaded(store, root):
    manifest = Manifest.load(root)
    manifest.set_step("download", {"state": DONE, "fingerprint": "f" * 64})

    again = Manifest.load(root)

    assert again.step("download") == {"state": DONE, "fingerprint": "f" * 64}
    assert json.loads(store.cat_file(f"{root.partition('://')[2]}/manifest.json"))["steps"]["download"]["state"] == DONE


def test_evaluation_outputs(store, root):
    result = {
        "phase": 1, "step": 4, "kind": "final", "url": f"{root}/train/phase1/final", "global_step": 4,
        "seconds": 1.0, "status": "ok", "perplexity": 3.0, "metrics": {"CIDEr": 0.5},
        "blind": {"caption": "a", "p": 0.1, "metrics": {"CIDEr": 0.1}},
        "captions": [{"image_id": 1, "caption": "a red circle", "p": 0.2, "references": ["a red circle ."]}],
    }  # fmt: skip
    eval_settings = {"beam_size": 3, "max_caption_length": 20, "length_normalization": 0.0}
    summary = {"run_root": root, "eval_dir": f"{root}/eval", "model": {}, "eval": eval_settings}
    report = build_report([result], split="test", select_by="CIDEr", summary=summary, created="2026-01-01T00:00:00Z")

    write_report(f"{root}/eval", report, {})

    assert set(_tree(store, f"{root}/eval")) == {EVAL_REPORT_FILE, EVAL_HTML_FILE, BEST_FILE}
    assert read_json(f"{root}/eval/{BEST_FILE}")["checkpoint"]["url"] == result["url"]


@pytest.mark.slow
def test_export_and_promotion(store, root, tmp_path):
    from inference.export import export_saved_model
    from tests.captioning import publish_tiny_final

    final = publish_tiny_final(tmp_path)
    export = export_saved_model(final, f"{root}/export")  # TensorFlow writes locally; fsspec copies it up
    assert exists(f"{export}/saved_model.pb") and exists(f"{export}/showtell_export.json")

    models = f"{root}/models"
    first = promote(Candidate(export, {"CIDEr": 0.5}, root, {}), models, Gate("CIDEr"))
    worse = promote(Candidate(f"{root}/export", {"CIDEr": 0.4}, f"{root}-b", {}), models, Gate("CIDEr"))

    assert first["decision"] == "promoted" and worse["decision"] in ("promoted", "held_back")
    assert current_model(models)["promotion"]["id"] == first["id"]
    assert [record["id"] for record in read_history(models)] == [first["id"]]  # the same export: no new decision
    assert exists(f"{models}/current/saved_model.pb")


def test_download_mirrors_the_sample_to_the_store_through_the_cli(store, root, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_root": str(tmp_path / "run"),
                "data": {"source": "sample", "mirror": f"{root}/raw", "sample": {"train_images": 4, "val_images": 2}},
            }
        ),
        encoding="utf-8",
    )

    assert cli_main(["download", "--config", str(config)]) == 0
    assert cli_main(["download", "--config", str(config)]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["generated"] * 3 + ["skipped"] * 3, lines
    assert {f"raw/{name}" for name in MSCOCO_FILES} <= set(_tree(store, root))


def test_a_distributed_runner_with_a_gs_run_root_at_an_emulator_fails_naming_its_endpoint(gcs, tmp_path, capsys):
    """TensorFlow's GCS client (tf.Transform writes through it) reaches only Google's endpoint."""
    run_root = f"gs://{BUCKET}/dataflow-{tmp_path.name}"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run_root": run_root, "beam": {"runner": "DataflowRunner"}}), encoding="utf-8")

    assert cli_main(["-q", "preprocess", "--config", str(config)]) == 2

    error = capsys.readouterr().err.strip()
    assert "\n" not in error and run_root in error and "DataflowRunner" in error
    assert f"reaches only Google's endpoint, not {stores.gcs_endpoint()}" in error
    assert not gcs.exists(run_root)


def test_the_config_gcs_endpoint_wins_over_the_environment(gcs, monkeypatch):
    """storage.gcs.endpoint set, STORAGE_EMULATOR_HOST pointing nowhere: fsspec and pyarrow both go
    to the configured endpoint."""
    root = f"gs://{BUCKET}/config-endpoint"
    endpoint = stores.gcs_endpoint()  # the emulator's, from STORAGE_EMULATOR_HOST
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # discard port: nothing listens
    config = build_config({"run_root": f"{root}/run", "storage": {"gcs": {"endpoint": endpoint}}})

    stores.prepare(config)
    write_text(f"{root}/run/a.txt", "through gcsfs")
    path, filesystem = stores.arrow_filesystem(f"{root}/run")

    assert isinstance(filesystem, pyarrow.fs.GcsFileSystem)
    with filesystem.open_input_stream(f"{path}/a.txt") as handle:
        assert handle.read() == b"through gcsfs"
    assert stores.endpoint("gcs") == endpoint


def test_ray_storage_is_a_pyarrow_gcs_file_system_at_the_emulator(gcs):
    root = f"gs://{BUCKET}/ray-storage"
    from trainer.launcher import ray_storage

    storage_path, filesystem = ray_storage(f"{root}/train")

    assert storage_path == f"{BUCKET}/{root.partition(f'{BUCKET}/')[2]}/train"
    assert isinstance(filesystem, pyarrow.fs.GcsFileSystem)
    with filesystem.open_output_stream(f"{storage_path}/checkpoint_000001/state.json") as handle:
        handle.write(b'{"step": 1}')
    assert read_json(f"{root}/train/checkpoint_000001/state.json") == {"step": 1}  # gcsfs reads what pyarrow wrote
    listed = filesystem.get_file_info(pyarrow.fs.FileSelector(storage_path, recursive=True))
    assert [info.path for info in listed if info.is_file] == [f"{storage_path}/checkpoint_000001/state.json"]


def test_concurrent_writers_from_threads_all_get_through(store, root):
    """gcp-storage-emulator serves one request at a time; showtell's own concurrent clients (the
    lock's heartbeat beside the step's writes) still get through, as on S3."""
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            write_text(f"{root}/t/{i}.txt", str(i))
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and len(_tree(store, f"{root}/t")) == 6
