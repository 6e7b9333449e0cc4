"""Phase 1's feature cache (pipelines/feature_cache.py) on generated sample records: a real Beam
pipeline builds it, a real Ray Train phase 1 trains from it (through a worker SIGKILLed from
outside), and phase 2 fine-tunes the whole model from that phase's final checkpoint.

The encoder's weights are a file this module saves (a random MobileNet, as no weights can be
downloaded here): the cache needs weights that every process loads alike.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from schemas.config import Config, Model, build_config
from schemas.feature_records import decode_feature_example
from schemas.records import decode_sequence_example
from schemas.tfrecord import read_records
from tests.test_train import (  # noqa: F401 - _fast_ray_polls: an autouse fixture, for this module too
    MODEL,
    WorkerKiller,
    _config_file,
    _fast_ray_polls,
    _final,
    _history,
    _train,
    preprocess_sample,
)

pytestmark = pytest.mark.slow

VIEWS = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return preprocess_sample(tmp_path_factory.mktemp("prep"))


def _save_encoder_weights(path: Path, seed: int) -> str:
    import keras

    from trainer.model import build_encoder

    keras.utils.set_random_seed(seed)
    build_encoder(Model(**MODEL)).save_weights(str(path))
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("weights")
    return {name: _save_encoder_weights(folder / f"{name}.weights.h5", seed) for name, seed in (("a", 1), ("b", 2))}


def _model(weights: str) -> dict:
    return {**MODEL, "encoder_weights": weights}


def _cache_config(run_root: Path, weights: str, **cache) -> Config:
    return build_config(
        {
            "run_root": str(run_root),
            "data": {"shards": {"train": 4, "val": 1, "test": 1}},
            "beam": {"direct_running_mode": "in_memory", "direct_num_workers": 1},
            "model": _model(weights),
            "train": {"random_flip": False, "phase1": {"feature_cache": {"enabled": True, "views": VIEWS, **cache}}},
        }
    )


def _run_root(tmp_path: Path, data_dir: Path) -> Path:
    run_root = tmp_path / "run"
    shutil.copytree(data_dir, run_root / "data")
    return run_root


def _shard_stats(cache_dir: Path) -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in sorted(cache_dir.iterdir())}


def _cached_images(cache_dir: Path, split: str) -> dict[int, dict]:
    images = {}
    for shard in sorted(cache_dir.glob(f"{split}-*")):
        with shard.open("rb") as handle:
            for record in read_records(handle):
                image = decode_feature_example(record)
                images[image["image_id"]] = image
    return images


def _data_images(data_dir: Path, split: str) -> dict[int, dict]:
    """{image id: {"jpeg", "captions"}} of the data's records."""
    images: dict[int, dict] = {}
    for shard in sorted(data_dir.glob(f"{split}-*")):
        with shard.open("rb") as handle:
            for record in read_records(handle):
                example = decode_sequence_example(record)
                image = images.setdefault(example["image_id"], {"jpeg": example["jpeg"], "captions": []})
                image["captions"].append(example["ids"])
    return images


@pytest.fixture(scope="module")
def built(tmp_path_factory, data_dir, weights):
    """One cache, built once for the tests that only read it."""
    from pipelines.feature_cache import ensure_feature_cache

    run_root = _run_root(tmp_path_factory.mktemp("built"), data_dir)
    config = _cache_config(run_root, weights["a"])
    return config, ensure_feature_cache(config)


def test_the_cache_holds_every_image_once_with_all_its_captions_and_its_views(built, data_dir):
    config, summary = built
    cache_dir = Path(config.feature_cache_dir)
    for split, views in (("train", VIEWS), ("val", 1)):
        cached, data = _cached_images(cache_dir, split), _data_images(data_dir, split)
        assert sorted(cached) == sorted(data)
        assert summary["images"][split] == len(data)
        for image_id, image in cached.items():
            assert image["features"].shape == (views, summary["feature_size"])
            assert image["captions"] == sorted(data[image_id]["captions"])
    assert summary["built"] is True and summary["why"] == "no cache built yet"


def test_view_0_is_the_encoders_features_of_the_central_crop_and_the_other_views_differ(built, data_dir, weights):
    from trainer.inputs import preprocess_image
    from trainer.model import build_encoder

    config, _ = built
    encoder = build_encoder(config.model)
    data = _data_images(data_dir, "train")
    for image_id, image in list(_cached_images(Path(config.feature_cache_dir), "train").items())[:5]:
        central = preprocess_image(tf.constant(data[image_id]["jpeg"]), config.model.image_size, training=False)
        expected = encoder(central[tf.newaxis], training=False).numpy()[0]
        scale = float(np.abs(expected).max())  # a random MobileNet's features are ~1e-10
        np.testing.assert_allclose(image["features"][0], expected, rtol=1e-3, atol=1e-3 * scale)
        assert not np.allclose(image["features"][1], image["features"][0], rtol=1e-2, atol=0)
        assert not np.allclose(image["features"][1], image["features"][2], rtol=1e-2, atol=0)


def test_a_second_build_with_the_same_key_rebuilds_nothing(built):
    from pipelines.feature_cache import ensure_feature_cache

    config, first = built
    before = _shard_stats(Path(config.feature_cache_dir))

    again = ensure_feature_cache(config)

    assert again["built"] is False and again["key"] == first["key"]
    assert _shard_stats(Path(config.feature_cache_dir)) == before  # the same files, untouched


@pytest.mark.parametrize(
    "change, part",
    [
        ({"views": 2}, "views"),
        ({"seed": 7}, "seed"),
        ({"weights": "b"}, "encoder_weights"),
        ({"random_flip": True}, "preprocessing"),
        ({"image_size": 80}, "image_size"),
        ({"data": True}, "data"),
    ],
)
def test_a_change_to_any_part_of_the_key_rebuilds_the_cache_naming_it(tmp_path, data_dir, weights, change, part):
    from pipelines.feature_cache import ensure_feature_cache

    run_root = _run_root(tmp_path, data_dir)
    first = ensure_feature_cache(_cache_config(run_root, weights["a"]))
    cache = {key: change[key] for key in ("views", "seed") if key in change}
    config = _cache_config(run_root, weights[change.get("weights", "a")], **cache)
    if "random_flip" in change:
        config.train.random_flip = change["random_flip"]
    if "image_size" in change:
        config.model.image_size = change["image_size"]
    if "data" in change:  # one train shard loses its last record, as a new preprocessing would change it
        shard = sorted((run_root / "data").glob("train-*"))[0]
        with shard.open("rb") as handle:
            records = list(read_records(handle))
        from schemas.tfrecord import write_records

        with shard.open("wb") as handle:
            write_records(handle, records[:-1])

    rebuilt = ensure_feature_cache(config)

    assert rebuilt["built"] is True and rebuilt["key"] != first["key"]
    assert rebuilt["why"] == f"its key changed ({part})"
    assert json.loads((run_root / "feature_cache" / "cache.json").read_text())["key"] == rebuilt["key"]


def test_a_truncated_shard_is_found_and_the_cache_rebuilt_the_same(tmp_path, data_dir, weights):
    from pipelines.feature_cache import ensure_feature_cache

    run_root = _run_root(tmp_path, data_dir)
    config = _cache_config(run_root, weights["a"])
    ensure_feature_cache(config)
    shard = sorted((run_root / "feature_cache").glob("train-*"))[0]
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])

    rebuilt = ensure_feature_cache(config)

    assert rebuilt["built"] is True
    assert rebuilt["why"] == (
        f"shard {shard.name} is {len(whole) // 2} bytes, cache.json says {len(whole)} (truncated or overwritten)"
    )
    assert shard.read_bytes() == whole  # the same seed, the same views: byte for byte


def test_training_from_a_truncated_shard_fails_loudly_rather_than_reading_garbage(built, tmp_path):
    from trainer.inputs import make_feature_dataset

    config, summary = built
    shard = sorted(Path(config.feature_cache_dir).glob("train-*"))[0]
    truncated = tmp_path / shard.name
    truncated.write_bytes(shard.read_bytes()[:-100])

    dataset = make_feature_dataset(
        [str(truncated)], feature_size=summary["feature_size"], batch_size=2, training=False
    )
    with pytest.raises(tf.errors.DataLossError):
        list(dataset.as_numpy_iterator())


def test_the_cache_dataset_gives_one_example_per_caption_with_one_of_its_images_views(built, data_dir):
    from trainer.inputs import make_feature_dataset, shard_files

    config, summary = built
    cached = _cached_images(Path(config.feature_cache_dir), "train")
    files = shard_files(config.feature_cache_dir, "train")
    captions = sum(len(image["captions"]) for image in cached.values())
    dataset = make_feature_dataset(
        files, feature_size=summary["feature_size"], batch_size=captions, training=True, repeat=False
    )  # one epoch, one batch

    features, targets, mask = next(iter(dataset))

    assert features["features"].shape == (captions, summary["feature_size"])
    views = {tuple(view) for image in cached.values() for view in image["features"]}
    drawn = {tuple(row) for row in features["features"].numpy()}
    assert drawn <= views
    firsts = {tuple(image["features"][0]) for image in cached.values()}
    assert drawn - firsts, "only central crops were drawn"
    assert int(tf.reduce_sum(mask)) == sum(len(c) - 1 for image in cached.values() for c in image["captions"])


def test_phase1_from_the_cache_resumes_after_a_worker_is_killed_and_phase2_fine_tunes_its_final(
    tmp_path, data_dir, weights
):
    import ray

    from trainer import checkpoints as ckpt

    run_root = _run_root(tmp_path, data_dir)
    cache = {"feature_cache": {"enabled": True, "views": VIEWS}}
    config = _config_file(
        tmp_path, run_root, {"steps": 6, "checkpoint_every": 3, **cache}, {"steps": 2}, max_failures=1
    )
    tree = yaml.safe_load(config.read_text())
    tree["model"] = _model(weights["a"])
    config.write_text(yaml.safe_dump(tree))

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        with WorkerKiller(run_root / "train" / "phase1", "checkpoint_000000003") as killer:
            assert _train(config, 1) == 0
        assert _train(config, 2) == 0
    finally:
        ray.shutdown()

    assert killer.killed_pid is not None
    assert [(row["step"], row["resumed_from_step"]) for row in _history(run_root, 1)] == [(3, 0), (6, 3)]
    assert (run_root / "feature_cache" / "cache.json").exists()
    phase1 = json.loads((_final(run_root, 1) / "state.json").read_text())
    phase2 = json.loads((_final(run_root, 2) / "state.json").read_text())
    assert phase2["init_fingerprint"] == phase1["fingerprint"]  # phase 2 loaded phase 1's whole model
    assert phase2["step"] == 2
    # The cache's phase 1 kept the encoder it was built from: its final/ holds those weights.
    from trainer.model import build_encoder

    model_cfg = Model(**_model(weights["a"]))
    loaded = ckpt.build_inference_model(model_cfg, (_final(run_root, 1) / "word_counts.txt").read_text())
    loaded.load_weights(str(_final(run_root, 1) / "model.weights.h5"))
    assert ckpt.weights_fingerprint(loaded.encoder) == ckpt.weights_fingerprint(build_encoder(model_cfg))


@pytest.mark.parametrize("enabled, init_from", [(True, "none"), (False, "none"), (True, "/models/a/final")])
def test_status_lists_the_cache_among_train_phase1s_outputs_when_phase1_trains_from_it(
    tmp_path, weights, enabled, init_from
):
    from orchestration.run import step_status

    config = _cache_config(tmp_path / "run", weights["a"])
    config.train.phase1.feature_cache.enabled = enabled
    config.train.init_from = init_from  # a warm start trains no phase 1, so builds no cache

    rows = {row.name: row for row in step_status(config)}

    cache_json = str(tmp_path / "run" / "feature_cache" / "cache.json")
    assert ((cache_json, False) in rows["train-phase1"].outputs) is (enabled and init_from == "none")
