"""Ray Train's checkpoints on the object stores: `trainer.launcher.ray_storage` gives RunConfig a
pyarrow file system at the store's endpoint (moto's S3 server, gcp-storage-emulator, both on
127.0.0.1), and a Ray Train run with it writes its checkpoints there, from a worker process that
gets the file system pickled, as on a cluster; fsspec then reads what pyarrow wrote.
"""
from __future__ import annotations

import json
import os
import tempfile

import pyarrow.fs
import pytest

from schemas.storage import read_json
from tests.gcs_server import gcs_server, store_settings_restored
from tests.s3_server import s3_server
from trainer.launcher import ray_storage

BUCKET = "showtell-ray"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("aws"), buckets=[BUCKET]), gcs_server(buckets=[BUCKET]):
        yield


@pytest.fixture(scope="module")
def ray_local(stores):
    import ray

    # A new local cluster (not one another test started), after the servers: its workers inherit their environment.
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def _report_two_checkpoints(config: dict) -> None:
    import ray.train

    for step in (1, 2):
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "state.json"), "w", encoding="utf-8") as handle:
                json.dump({"step": step}, handle)
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(folder))


@pytest.mark.slow
@pytest.mark.parametrize(("scheme", "kind"), [("s3", pyarrow.fs.S3FileSystem), ("gs", pyarrow.fs.GcsFileSystem)])
def test_ray_train_keeps_its_checkpoints_on_the_store(ray_local, scheme, kind):
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    with store_settings_restored():
        train_dir = f"{scheme}://{BUCKET}/run/train"
        storage_path, filesystem = ray_storage(train_dir)
        assert storage_path == f"{BUCKET}/run/train" and isinstance(filesystem, kind)

        result = DataParallelTrainer(
            _report_two_checkpoints,
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(
                name="phase1",
                storage_path=storage_path,
                storage_filesystem=filesystem,
                checkpoint_config=CheckpointConfig(num_to_keep=1),
            ),
        ).fit()

        latest = result.checkpoint.path
        assert latest.startswith(f"{BUCKET}/run/train/phase1/checkpoint_")
        assert read_json(f"{scheme}://{latest}/state.json") == {"step": 2}  # fsspec reads what pyarrow wrote
        listed = filesystem.get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/run/train/phase1", recursive=True))
        states = [info.path for info in listed if info.base_name == "state.json"]
        assert states == [f"{latest}/state.json"]  # num_to_keep=1: the first checkpoint was deleted there
