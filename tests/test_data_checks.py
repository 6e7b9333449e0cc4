"""The data checks before any training (pipelines/data_checks.py, `showtell run`'s check-data step).

- The comparison, on hand-made statistics (fast): each check passes data like the champion's and
  names what is past its threshold; a null threshold turns a check off.
- Real nights (slow: Beam): a first night preprocessed and promoted (its model.json carries its
  data's statistics); then, against it, a night with ~20% more images of the same kind passes,
  and a night with 40% of its images corrupt, or with half its captions a single word, stops
  `showtell run` before training (exit 2) naming the anomaly, in the run report too, and leaves
  the promoted model untouched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest

from orchestration.cli import main as cli_main
from orchestration.manifest import DONE, FAILED, MANIFEST_FILE
from orchestration.run_report import build_run_report
from pipelines.data_checks import (
    ANY_REASON,
    CAPTION_LENGTHS,
    NO_MODEL,
    OOV_RATE,
    RECORDS,
    SKIP_RATE,
    compare,
    largest_difference,
    normalized,
    oov_rate,
    summarize,
)
from pipelines.preprocess_report import parse_word_frequencies
from pipelines.sample_data import generate_sample_data
from schemas.config import Checks, build_config, load_config
from schemas.layout import (
    DATA_CHECKS_FILE,
    EXPORT_METADATA_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    PREPROCESS_REPORT_FILE,
    WORD_FREQUENCIES_FILE,
)
from schemas.vocabulary import WORD_COUNTS_FILE, parse_word_counts
from tests.datasets import Layout
from tests.run_table import config_file, real_step
from tests.test_run_report import outline, section

# ---------------------------------------------------------------------------------------------
# The comparison, on hand-made statistics (fast)


def split_statistics(images: int = 1000, records: int = 5000, skip_rates=None, lengths=None) -> dict:
    """One split's statistics, as `summarize` makes them: by default no skips and captions of 8
    to 10 words."""
    lengths = lengths or {"8": records // 2, "9": records // 4, "10": records - records // 2 - records // 4}
    return {"images": images, "skip_rates": skip_rates or {}, "records": records, "caption_lengths": lengths}


def statistics(oov: float = 0.01, **splits: dict) -> dict:
    """A run's statistics: train, val and test splits (those given replace the defaults)."""
    defaults = {
        "train": split_statistics(),
        "val": split_statistics(images=100, records=500),
        "test": split_statistics(images=200, records=1000),
    }
    return {"vocabulary_id": "0123456789abcdef", "splits": {**defaults, **splits}, "words": 45000, "oov_rate": oov}


CHAMPION = statistics()


def anomalies(checks: list[dict]) -> list[dict]:
    return [check for check in checks if not check["passed"]]


def test_data_like_the_champions_passes_every_check_of_every_split():
    checks, not_compared = compare(statistics(), CHAMPION, 0.01, Checks())

    assert not anomalies(checks) and not not_compared
    made = {(check["check"], check["split"]) for check in checks}
    for split in ("train", "val", "test"):
        assert {(SKIP_RATE, split), (CAPTION_LENGTHS, split), (RECORDS, split)} <= made
    assert (OOV_RATE, "train") in made
    skip = next(check for check in checks if check["check"] == SKIP_RATE)
    assert (skip["reason"], skip["value"], skip["champion_value"]) == (ANY_REASON, 0.0, 0.0)


def test_images_skipped_for_a_reason_more_than_the_threshold_above_the_champions_rate_are_an_anomaly():
    new = statistics(train=split_statistics(skip_rates={"corrupt_image": 0.4, "empty_file": 0.001}))
    champion = statistics(train=split_statistics(skip_rates={"empty_file": 0.002, "missing_image": 0.01}))

    checks, _ = compare(new, champion, 0.01, Checks())

    [anomaly] = anomalies(checks)
    assert (anomaly["check"], anomaly["split"], anomaly["reason"]) == (SKIP_RATE, "train", "corrupt_image")
    assert (anomaly["value"], anomaly["champion_value"], anomaly["threshold"]) == (0.4, 0.0, 0.05)
    assert anomaly["key"] == "checks.max_skip_rate_increase"
    assert anomaly["text"] == (
        "train: 40.0% of the images skipped as corrupt_image, the champion's data 0.0% "
        "(checks.max_skip_rate_increase: 5.0 points more at most)"
    )
    reasons = {check["reason"] for check in checks if check["check"] == SKIP_RATE and check["split"] == "train"}
    assert reasons == {"corrupt_image", "empty_file", "missing_image"}  # a reason of either side is compared


@pytest.mark.parametrize("rate, passed", [(0.05, True), (0.07, True), (0.0701, False)])
def test_a_skip_rate_may_rise_by_the_threshold_and_no_more(rate, passed):
    champion = statistics(val=split_statistics(images=100, records=500, skip_rates={"corrupt_image": 0.02}))
    new = statistics(val=split_statistics(images=100, records=500, skip_rates={"corrupt_image": rate}))

    checks, _ = compare(new, champion, 0.01, Checks())

    assert not anomalies(checks) if passed else anomalies(checks)[0]["split"] == "val"


def test_half_the_captions_a_single_word_drift_the_caption_lengths_past_the_threshold():
    records = 5000
    poisoned = {"1": records // 2, "8": records // 4, "9": records // 8, "10": records // 8}
    new = statistics(train=split_statistics(records=records, lengths=poisoned))

    checks, _ = compare(new, CHAMPION, 0.01, Checks())

    [anomaly] = anomalies(checks)
    assert (anomaly["check"], anomaly["split"], anomaly["length"]) == (CAPTION_LENGTHS, "train", 1)
    assert (anomaly["value"], anomaly["champion_value"], anomaly["distance"]) == (0.5, 0.0, 0.5)
    assert anomaly["text"] == (
        "train: caption lengths drifted by 0.50: 50.0% of the captions have 1 word, the champion's data 0.0% "
        "(checks.max_caption_length_drift: 0.2 at most)"
    )


def test_the_caption_length_distance_is_the_largest_difference_of_one_lengths_share():
    new, old = normalized({"3": 1, "4": 2, "5": 1}), normalized({"4": 1, "5": 3})

    assert new == {"3": 0.25, "4": 0.5, "5": 0.25}
    assert largest_difference(new, old) == ("5", 0.5)  # 0.25 against 0.75
    assert largest_difference(new, new) == ("3", 0.0)
    assert largest_difference({}, {}) == (None, 0.0)


def test_the_same_shape_of_caption_lengths_passes_whatever_the_number_of_captions():
    bigger = statistics(train=split_statistics(images=1200, records=6000))

    checks, _ = compare(bigger, CHAMPION, 0.01, Checks())

    lengths = next(check for check in checks if check["check"] == CAPTION_LENGTHS and check["split"] == "train")
    assert lengths["passed"] and lengths["distance"] == pytest.approx(0.0)


def test_a_split_with_too_few_captions_on_either_side_is_not_compared_by_caption_lengths():
    new = statistics(val=split_statistics(images=10, records=50, lengths={"1": 50}))
    champion = statistics(val=split_statistics(images=10, records=60, lengths={"8": 60}))

    checks, not_compared = compare(new, champion, 0.01, Checks())

    assert not anomalies(checks)
    assert (CAPTION_LENGTHS, "val") not in {(check["check"], check["split"]) for check in checks}
    assert not_compared == [
        "val: caption lengths of 50 captions, the champion's data 60: fewer than checks.min_captions_compared (100)"
    ]
    [anomaly] = anomalies(compare(new, champion, 0.01, Checks(min_captions_compared=50))[0])
    assert (anomaly["check"], anomaly["split"]) == (CAPTION_LENGTHS, "val")


def test_the_out_of_vocabulary_rate_is_the_share_of_words_the_vocabulary_lacks():
    frequencies = {"a": 50, "dog": 30, "zebra": 15, "okapi": 5}

    assert oov_rate(frequencies, ["a", "dog", "<S>", "</S>"]) == 0.2
    assert oov_rate(frequencies, ["a", "dog", "zebra", "okapi"]) == 0.0
    assert oov_rate({}, ["a"]) is None


@pytest.mark.parametrize("oov, passed", [(0.06, True), (0.0601, False)])
def test_new_words_the_champions_vocabulary_lacks_may_rise_by_the_threshold_over_its_own_rate(oov, passed):
    checks, _ = compare(statistics(), CHAMPION, oov, Checks())

    check = next(check for check in checks if check["check"] == OOV_RATE)
    assert (check["value"], check["champion_value"], check["passed"]) == (oov, 0.01, passed)
    assert check["text"].startswith(f"train: {oov:.1%} of the captions' words are not in the champion's vocabulary")


@pytest.mark.parametrize("records, passed", [(2500, True), (2499, False)])
def test_a_split_whose_records_fell_by_more_than_half_is_an_anomaly(records, passed):
    checks, _ = compare(statistics(train=split_statistics(records=records)), CHAMPION, 0.01, Checks())

    check = next(check for check in checks if check["check"] == RECORDS and check["split"] == "train")
    assert (check["value"], check["champion_value"], check["passed"]) == (records, 5000, passed)
    if not passed:
        assert check["text"] == (
            "train: 2499 records, 50% of the champion's data's 5000 (checks.min_records_ratio: 50% at least)"
        )


def test_a_null_threshold_turns_its_check_off():
    poisoned = statistics(
        oov=0.5,
        train=split_statistics(records=100, skip_rates={"corrupt_image": 0.4}, lengths={"1": 100}),
    )
    off = Checks(
        max_skip_rate_increase=None, max_caption_length_drift=None, max_oov_rate_increase=None, min_records_ratio=None
    )

    checks, not_compared = compare(poisoned, CHAMPION, 0.5, off)

    assert checks == []
    assert not_compared == [
        f"checks.{key} is null: that check is off"
        for key in ("max_skip_rate_increase", "max_caption_length_drift", "max_oov_rate_increase", "min_records_ratio")
    ]
    only_records = compare(poisoned, CHAMPION, 0.5, Checks(min_records_ratio=None))[0]
    assert {check["check"] for check in anomalies(only_records)} == {SKIP_RATE, CAPTION_LENGTHS, OOV_RATE}


def test_statistics_sum_up_a_preprocess_report_its_word_frequencies_and_vocabulary():
    report = {
        "vocabulary": {"id": "0123456789abcdef"},
        "splits": {
            "train": {
                "images": {"listed": 8, "skipped": {"corrupt_image": 2}},
                "captions": {"lengths": {"1": 3, "4": 27}},
                "records_written": 30,
            },
            "val": {"images": {"listed": 0, "skipped": {}}, "captions": {"lengths": {}}, "records_written": 0},
        },
    }

    summary = summarize(report, {"a": 6, "dog": 3, "okapi": 1}, ["a", "dog", "<S>", "</S>"])

    assert summary == {
        "vocabulary_id": "0123456789abcdef",
        "splits": {
            "train": {"images": 8, "skip_rates": {"corrupt_image": 0.25}, "records": 30,
                      "caption_lengths": {"1": 3, "4": 27}},
            "val": {"images": 0, "skip_rates": {}, "records": 0, "caption_lengths": {}},
        },
        "words": 10,
        "oov_rate": 0.1,
    }
    assert summarize(report, None, ["a"])["oov_rate"] is None  # data preprocessed before words were counted


# ---------------------------------------------------------------------------------------------
# Real nights (slow)

NIGHT = {
    "data": {"shards": {"train": 2, "val": 1, "test": 1}},
    "beam": {"direct_running_mode": "in_memory", "direct_num_workers": 1},
}
RARE_WORD = "okapi"  # said by 3 captions of the bigger night: fewer than data.min_word_count (4)


def _sample(out: Path, train_images: int, val_images: int, seed: int) -> Path:
    generate_sample_data(str(out), train_images=train_images, val_images=val_images, seed=seed, image_size=64)
    return out


def bigger_bucket(out: Path, scratch: Path) -> Path:
    """~20% more images than night 1's, of the same kind (another seed), three of whose captions say
    a word no other caption does."""
    layout = Layout.read(_sample(scratch, train_images=29, val_images=24, seed=8))
    for annotation in layout.train_json["annotations"][:3]:
        annotation["caption"] = f"a {RARE_WORD} on a white background"
    return layout.write(out)


def corrupt_bucket(source: Path, out: Path) -> Path:
    """`source` with 40% of each zip's images cut to their first half: corrupt JPEGs."""
    layout = Layout.read(source)
    for members in (layout.train_members, layout.val_members):
        names = sorted(name for name in members if name.endswith(".jpg"))
        for name in names[: round(0.4 * len(names))]:
            members[name] = members[name][: len(members[name]) // 2]
    return layout.write(out)


def one_word_bucket(source: Path, out: Path) -> Path:
    """`source` with every other caption cut to its first word."""
    layout = Layout.read(source)
    for document in (layout.train_json, layout.val_json):
        for annotation in document["annotations"][::2]:
            annotation["caption"] = annotation["caption"].split()[0]
    return layout.write(out)


@dataclasses.dataclass
class Night:
    config: Path  # its config file
    root: Path  # its run root
    exit_code: int  # `showtell run --until check-data`
    stderr: str  # what it printed to stderr

    @property
    def checks(self) -> dict:
        return json.loads((self.root / DATA_CHECKS_FILE).read_text())

    @property
    def manifest(self) -> dict:
        return json.loads((self.root / MANIFEST_FILE).read_text())


@dataclasses.dataclass
class Nights:
    models: Path  # the shared promote.models_root
    first: Night  # preprocessed, checked against nothing, then promoted
    promoted: dict[str, bytes]  # models/current/model.json and models/history.jsonl once night 1 was promoted
    nights: dict[str, Night]  # "bigger", "corrupt", "one_word": checked against night 1's model


def _night(folder: Path, name: str, bucket: Path, models: Path) -> Night:
    (folder / name).mkdir()
    root = folder / name / "run"
    tree = {**NIGHT, "run_root": str(root), "data": {**NIGHT["data"], "source": str(bucket)}}
    config = config_file(folder / name, {**tree, "promote": {"models_root": str(models)}})
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        exit_code = cli_main(["-q", "run", "--config", str(config), "--until", "check-data"])
    return Night(config, root, exit_code, err.getvalue())


def _promote(night: Night) -> None:
    """Night 1's model promoted as the promote step does it, from an export and evaluation made by
    hand (no training here): its export holds the data's vocabulary, as a real one does."""
    config = load_config(night.config)
    root = night.root
    checkpoint = {"phase": 2, "step": 4, "kind": "final", "url": str(root / "train/phase2/final")}
    (root / "eval").mkdir()
    (root / "eval" / "best.json").write_text(json.dumps({"select_by": "CIDEr", "value": 0.5, "checkpoint": checkpoint}))
    report = {"split": "test", "images": 6, "checkpoints": [{**checkpoint, "metrics": {"CIDEr": 0.5}}]}
    (root / "eval" / "report.json").write_text(json.dumps(report))
    (root / "export").mkdir()
    shutil.copy(root / "data" / WORD_COUNTS_FILE, root / "export" / WORD_COUNTS_FILE)
    vocabulary = parse_word_counts((root / "data" / WORD_COUNTS_FILE).read_text())
    (root / "export" / EXPORT_METADATA_FILE).write_text(json.dumps({"vocabulary_id": vocabulary.id}))
    assert real_step("promote").work(config)["decision"] == "promoted"


@pytest.fixture(scope="module")
def nights(tmp_path_factory) -> Nights:
    folder = tmp_path_factory.mktemp("checked-nights")
    models = folder / "models"
    first_bucket = _sample(folder / "bucket1", train_images=24, val_images=20, seed=7)
    buckets = {
        "bigger": bigger_bucket(folder / "bucket-bigger", folder / "scratch"),
        "corrupt": corrupt_bucket(first_bucket, folder / "bucket-corrupt"),
        "one_word": one_word_bucket(first_bucket, folder / "bucket-one-word"),
    }
    first = _night(folder, "night1", first_bucket, models)
    assert first.exit_code == 0, first.stderr[-3000:]
    _promote(first)
    promoted = {name: (models / name).read_bytes() for name in (f"current/{MODEL_FILE}", HISTORY_FILE)}
    checked = {name: _night(folder, name, bucket, models) for name, bucket in buckets.items()}
    return Nights(models, first, promoted, checked)


@pytest.mark.slow
def test_the_first_night_has_no_promoted_model_to_compare_with_and_passes(nights):
    record = nights.first.checks

    assert record["note"] == NO_MODEL and record["passed"] and record["checks"] == []
    assert nights.first.manifest["steps"]["check-data"]["state"] == DONE
    page = build_run_report(build_config({"run_root": str(nights.first.root)}))
    assert f"The data was not checked: {NO_MODEL}." in " ".join("".join(outline(section(page, "checks")).text).split())


@pytest.mark.slow
def test_the_promoted_model_records_its_training_datas_statistics(nights):
    model = json.loads(nights.promoted[f"current/{MODEL_FILE}"])
    data_dir = nights.first.root / "data"
    report = json.loads((data_dir / PREPROCESS_REPORT_FILE).read_text())
    frequencies = parse_word_frequencies((data_dir / WORD_FREQUENCIES_FILE).read_text())
    vocabulary = parse_word_counts((data_dir / WORD_COUNTS_FILE).read_text())

    stats = model["data"]["statistics"]

    assert stats == summarize(report, frequencies, vocabulary.words)
    assert stats["vocabulary_id"] == model["vocabulary_id"] == vocabulary.id
    for split, entry in report["splits"].items():
        assert stats["splits"][split]["records"] == entry["records_written"] > 0
        assert stats["splits"][split]["caption_lengths"] == entry["captions"]["lengths"]
        assert stats["splits"][split]["skip_rates"] == {}
    assert stats["words"] == report["splits"]["train"]["captions"]["words"]


@pytest.mark.slow
def test_a_night_with_a_fifth_more_data_of_the_same_kind_passes_every_check(nights):
    night = nights.nights["bigger"]
    record = night.checks

    assert night.exit_code == 0, night.stderr[-3000:]
    assert record["passed"] and record["anomalies"] == [] and record["note"] is None
    assert record["baseline"]["id"] == json.loads(nights.promoted[f"current/{MODEL_FILE}"])["promotion"]["id"]
    made = {(check["check"], check["split"]) for check in record["checks"]}
    assert {(SKIP_RATE, "train"), (CAPTION_LENGTHS, "train"), (OOV_RATE, "train"), (RECORDS, "test")} <= made
    # The rare word is counted though the vocabulary leaves it out, and neither vocabulary has it.
    frequencies = parse_word_frequencies((night.root / "data" / WORD_FREQUENCIES_FILE).read_text())
    assert frequencies[RARE_WORD] == 3
    assert RARE_WORD not in parse_word_counts((night.root / "data" / WORD_COUNTS_FILE).read_text()).words
    oov = next(check for check in record["checks"] if check["check"] == OOV_RATE)
    assert oov["value"] >= 3 / record["statistics"]["words"] and record["statistics"]["oov_rate"] > 0
    page = build_run_report(build_config({"run_root": str(night.root)}))
    assert f"All {len(record['checks'])} data checks passed" in section(page, "checks")


@pytest.mark.parametrize(
    "name, check, named",
    [
        ("corrupt", SKIP_RATE, "of the images skipped as corrupt_image"),
        ("one_word", CAPTION_LENGTHS, "of the captions have 1 word"),
    ],
)
@pytest.mark.slow
def test_a_poisoned_night_stops_before_training_naming_the_anomaly_and_leaves_the_champion_untouched(
    nights, name, check, named
):
    night = nights.nights[name]
    record = night.checks

    assert night.exit_code == 2, night.stderr[-3000:]
    [error] = [line for line in night.stderr.splitlines() if line.startswith("showtell run: error:")]
    assert "step check-data failed" in error and named in error and "nothing was trained" in error
    assert not record["passed"] and any(named in text for text in record["anomalies"])
    assert {c["check"] for c in record["checks"] if not c["passed"]} >= {check}
    steps = night.manifest["steps"]
    assert steps["check-data"]["state"] == FAILED and "train-phase1" not in steps
    assert not (night.root / "train").exists()
    for file, content in nights.promoted.items():
        assert (nights.models / file).read_bytes() == content, file
    rows = outline(section((night.root / "report.html").read_text(), "checks"))
    page_text = " ".join("".join(rows.text).split())
    assert "the run stopped before training" in page_text and named in page_text


@pytest.mark.slow
def test_the_poisoned_nights_statistics_show_the_corrupt_images_and_the_single_word_captions(nights):
    corrupt = nights.nights["corrupt"].checks["statistics"]["splits"]["train"]
    one_word = json.loads((nights.nights["one_word"].root / "data" / PREPROCESS_REPORT_FILE).read_text())

    assert corrupt["skip_rates"]["corrupt_image"] >= 0.3
    train = one_word["splits"]["train"]["captions"]
    assert 0.4 <= train["lengths"]["1"] / train["written"] <= 0.6  # every other caption, of each captions file
