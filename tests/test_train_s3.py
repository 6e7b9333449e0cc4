"""`showtell train --phase 1` with run_root on S3 (moto on 127.0.0.1, tests/s3_server.py): the workers
read the shards through the shard cache (trainer/shard_cache.py) the config sets. A whole run on S3,
checkpoints and resume included, is tests/test_run_on_stores.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestration.cli import main as cli_main
from schemas.storage import copy_dir
from tests.s3_server import s3_fixture
from tests.test_train import MODEL

pytestmark = pytest.mark.slow

BUCKET = "showtell-train-test"


s3 = s3_fixture(BUCKET)  # a moto S3 server on 127.0.0.1 with BUCKET; an s3fs file system on it


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> Path:
    """The sample set's records, preprocessed once on local disk (copied to S3 by each test)."""
    from pipelines.preprocess import run_preprocess
    from pipelines.sample_data import generate_sample_data
    from schemas.config import build_config

    local = tmp_path_factory.mktemp("prep")
    generate_sample_data(str(local / "raw"), train_images=40, val_images=20, seed=0, image_size=64)
    tree = {
        "run_root": str(local),
        "data": {"shards": {"train": 4, "val": 1, "test": 1}},
        "beam": {"direct_running_mode": "in_memory", "direct_num_workers": 1},
    }
    run_preprocess(build_config(tree))
    return local / "data"


def _train_on_s3(preprocessed: Path, tmp_path: Path, name: str, train: dict) -> int:
    """`showtell -q train --phase 1` on `s3://BUCKET/<name>`, which gets the records; its exit code."""
    import ray

    run_root = f"s3://{BUCKET}/{name}"
    copy_dir(str(preprocessed), f"{run_root}/data")
    config = tmp_path / "train.yaml"
    tree = {"run_root": run_root, "model": MODEL, "train": train, "ray": {"num_workers": 2}}
    config.write_text(yaml.safe_dump(tree), encoding="utf-8")
    # A cluster of this test's own (the launcher uses an initialised Ray as it is): a `ray start`
    # cluster elsewhere on the machine is not joined, and the workers inherit the S3 endpoint.
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        return cli_main(["-q", "train", "--config", str(config), "--phase", "1"])
    finally:
        ray.shutdown()


def test_the_training_workers_read_through_the_configured_shard_cache(s3, preprocessed, tmp_path, capsys):
    # A bound no reader can work in: the workers refuse it before reading, naming the key, which
    # they can only do with the config's train.shard_cache (its default, 2 GiB, would train).
    train = {
        "shuffle_buffer": 64,
        "shard_cache": {"max_bytes": 1000},
        "phase1": {"batch_size": 8, "steps": 4, "checkpoint_every": 2},
    }
    capsys.readouterr()

    assert _train_on_s3(preprocessed, tmp_path, "tiny-cache", train) == 2

    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("showtell train: error: ")]
    assert len(ours) == 1  # Ray's driver forwards its workers' lines to this process's stderr too
    error = ours[0]
    assert error.startswith("showtell train: error: step train-phase1 failed after ")
    assert "phase 1: train.shard_cache.max_bytes is 1,000 bytes, less than the " in error
