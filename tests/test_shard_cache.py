"""Training and evaluation read shards from any fsspec URL (trainer/shard_cache.py, trainer/inputs.py,
pipelines/eval_inputs.py): the same shards on local disk and on a real S3 server on 127.0.0.1
(moto, tests/s3_server.py) give the same records, through a local cache that stays within its bound."""
from __future__ import annotations

import io
import itertools
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipelines.eval_inputs import shard_records
from schemas.config import ShardCache as ShardCacheConfig
from schemas.errors import ShowtellError
from schemas.records import encode_sequence_example, shard_name
from schemas.tfrecord import write_records
from tests.s3_server import s3_server
from trainer import inputs
from trainer.shard_cache import Shard, ShardCache, stat_shards

BUCKET = "shard-cache-test"
SHARDS = 6
RECORDS_PER_SHARD = 7
IMAGE_SIZE = 32


def _jpeg(seed: int) -> bytes:
    """A 48x40 JPEG of noise: ~3-4 KB, different for every record, so shards differ in size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("aws"), buckets=[BUCKET]) as fs:
        yield fs


@pytest.fixture(scope="module")
def shards(s3, tmp_path_factory) -> dict:
    """SHARDS train shards of RECORDS_PER_SHARD records, on local disk and the same bytes on S3."""
    local = tmp_path_factory.mktemp("data")
    for shard in range(SHARDS):
        ids = range(shard * RECORDS_PER_SHARD, (shard + 1) * RECORDS_PER_SHARD)
        name = shard_name("train", shard, SHARDS)
        with open(local / name, "wb") as handle:
            write_records(handle, (encode_sequence_example(i, _jpeg(i), ["<S>", "w", "</S>"], [1, 3, 2]) for i in ids))
        s3.put_file(str(local / name), f"{BUCKET}/data/{name}")
    return {
        "local": inputs.shard_files(str(local), "train"),
        "s3": inputs.shard_files(f"s3://{BUCKET}/data", "train"),
        "largest": max(os.path.getsize(path) for path in local.iterdir()),
    }


def _records(files: list[str], count: int, **settings) -> list[bytes]:
    options = tf.data.Options()
    options.deterministic = True
    dataset = inputs.read_records(files, **settings).with_options(options)
    return list(dataset.take(count).as_numpy_iterator())


class DiskHighWater:
    """Polls the bytes of every file under `root` (a thread, every millisecond) while in use."""

    def __init__(self, root: Path):
        self.root, self.peak, self.samples = root, 0, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._done.is_set():
            total = 0
            for folder, _, names in os.walk(self.root):
                for name in names:
                    try:
                        total += os.path.getsize(os.path.join(folder, name))
                    except FileNotFoundError:  # deleted between listing and stat
                        pass
            self.peak, self.samples = max(self.peak, total), self.samples + 1
            time.sleep(0.001)

    def __enter__(self) -> "DiskHighWater":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def test_shard_files_on_s3_are_the_splits_shard_urls_sorted(shards):
    assert shards["s3"] == [f"s3://{BUCKET}/data/{shard_name('train', i, SHARDS)}" for i in range(SHARDS)]


@pytest.mark.parametrize(
    "settings",
    [
        {"training": False},
        {"training": True, "seed": 0, "repeat": True},
        {"training": True, "seed": 7, "repeat": True},
        {"training": True, "seed": 7, "repeat": True, "input_context": tf.distribute.InputContext(2, 1)},
    ],
    ids=["evaluation", "training_seed_0", "training_seed_7", "training_second_of_two_pipelines"],
)
def test_records_from_s3_are_byte_identical_to_local_disk_in_the_same_order(shards, tmp_path, settings):
    count = SHARDS * RECORDS_PER_SHARD * (3 if settings.get("repeat") else 1)  # three epochs when repeating
    cache = ShardCacheConfig(folder=str(tmp_path), max_bytes=5 * shards["largest"])

    from_s3 = _records(shards["s3"], count, cache=cache, **settings)
    from_local = _records(shards["local"], count, **settings)

    assert len(from_s3) == len(from_local) == count
    assert from_s3 == from_local


def test_each_epoch_reads_the_shards_in_a_new_order_by_seed(shards):
    order = list(itertools.islice(inputs.file_order(SHARDS, seed=3, shuffle=True, repeat=True), 2 * SHARDS))

    assert sorted(order[:SHARDS]) == sorted(order[SHARDS:]) == list(range(SHARDS))
    assert order[:SHARDS] != order[SHARDS:]
    assert list(inputs.file_order(SHARDS, seed=0, shuffle=False, repeat=False)) == list(range(SHARDS))
    epoch = SHARDS * RECORDS_PER_SHARD
    seed_3 = _records(shards["local"], epoch, training=True, seed=3, repeat=True)
    assert seed_3 != _records(shards["local"], epoch, training=True, seed=4, repeat=True)


def test_evaluation_batches_from_s3_equal_those_from_local_disk(shards, tmp_path):
    def batches(files, **cache):
        dataset = inputs.make_dataset(files, image_size=IMAGE_SIZE, batch_size=8, training=False, **cache)
        return list(dataset.as_numpy_iterator())

    cache = ShardCacheConfig(folder=str(tmp_path), max_bytes=5 * shards["largest"])
    from_s3, from_local = batches(shards["s3"], shard_cache_config=cache), batches(shards["local"])

    assert len(from_s3) == len(from_local) == -(-SHARDS * RECORDS_PER_SHARD // 8)
    for (features_s3, targets_s3, mask_s3), (features, targets, mask) in zip(from_s3, from_local):
        np.testing.assert_array_equal(features_s3["images"], features["images"])
        np.testing.assert_array_equal(features_s3["input_seqs"], features["input_seqs"])
        np.testing.assert_array_equal(targets_s3, targets)
        np.testing.assert_array_equal(mask_s3, mask)


def test_the_cache_never_holds_more_than_its_bound_on_disk_over_three_epochs(shards, tmp_path):
    bound = 5 * shards["largest"]  # the least it accepts: 4 shards read at once and the next
    cache = ShardCacheConfig(folder=str(tmp_path), max_bytes=bound)
    epochs = 3
    dataset = inputs.make_dataset(
        shards["s3"], image_size=IMAGE_SIZE, batch_size=6, training=True, seed=1, shuffle_buffer=0,
        shard_cache_config=cache,
    )  # fmt: skip

    with DiskHighWater(tmp_path) as disk:
        batches = list(dataset.take(epochs * SHARDS * RECORDS_PER_SHARD // 6))
        time.sleep(0.05)

    assert len(batches) == epochs * SHARDS * RECORDS_PER_SHARD // 6
    total = sum(os.path.getsize(path) for path in shards["local"])
    assert disk.samples > 10
    # 18 shard downloads, never more than the bound on disk at once, and some shards were there together.
    assert shards["largest"] < disk.peak <= bound < total
    assert not list(tmp_path.iterdir())  # the iterator is gone: its folder with it


def test_a_shard_is_on_disk_from_its_download_until_its_release_and_the_next_waits_for_room(s3, shards, tmp_path):
    listed = stat_shards(shards["s3"][:3])
    largest = max(shard.size for shard in listed)
    cache = ShardCache(iter(listed), folder=str(tmp_path), max_bytes=2 * largest)
    try:
        first, second = cache.path(0), cache.path(1)
        time.sleep(0.3)  # time enough for a third download, were there room
        assert sorted(os.listdir(cache.folder)) == sorted(os.path.basename(p) for p in (first, second))
        assert Path(first).read_bytes() == s3.cat_file(shards["s3"][0])

        cache.release(first)

        third = cache.path(2)
        assert not os.path.exists(first) and os.path.exists(second) and os.path.exists(third)
        assert Path(third).read_bytes() == s3.cat_file(shards["s3"][2])
        cache.release(second)
        cache.release(third)
        assert os.listdir(cache.folder) == []
        with pytest.raises(IndexError):
            cache.path(3)
        assert largest < cache.high_water_bytes <= 2 * largest
    finally:
        cache.close()
    assert not os.path.exists(cache.folder)


def test_a_local_shard_is_read_in_place_without_a_cache_folder(shards, tmp_path):
    cache = ShardCacheConfig(folder=str(tmp_path / "cache"), max_bytes=1)  # would refuse any remote shard

    assert len(_records(shards["local"], 1000, training=False, cache=cache)) == SHARDS * RECORDS_PER_SHARD
    assert not (tmp_path / "cache").exists()


def test_a_missing_shard_is_one_line_naming_its_url(shards):
    missing = f"s3://{BUCKET}/data/{shard_name('train', SHARDS, SHARDS + 1)}"

    with pytest.raises(ShowtellError) as error:
        inputs.read_records([*shards["s3"], missing], training=True)

    assert str(error.value) == f"cannot read {missing}: no such shard"


def test_a_bucket_that_does_not_exist_is_one_line_naming_the_url(s3):
    with pytest.raises(ShowtellError) as listing:
        inputs.shard_files("s3://no-such-bucket-here/data", "train")
    with pytest.raises(ShowtellError) as reading:
        inputs.read_records(["s3://no-such-bucket-here/data/train-00000-of-00001"], training=False)

    for error in (listing, reading):
        assert "\n" not in str(error.value) and "s3://no-such-bucket-here/data" in str(error.value)


def test_a_bound_below_five_of_the_largest_shards_is_an_error_naming_the_key(shards, tmp_path):
    cache = ShardCacheConfig(folder=str(tmp_path), max_bytes=5 * shards["largest"] - 1)

    with pytest.raises(ShowtellError, match=r"^train\.shard_cache\.max_bytes is .* set it to at least "):
        inputs.read_records(shards["s3"], training=True, cache=cache)


def test_shards_of_any_size_listed_once_per_folder(shards):
    listed = stat_shards(shards["s3"] + shards["local"])

    assert [shard.url for shard in listed] == shards["s3"] + shards["local"]
    assert [shard.size for shard in listed[:SHARDS]] == [os.path.getsize(p) for p in shards["local"]]
    assert [shard.size for shard in listed[SHARDS:]] == [os.path.getsize(p) for p in shards["local"]]
    assert isinstance(listed[0], Shard)


def test_evaluation_reads_the_same_records_and_perplexity_from_s3_as_from_local_disk(shards, tmp_path):
    import keras

    from schemas.config import Model
    from trainer.model import build_model
    from trainer.validation import model_perplexity

    assert [list(shard_records(url)) for url in shards["s3"]] == [list(shard_records(p)) for p in shards["local"]]
    keras.utils.set_random_seed(0)
    model = build_model(
        Model(encoder="mobilenet_v3_small", image_size=IMAGE_SIZE, encoder_weights="none", embedding_size=8,
              num_lstm_units=8),
        vocab_size=4,
    )  # fmt: skip
    cache = {"folder": str(tmp_path), "max_bytes": 5 * shards["largest"]}

    from_s3 = model_perplexity(model, shards["s3"], IMAGE_SIZE, batch_size=16, shard_cache=cache)

    assert from_s3 == pytest.approx(model_perplexity(model, shards["local"], IMAGE_SIZE, batch_size=16), rel=1e-6)
    assert not list(tmp_path.iterdir())
