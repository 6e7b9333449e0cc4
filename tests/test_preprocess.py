"""The preprocessing pipeline, end to end on a real DirectRunner (multi-processing) with tf.Transform.

One pipeline run on a sample set seeded with every bad input the issue names is shared by the
assertions below; a second run checks byte-for-byte determinism.
"""

from __future__ import annotations

import collections
import io
import json
from pathlib import Path

import pytest

from orchestration.cli import main as cli_main
from pipelines.captions import split_of_val_position, tokenize_caption
from pipelines.data_checks import data_statistics
from pipelines.preprocess import run_preprocess
from pipelines.preprocess_report import parse_word_frequencies
from schemas import progress, records
from schemas.config import build_config
from schemas.layout import PREPROCESS_REPORT_FILE, RECORD_SCHEMA_FILE, WORD_FREQUENCIES_FILE
from schemas.tfrecord import read_records
from schemas.vocabulary import WORD_COUNTS_FILE, parse_word_counts
from tests.datasets import Layout, make_defective_dataset

pytestmark = pytest.mark.slow

SHARDS = {"train": 3, "val": 2, "test": 2}


def _config(mirror: Path, run_root: Path, max_image_pixels: int):
    return build_config(
        {
            "run_root": str(run_root),
            "data": {"mirror": str(mirror), "shards": SHARDS, "max_image_pixels": max_image_pixels},
            "beam": {"direct_num_workers": 2},
        }
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_defective_dataset(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def display() -> io.StringIO:
    """What the shared run's progress display printed: plain lines, as off a terminal."""
    return io.StringIO()


@pytest.fixture(scope="module")
def preprocessed(dataset, display, tmp_path_factory):
    run_root = tmp_path_factory.mktemp("run")
    progress.configure(display, bar=False, every=60.0)
    try:
        report = run_preprocess(_config(dataset.root, run_root, dataset.max_image_pixels))
    finally:
        progress.configure(None, bar=False)
    data_dir = run_root / "data"
    written = {
        split: [
            records.decode_sequence_example(r) for name in records.shard_names(split, n) for r in _read(data_dir / name)
        ]
        for split, n in SHARDS.items()
    }
    return report, data_dir, written


def _read(path: Path) -> list[bytes]:
    with open(path, "rb") as handle:
        return list(read_records(handle))


def _expected_splits(layout: Layout) -> dict[int, str]:
    splits = {image["id"]: "train" for image in layout.train_json["images"]}
    val_images = layout.val_json["images"]
    for position, image in enumerate(val_images):
        splits[image["id"]] = split_of_val_position(position, len(val_images))
    return splits


def test_every_shard_exists_with_im2txt_names(preprocessed):
    _, data_dir, _ = preprocessed
    expected = {name for split, n in SHARDS.items() for name in records.shard_names(split, n)}
    present = {p.name for p in data_dir.iterdir() if p.name.split("-")[0] in SHARDS}
    assert present == expected
    assert (data_dir / "transform_fn").is_dir() and (data_dir / "schema.pbtxt").is_file()
    assert not list(data_dir.parent.glob("data.staging-*")) and not list((data_dir.parent / "tmp").glob("*"))


def test_records_hold_each_split_exactly_its_images_and_captions(preprocessed, dataset):
    _, _, written = preprocessed
    layout = Layout.read(dataset.root)
    splits = _expected_splits(layout)
    captions = collections.defaultdict(list)
    for document in (layout.train_json, layout.val_json):
        for annotation in document["annotations"]:
            if annotation["caption"].strip() and annotation["image_id"] in splits:
                captions[annotation["image_id"]].append(tokenize_caption(annotation["caption"].strip()))
    skipped = set(dataset.skipped)
    for split in SHARDS:
        got = collections.Counter((r["image_id"], tuple(r["tokens"])) for r in written[split])
        want = collections.Counter(
            (image_id, tokens)
            for image_id, s in splits.items()
            if s == split and image_id not in skipped
            for tokens in captions[image_id]
        )
        assert got == want, split
    assert sum(len(v) for v in written.values()) > 200


def test_caption_ids_agree_with_word_counts(preprocessed):
    _, data_dir, written = preprocessed
    vocabulary = parse_word_counts((data_dir / WORD_COUNTS_FILE).read_text(encoding="utf-8"))
    index = {word: i for i, word in enumerate(vocabulary.words)}
    unknown = len(vocabulary.words)
    all_records = [r for split in written.values() for r in split]
    for record in all_records:
        assert record["ids"] == [index.get(token, unknown) for token in record["tokens"]]
    assert any(unknown in r["ids"] for r in all_records) or min(vocabulary.counts) >= 4


def test_vocabulary_is_training_counts_at_or_over_the_threshold(preprocessed, dataset):
    report, data_dir, _ = preprocessed
    layout = Layout.read(dataset.root)
    splits = _expected_splits(layout)
    counts = collections.Counter()
    for document in (layout.train_json, layout.val_json):
        for annotation in document["annotations"]:
            text = annotation["caption"].strip()
            if text and splits.get(annotation["image_id"]) == "train":
                counts.update(tokenize_caption(text))
    vocabulary = parse_word_counts((data_dir / WORD_COUNTS_FILE).read_text(encoding="utf-8"))
    assert dict(zip(vocabulary.words, vocabulary.counts)) == {w: c for w, c in counts.items() if c >= 4}
    assert list(vocabulary.counts) == sorted(vocabulary.counts, reverse=True)
    assert "<S>" in vocabulary.words and "</S>" in vocabulary.words
    assert report["vocabulary"]["unknown_id"] == len(vocabulary.words)


def test_the_report_and_the_records_schema_name_the_vocabulary_by_its_id(preprocessed):
    report, data_dir, _ = preprocessed
    vocabulary = parse_word_counts((data_dir / WORD_COUNTS_FILE).read_text(encoding="utf-8"))

    assert report["vocabulary"]["id"] == vocabulary.id
    assert records.schema_vocabulary_id((data_dir / RECORD_SCHEMA_FILE).read_text(encoding="utf-8")) == vocabulary.id


def test_every_record_decodes_with_tf_and_parses_with_tf_data(preprocessed):
    import tensorflow as tf

    _, data_dir, written = preprocessed
    for split in written.values():
        for record in split:
            assert tf.io.decode_jpeg(record["jpeg"], channels=3).shape.rank == 3
    files = [str(data_dir / name) for name in records.shard_names("train", SHARDS["train"])]
    parsed = list(tf.data.TFRecordDataset(files).map(records.parse_sequence_example))
    assert len(parsed) == len(written["train"])
    assert {int(image_id) for image_id, _, _ in parsed} == {r["image_id"] for r in written["train"]}


def test_transform_graph_maps_tokens_to_the_records_ids(preprocessed):
    import tensorflow as tf
    import tensorflow_transform as tft

    _, data_dir, written = preprocessed
    sample = written["train"][:5]
    output = tft.TFTransformOutput(str(data_dir))
    tokens = tf.ragged.constant([r["tokens"] for r in sample]).to_sparse()
    ids = output.transform_features_layer()({"tokens": tokens})["caption_ids"]
    dense = tf.sparse.to_dense(ids, default_value=-1).numpy().tolist()
    assert [[i for i in row if i >= 0] for row in dense] == [r["ids"] for r in sample]


def test_each_bad_input_is_a_counted_skip(preprocessed, dataset):
    report, _, written = preprocessed
    train = report["splits"]["train"]
    expected = collections.Counter(dataset.skipped.values())
    assert train["images"]["skipped"] == dict(expected)
    assert train["captions"]["skipped"] == {reason: (0 if reason == "no_captions" else 5) for reason in expected}
    written_ids = {r["image_id"] for split in written.values() for r in split}
    assert not written_ids & set(dataset.skipped)


def test_odd_but_readable_images_are_kept(preprocessed, dataset):
    report, _, written = preprocessed
    by_id = {r["image_id"]: r["jpeg"] for r in written["train"]}
    assert set(dataset.kept) <= set(by_id)
    assert report["splits"]["train"]["images"]["reencoded"] == collections.Counter(dataset.reencoded.values())
    for image_id in dataset.reencoded:
        assert by_id[image_id][:3] == b"\xff\xd8\xff"  # now a JPEG


def test_blank_orphan_and_hostile_zip_entries_are_reported_not_written(preprocessed, dataset, tmp_path_factory):
    report, _, written = preprocessed
    assert report["annotations"]["orphan_annotations"] == dataset.orphan_annotations
    assert report["annotations"]["blank_captions_dropped"] == 1
    assert report["annotations"]["unsafe_zip_members_ignored"] == dataset.unsafe_members
    blank_image_records = [r for r in written["train"] if r["image_id"] == dataset.blank_caption_image]
    assert len(blank_image_records) == 5 and all(len(r["tokens"]) > 2 for r in blank_image_records)
    assert 999999 not in {r["image_id"] for split in written.values() for r in split}
    base = tmp_path_factory.getbasetemp()
    assert not list(base.rglob("x.jpg")) and not list(base.parent.glob("x.jpg"))
    assert not list(base.rglob("evil.jpg")) and not list(base.parent.glob("evil.jpg"))


def test_report_adds_up_and_is_on_disk(preprocessed):
    report, data_dir, written = preprocessed
    assert json.loads((data_dir / PREPROCESS_REPORT_FILE).read_text()) == report
    for split, entry in report["splits"].items():
        for unit in ("images", "captions"):
            part = entry[unit]
            assert part["listed"] == part["written"] + sum(part["skipped"].values())
        assert entry["records_written"] == len(written[split])


def test_the_word_frequencies_count_every_word_of_the_written_train_captions(preprocessed):
    report, data_dir, written = preprocessed
    frequencies = parse_word_frequencies((data_dir / WORD_FREQUENCIES_FILE).read_text(encoding="utf-8"))
    expected = collections.Counter(word for r in written["train"] for word in r["tokens"][1:-1])

    assert frequencies == dict(expected)
    lines = (data_dir / WORD_FREQUENCIES_FILE).read_text(encoding="utf-8").splitlines()
    assert lines == [f"{w} {c}" for w, c in sorted(expected.items(), key=lambda item: (-item[1], item[0]))]
    assert report["word_frequencies"] == {
        "file": WORD_FREQUENCIES_FILE,
        "split": "train",
        "words": sum(expected.values()),
        "distinct": len(expected),
    }


def test_each_splits_caption_lengths_and_words_are_those_of_its_written_records(preprocessed):
    report, _, written = preprocessed
    for split, entry in report["splits"].items():
        lengths = collections.Counter(str(len(r["tokens"]) - 2) for r in written[split])
        assert entry["captions"]["lengths"] == dict(lengths), split
        assert entry["captions"]["words"] == sum(len(r["tokens"]) - 2 for r in written[split]), split


def test_the_data_statistics_give_each_splits_skip_rates_by_reason_and_its_records(preprocessed, dataset):
    report, data_dir, _ = preprocessed

    statistics = data_statistics(str(data_dir))

    train = statistics["splits"]["train"]
    listed = report["splits"]["train"]["images"]["listed"]
    skipped = collections.Counter(dataset.skipped.values())
    assert train["skip_rates"] == {reason: count / listed for reason, count in skipped.items()}
    assert train["skip_rates"]["corrupt_image"] == 1 / listed
    assert {split: s["records"] for split, s in statistics["splits"].items()} == {
        split: entry["records_written"] for split, entry in report["splits"].items()
    }
    assert statistics["words"] == report["word_frequencies"]["words"]
    assert statistics["vocabulary_id"] == report["vocabulary"]["id"]
    assert 0 <= statistics["oov_rate"] < 0.05


def test_progress_counts_every_listed_image_as_the_worker_processes_check_it(preprocessed, display):
    report = preprocessed[0]
    listed = sum(entry["images"]["listed"] for entry in report["splits"].values())
    last = display.getvalue().splitlines()[-1]  # every=60: the line the display closes with
    assert f" preprocess: {listed}/{listed} images (100%), " in last
    assert " images/s, " in last and " 00:00 left" in last


def test_same_input_gives_byte_identical_outputs(preprocessed, dataset, tmp_path):
    _, first_dir, _ = preprocessed
    run_preprocess(_config(dataset.root, tmp_path, dataset.max_image_pixels))
    second_dir = tmp_path / "data"
    names = [WORD_COUNTS_FILE, WORD_FREQUENCIES_FILE]
    names += [n for split, count in SHARDS.items() for n in records.shard_names(split, count)]
    for name in names:
        assert (first_dir / name).read_bytes() == (second_dir / name).read_bytes(), name


def test_malformed_json_is_a_clear_error_with_nothing_written(tmp_path, capsys):
    broken = make_defective_dataset(tmp_path / "src", train_images=3, val_images=3)
    layout = Layout.read(broken.root)
    layout.val_json = b'{"images": [ {"id": 1, '  # a JSON document cut short
    layout.write(tmp_path / "broken")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"run_root: {tmp_path / 'run'}\ndata: {{mirror: {tmp_path / 'broken'}}}\n")
    assert cli_main(["preprocess", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "captions_val2014.json" in err and "not valid JSON" in err
    assert not (tmp_path / "run" / "data").exists()
    assert not list((tmp_path / "run").glob("data.staging-*"))
