"""Nightly retraining (configs/nightly.yaml's way), three nights and a poisoned one on a sample
bucket (tests/nights.py), all sharing one local `promote.models_root`, each a `showtell run`
subprocess as cron starts it, with `train.init_from: promoted`:

1. night 1 trains from scratch and is promoted;
2. night 2 has ~20% more images, whose captions bring new words: it warm-starts from night 1's
   model (its vocabulary remapped: words kept and added), its first training loss is near night 1's
   last one, and the gate scores night 1's model on night 2's own test images and decides by the rule;
3. night 3's data is the promoted model's: it ends after the baseline step, trains nothing, exits
   0 and leaves a `no_new_data` history line; it runs on an S3 server (moto, 127.0.0.1);
4. a poisoned night (40% of its train images corrupt) stops before training, naming the anomaly,
   and the promoted model is untouched.

Then by hand: `showtell promote --rollback` and `--force` each leave the right `current/` and an
audit line; and night 1's checkpoint is refused for night 2's data without a remap (`slow`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.promote import HELD_BACK, PROMOTED, ROLLED_BACK, current_model, read_history
from schemas.vocabulary import parse_word_counts
from tests.nights import NEW_WORDS, first_bucket, grown_bucket, poisoned_bucket
from tests.run_table import REPO, config_file
from tests.s3_server import s3_fixture
from tests.test_run_end_to_end import TINY, run_env

pytestmark = pytest.mark.slow

BUCKET = "showtell-nights"
s3 = s3_fixture(BUCKET)


@dataclasses.dataclass
class Nights:
    folder: Path
    models: Path
    buckets: dict[str, Path]
    configs: dict[str, Path]
    runs: dict[str, subprocess.CompletedProcess]  # each night's `showtell run`
    history: dict[str, list[dict]]  # history.jsonl after each night
    current: dict[str, dict]  # current/model.json after each night


def _night_config(folder: Path, name: str, run_root: str, bucket: Path, models: Path) -> Path:
    place = folder / name
    place.mkdir(parents=True, exist_ok=True)
    tree = {
        **TINY,
        "run_root": run_root,
        "data": {**TINY["data"], "source": str(bucket)},
        "train": {**TINY["train"], "init_from": "promoted", "warm_start_steps": 6},
        "promote": {"models_root": str(models)},
    }
    return config_file(place, tree)


def _showtell(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "orchestration.cli", *args]
    return subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def nights(s3, tmp_path_factory) -> Nights:
    folder = tmp_path_factory.mktemp("nights")
    models = folder / "models"
    buckets = {"night1": first_bucket(folder / "bucket1")}
    buckets["night2"] = grown_bucket(buckets["night1"], folder / "bucket2", folder / "extra")
    buckets["poisoned"] = poisoned_bucket(buckets["night2"], folder / "bucket-poisoned")
    nights = Nights(folder, models, buckets, {}, {}, {}, {})

    def night(name: str, run_root: str, bucket: Path) -> None:
        nights.configs[name] = _night_config(folder, name, run_root, bucket, models)
        nights.runs[name] = _showtell("run", "--config", str(nights.configs[name]))
        nights.history[name] = read_history(str(models))
        nights.current[name] = current_model(str(models))

    night("night1", str(folder / "night1"), buckets["night1"])
    assert nights.runs["night1"].returncode == 0, nights.runs["night1"].stderr[-3000:]
    night("night2", str(folder / "night2"), buckets["night2"])
    assert nights.runs["night2"].returncode == 0, nights.runs["night2"].stderr[-3000:]
    # The promoted model's own data, on the S3 server: a night with nothing new.
    champion = "night2" if nights.current["night2"]["run_root"].endswith("night2") else "night1"
    night("night3", f"s3://{BUCKET}/night3", buckets[champion])
    night("poisoned", str(folder / "poisoned"), buckets["poisoned"])
    return nights


def test_night_1_trains_from_scratch_and_is_promoted(nights):
    run_root = nights.folder / "night1"
    [record] = nights.history["night1"]
    assert record["decision"] == PROMOTED and record["reason"] == "the first model"
    assert (run_root / "train" / "phase1" / "final" / "state.json").exists()
    assert not (run_root / "train" / "warm_start").exists()  # nothing was promoted to start from
    model = nights.current["night1"]
    assert model["run_root"] == str(run_root) and model["promotion"] == record
    baseline = json.loads((run_root / "baseline.json").read_text())
    assert baseline["model"] is None and model["data"]["fingerprint"] == baseline["data"]["fingerprint"]


def test_night_2_warm_starts_from_night_1_with_its_vocabulary_remapped(nights):
    run_root = nights.folder / "night2"
    warm = json.loads((run_root / "train" / "warm_start" / "state.json").read_text())
    night1_words = parse_word_counts((nights.folder / "night1" / "data" / "word_counts.txt").read_text()).words
    night2_words = parse_word_counts((run_root / "data" / "word_counts.txt").read_text()).words
    assert set(NEW_WORDS.values()) <= set(night2_words) - set(night1_words)
    assert warm["remap"] == {
        "kept": len(set(night1_words) & set(night2_words)),
        "added": len(set(night2_words) - set(night1_words)),
        "dropped": len(set(night1_words) - set(night2_words)),
    }
    assert warm["init_from"] == str(nights.models / "current")
    assert not (run_root / "train" / "phase1").exists()  # phase 1 trained nothing
    remap = warm["remap"]
    line = f"{remap['kept']} words kept, {remap['added']} added, {remap['dropped']} dropped"
    assert any(line in text for text in nights.runs["night2"].stderr.splitlines())  # on the console
    assert line in (run_root / "report.html").read_text()  # and in the run report


def _losses(run_root: Path, phase: int) -> list[float]:
    lines = (run_root / "train" / f"phase{phase}" / "history.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_night_2s_first_training_loss_is_near_night_1s_last_not_a_from_scratch_loss(nights):
    trained = _losses(nights.folder / "night1", 2)[-1]
    first_night2 = _losses(nights.folder / "night2", 2)[0]
    words = len((nights.folder / "night2" / "data" / "word_counts.txt").read_text().splitlines())

    from_scratch = math.log(words + 1)  # a model that has learnt nothing: uniform over the words and <UNK>
    assert abs(first_night2 - trained) < abs(first_night2 - from_scratch), (trained, first_night2, from_scratch)


def test_night_2_is_scored_head_to_head_with_night_1s_model_and_decided_by_the_rule(nights):
    report = json.loads((nights.folder / "night2" / "eval" / "report.json").read_text())
    record = nights.history["night2"][-1]
    night1 = nights.history["night1"][0]

    baseline = report["baseline"]
    assert baseline["id"] == night1["id"] and baseline["status"] == "ok" and baseline["perplexity"] is None
    assert len(baseline["captions"]) == report["images"]  # the same images as the new model's
    assert record["current_value"] == baseline["metrics"]["CIDEr"]
    assert record["new_value"] == report["best"]["value"]
    assert record["decision"] == (PROMOTED if record["new_value"] >= record["current_value"] else HELD_BACK)
    assert record["measured_on"]["new"] == record["measured_on"]["current"]
    assert record["measured_on"]["new"]["run_root"] == str(nights.folder / "night2")
    assert json.loads((nights.folder / "night2" / "promote.json").read_text()) == record


def test_night_3_with_the_promoted_models_data_ends_after_the_baseline_and_trains_nothing(nights, s3):
    run = nights.runs["night3"]
    assert run.returncode == 0, run.stderr[-3000:]
    champion = nights.current["night2"]
    assert f"the run ended after baseline: no new data since the promoted model (trained on {champion['run_root']}" in (
        run.stdout
    )
    last = nights.history["night3"][-1]
    assert last["decision"] == "no_new_data" and last["run_root"] == f"s3://{BUCKET}/night3"
    assert last["baseline"]["id"] == champion["promotion"]["id"]
    assert len(nights.history["night3"]) == len(nights.history["night2"]) + 1
    assert not s3.exists(f"{BUCKET}/night3/train") and not s3.exists(f"{BUCKET}/night3/data")
    assert nights.current["night3"] == champion


def test_a_poisoned_night_stops_before_training_naming_the_anomaly_and_leaves_the_champion(nights):
    run = nights.runs["poisoned"]
    run_root = nights.folder / "poisoned"
    assert run.returncode == 2, run.stderr[-3000:]
    error = [line for line in run.stderr.splitlines() if line.startswith("showtell run: error:")]
    assert len(error) == 1 and "step check-data failed" in error[0] and "corrupt_image" in error[0], run.stderr[-3000:]
    assert not (run_root / "train").exists()
    assert nights.current["poisoned"] == nights.current["night2"]
    assert nights.history["poisoned"] == nights.history["night3"]
    assert "corrupt_image" in (run_root / "report.html").read_text()


def test_rollback_and_force_each_leave_the_right_current_model_and_an_audit_line(nights):
    models, night2 = str(nights.models), nights.configs["night2"]
    ids = {name: nights.history[name][-1]["id"] for name in ("night1", "night2")}
    promoted = nights.history["night2"][-1]["decision"] == PROMOTED
    # Whichever night 2's gate chose, undo it by hand first, then do the other.
    by_hand = [("--rollback", "night 2 is wrong"), ("--force", "night 2 is wanted")]
    if not promoted:
        by_hand.reverse()

    for flag, reason in by_hand:
        done = _showtell("promote", "--config", str(night2), flag, "--reason", reason)
        assert done.returncode == 0, done.stderr[-3000:]
        line = read_history(models)[-1]
        assert line["forced"]["reason"] == reason
        if flag == "--rollback":
            assert line["decision"] == ROLLED_BACK and current_model(models)["promotion"]["id"] == ids["night1"]
            assert done.stdout.startswith(f"rolled back: {nights.models / 'current'} is model {ids['night1']} again")
        else:
            assert line["decision"] == PROMOTED and current_model(models)["run_root"] == str(nights.folder / "night2")
            assert done.stdout.startswith("promoted: forced by ")
    assert [line["decision"] for line in read_history(models)[-2:]] == (
        [ROLLED_BACK, PROMOTED] if promoted else [PROMOTED, ROLLED_BACK]
    )


def test_night_1s_checkpoint_on_night_2s_data_without_a_remap_is_refused(nights):
    # A run root holding night 2's data and night 1's phase 1 checkpoint, trained on without a warm start.
    run_root, night1, night2 = nights.folder / "mismatch", nights.folder / "night1", nights.folder / "night2"
    shutil.copytree(night2 / "data", run_root / "data")
    shutil.copytree(night1 / "train" / "phase1" / "final", run_root / "train" / "phase1" / "final")

    config = str(nights.configs["night2"])
    done = _showtell("train", "--config", config, "--phase", "2", "--set", f"run_root={run_root}",
                     "--set", "train.init_from=none")

    night1_id = parse_word_counts((night1 / "data" / "word_counts.txt").read_text()).id
    night2_id = parse_word_counts((night2 / "data" / "word_counts.txt").read_text()).id
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"whose vocabulary {night1_id} is not the data's ({night2_id}" in done.stderr
    assert not (run_root / "train" / "phase2").exists()
