"""`showtell train` on a real multi-node Ray cluster on this machine, and the errors for clusters
that cannot take the workers.

`ray.cluster_utils.Cluster` starts a head and worker nodes here, each its own raylet (as
`ray start --head` and `ray start --address` would), with one `showtell_slot` each; every
training worker asks for one, so the two workers must run on two different nodes. `showtell
train` joins the cluster through `ray.address`, as it would join `ray up`'s or KubeRay's. All
nodes share this machine's disk, so the run root is a local path declared shared
(`ray.shared_filesystem`), and in one test a bucket on the S3 test server. The node-loss story
kills a worker node from outside (its raylet and every process of the node, SIGKILL) once the
first checkpoint is committed, then adds a replacement, as an autoscaler or an operator would (or
none: elastic training, and a node lost for good).
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from tests.test_train import (
    WorkerKiller,
    _config_file,
    _error_line,
    _final,
    _history,
    _run_root,
    _train,
    preprocess_sample,
)

pytestmark = pytest.mark.slow

SLOT = "showtell_slot"  # one per node, one per training worker: one worker per node
WORKER = {"CPU": 1, SLOT: 1}
NODE = {"num_cpus": 1, "resources": {SLOT: 1}, "object_store_memory": 100 * 1024**2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return preprocess_sample(tmp_path_factory.mktemp("prep"))


def _cluster(nodes: int):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    return cluster


@pytest.fixture
def one_node():
    cluster = _cluster(1)
    yield cluster
    cluster.shutdown()


@pytest.fixture
def two_nodes():
    cluster = _cluster(2)
    yield cluster
    cluster.shutdown()


# --- clusters that cannot take the workers --------------------------------------------------------


def _assert_error(capsys, run_root: Path, message: str) -> None:
    """The CLI's one line for a user's mistake in the phase's step, naming its log."""
    line = _error_line(capsys.readouterr())
    log = re.escape(str(run_root / "logs" / "train-phase1.log"))
    pattern = rf"showtell train: error: step train-phase1 failed after [\d.]+ s: {re.escape(message)} \(log: {log}\)"
    assert re.fullmatch(pattern, line), line


def test_use_gpu_on_a_local_cluster_without_gpus_is_refused_at_once(tmp_path, data_dir, capsys):
    import ray

    run_root = _run_root(tmp_path, data_dir)
    config = _config_file(tmp_path, run_root, {"steps": 2})
    started = time.monotonic()

    assert _train(config, 1, "ray.use_gpu=true") == 2

    assert time.monotonic() - started < 60  # Ray's own start took most of it
    _assert_error(capsys, run_root, (
        "ray: 2 training workers x {GPU: 1} = {GPU: 2}, but the local Ray cluster "
        "on this machine has {GPU: 0} (short of GPU): set ray.use_gpu=false, or join a cluster with GPUs "
        "through ray.address"
    ))
    assert not (run_root / "train").exists() and not ray.is_initialized()


def test_a_joined_cluster_that_cannot_place_the_workers_is_waited_on_then_named(
    tmp_path, data_dir, one_node, capsys, caplog
):
    run_root = _run_root(tmp_path, data_dir)
    config = _config_file(
        tmp_path, run_root, {"steps": 2}, address=one_node.address, resources_per_worker=WORKER, startup_timeout_s=3
    )
    started = time.monotonic()

    with caplog.at_level(logging.INFO, logger="showtell.train"):
        assert _train(config, 1) == 2

    assert time.monotonic() - started < 60
    cluster = f"the Ray cluster at {one_node.address}"
    asked = f"2 training workers x {{CPU: 1, {SLOT}: 1}} = {{CPU: 2, {SLOT}: 2}}"
    assert f"waiting up to 3 s (ray.startup_timeout_s) for {cluster} to place {asked}; it has" in caplog.text
    _assert_error(capsys, run_root, (
        f"ray: {cluster} could not place {asked} within ray.startup_timeout_s=3 s "
        f"(it has {{CPU: 1, {SLOT}: 1}}): lower ray.num_workers or ray.resources_per_worker, "
        "set ray.use_gpu=false, or add nodes"
    ))
    assert not (run_root / "train").exists()


def test_a_local_run_root_on_a_multi_node_cluster_is_refused_before_any_worker_starts(
    tmp_path, data_dir, two_nodes, capsys
):
    run_root = _run_root(tmp_path, data_dir)
    config = _config_file(tmp_path, run_root, {"steps": 2}, address=two_nodes.address, resources_per_worker=WORKER)

    assert _train(config, 1) == 2

    _assert_error(capsys, run_root, (
        f"run_root {run_root} is on this machine's disk, and training joins the Ray "
        f"cluster at {two_nodes.address} with 2 nodes: training workers on other nodes cannot read or write "
        "it. Put run_root on s3:// or gs://, or, if every node mounts it at the same path (NFS, a shared "
        "volume), set ray.shared_filesystem=true"
    ))
    assert not (run_root / "train").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ray.min_workers=3"], "ray.min_workers (3) is more than ray.num_workers (2)"),
        (
            ["ray.num_workers=4", "ray.min_workers=3", "train.phase1.batch_size=2"],
            "ray.min_workers: the global batch of 8 (ray.num_workers x batch_size) does not split evenly over 3 "
            "workers, which elastic training may run",
        ),
    ],
)
def test_elastic_worker_counts_that_cannot_train_are_refused_before_ray_starts(
    tmp_path, data_dir, capsys, overrides, message
):
    run_root = _run_root(tmp_path, data_dir)
    config = _config_file(tmp_path, run_root, {"steps": 2})

    assert _train(config, 1, *overrides) == 2

    _assert_error(capsys, run_root, message)


# --- two nodes, and one of them lost --------------------------------------------------------------


class NodeKiller(WorkerKiller):
    """Once Ray Train has committed `checkpoint`, kills `node` from outside, as a lost machine:
    SIGKILL to its raylet and every process it started (the training worker on it among them); then
    with `replace`, starts a replacement node with `ray start`, as an autoscaler would, and stops it
    on leaving. (Not `Cluster.add_node`: it sets up signal handlers, which only the main thread may.)
    `killed_pid` is the raylet's pid."""

    def __init__(self, phase_dir: Path, checkpoint: str, cluster, node, replace: bool):
        super().__init__(phase_dir, checkpoint)
        self.cluster, self.node, self.lost_node_id, self.replace = cluster, node, node.node_id, replace
        self.replacement: Optional[subprocess.Popen] = None

    def _kill(self) -> int:
        raylet = self.node.all_processes["raylet"][0].process.pid
        self.cluster.remove_node(self.node, allow_graceful=False)
        if not self.replace:
            return raylet
        self.replacement = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "ray"), "start", "--block", "--address", self.cluster.address,
                f"--num-cpus={NODE['num_cpus']}", "--resources", json.dumps(NODE["resources"]),
                f"--object-store-memory={NODE['object_store_memory']}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return raylet

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)
        finally:
            if self.replacement is not None:  # `ray start --block` stops its node's processes on SIGTERM
                self.replacement.terminate()
                self.replacement.wait(timeout=60)


def _lose_a_node(tmp_path: Path, data_dir: Path, cluster, replace: bool, **ray):
    """Phase 1 (6 steps, a checkpoint every 3, `ray.max_failures: 1`) on `cluster`'s two nodes; the
    worker node is lost after step 3's checkpoint (and replaced, with `replace`). Ray Train's controller
    polls the workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, left at Ray's default here): the
    kill must land between step 3's commit and step 6's, at least one poll apart."""
    run_root = _run_root(tmp_path, data_dir)
    config = _config_file(
        tmp_path, run_root, {"steps": 6, "checkpoint_every": 3},
        address=cluster.address, resources_per_worker=WORKER, shared_filesystem=True, max_failures=1, **ray,
    )
    worker_node = next(iter(cluster.worker_nodes))
    with NodeKiller(run_root / "train" / "phase1", "checkpoint_000000003", cluster, worker_node, replace) as killer:
        code = _train(config, 1)
    return run_root, code, cluster.head_node.node_id, killer


@pytest.fixture
def node_lost(tmp_path, data_dir, two_nodes):
    return _lose_a_node(tmp_path, data_dir, two_nodes, replace=True)


def test_two_workers_run_on_two_nodes_and_a_lost_node_costs_at_most_one_checkpoint_interval(node_lost):
    run_root, code, head, killer = node_lost
    assert code == 0
    history = _history(run_root, 1)
    # Each row names each rank's node, as the workers gathered them: before the loss the head and
    # the worker node, after it the head and the replacement.
    assert [(row["step"], row["resumed_from_step"]) for row in history] == [(3, 0), (6, 3)]
    first, second = (set(row["node_ids"]) for row in history)
    assert first == {head, killer.lost_node_id} and len(history[0]["node_ids"]) == 2
    replacement = second - {head}
    assert len(replacement) == 1 and killer.lost_node_id not in second and len(history[1]["node_ids"]) == 2
    state = json.loads((_final(run_root, 1) / "state.json").read_text())
    assert state["step"] == 6


def test_elastic_training_goes_on_with_one_worker_when_a_node_is_lost_for_good(
    tmp_path, data_dir, two_nodes, monkeypatch
):
    # Right after the loss, Ray's view of the cluster still holds the lost node: Ray Train first tries
    # two workers again, for RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default), then one.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    run_root, code, head, killer = _lose_a_node(tmp_path, data_dir, two_nodes, replace=False, min_workers=1)

    assert code == 0
    history = _history(run_root, 1)
    assert [(row["step"], row["resumed_from_step"]) for row in history] == [(3, 0), (6, 3)]
    assert set(history[0]["node_ids"]) == {head, killer.lost_node_id}
    assert history[1]["node_ids"] == [head]  # one worker, on the node left, at the same global batch
    state = json.loads((_final(run_root, 1) / "state.json").read_text())
    assert state["step"] == 6 and state["global_batch"] == 16


def test_a_node_lost_for_good_fails_the_phase_with_exit_1_once_ray_startup_timeout_s_has_passed(
    tmp_path, data_dir, two_nodes, monkeypatch, capsys
):
    # Ray Train tries to start the group again every RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, for
    # about ray.startup_timeout_s in all (Ray's default: forever).
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
    started = time.monotonic()
    run_root, code, _, _ = _lose_a_node(tmp_path, data_dir, two_nodes, replace=False, startup_timeout_s=10)

    assert code == 1  # not the user's mistake
    log = re.escape(str(run_root / "logs" / "train-phase1.log"))
    message = re.escape(
        "phase 1: Ray Train could not start the workers again within ray.startup_timeout_s=10 s: the cluster "
        f"cannot place 2 training workers x {{CPU: 1, {SLOT}: 1}} = {{CPU: 2, {SLOT}: 2}} (it has "
    )
    line = _error_line(capsys.readouterr())
    assert re.fullmatch(
        rf"showtell train: error: step train-phase1 failed after [\d.]+ s: TrainingFailed: {message}"
        rf"\{{[^}}]*\}}\); was a node lost for good\? \(log: {log}\)",
        line,
    ), line
    assert time.monotonic() - started < 240 and not _final(run_root, 1).exists()


def test_two_workers_on_two_nodes_train_with_run_root_on_s3(tmp_path, data_dir):
    """The issue's setting: run_root on the S3 test server (moto on 127.0.0.1), no shared disk. The
    nodes start inside the server's context, so their workers inherit its endpoint and keys."""
    from schemas.storage import copy_dir
    from tests.s3_server import s3_server

    bucket = "showtell-ray-cluster"
    with s3_server(tmp_path / "aws", buckets=[bucket]) as s3:
        cluster = _cluster(2)
        try:
            run_root = f"s3://{bucket}/run"
            copy_dir(str(data_dir), f"{run_root}/data")
            config = _config_file(
                tmp_path, run_root, {"steps": 6, "checkpoint_every": 3},
                address=cluster.address, resources_per_worker=WORKER,
            )
            assert _train(config, 1) == 0
            nodes = {cluster.head_node.node_id, *(node.node_id for node in cluster.worker_nodes)}
        finally:
            cluster.shutdown()
        s3.invalidate_cache()
        phase = f"{bucket}/run/train/phase1"
        history = [json.loads(line) for line in s3.cat_file(f"{phase}/history.jsonl").decode().splitlines()]
        assert json.loads(s3.cat_file(f"{phase}/final/state.json"))["step"] == 6
    assert [row["step"] for row in history] == [3, 6]
    assert all(set(row["node_ids"]) == nodes and len(row["node_ids"]) == 2 for row in history)
