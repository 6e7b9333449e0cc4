"""`showtell evaluate`'s reads from S3 (moto on 127.0.0.1, tests/s3_server.py): the test split's
references, images and perplexity come from s3:// shards, and the report equals a local run's."""
from __future__ import annotations

import json

import pytest

from schemas.config import build_config
from schemas.storage import copy_dir
from tests.s3_server import s3_fixture
from tests.test_evaluate import untrained_run  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow

BUCKET = "showtell-eval-test"


s3 = s3_fixture(BUCKET)  # a moto S3 server on 127.0.0.1 with BUCKET; an s3fs file system on it


def _scores(report: dict) -> list[tuple]:
    return [
        (c["phase"], c["step"], c["status"], c.get("perplexity"), c.get("metrics"), c.get("captions"))
        for c in report["checkpoints"]
    ]


def test_evaluation_of_a_run_root_on_s3_reads_the_split_there_and_scores_as_a_local_one(s3, untrained_run):  # noqa: F811
    from pipelines.evaluate import run_evaluate

    local_root = untrained_run.run_root
    run_root = f"s3://{BUCKET}/run"
    for folder in ("data", "train"):
        copy_dir(f"{local_root}/{folder}", f"{run_root}/{folder}")
    on_s3 = build_config({**untrained_run.model_dump(mode="json", exclude={"run_root"}), "run_root": run_root})

    local_report = run_evaluate(untrained_run)
    s3_report = run_evaluate(on_s3)

    assert _scores(s3_report) == _scores(local_report)
    statuses = [c["status"] for c in s3_report["checkpoints"]]
    assert statuses == [c["status"] for c in local_report["checkpoints"]] and statuses.count("ok") == 2
    s3.invalidate_cache()
    assert json.loads(s3.cat_file(f"{BUCKET}/run/eval/report.json"))["checkpoints"] == s3_report["checkpoints"]
