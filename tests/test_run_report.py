"""orchestration/run_report.py, `<run_root>/report.html`: built from real runs' outputs.

- A run root where nothing ran, and one with a path full of HTML: every section says it is missing,
  and every text is escaped (fast).
- Preprocessing alone on a data set seeded with bad inputs (slow: Beam): the data section names
  the skip reasons and the first skipped files, and says that training, evaluation and promotion
  are missing.
- A tiny whole `showtell run` (slow: Beam and Ray), whose phase 2 was first trained to step 2 and
  then went on to step 4 (a resume): `tiny_run`, which tests/test_browser.py shares.
"""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.run_report import build_run_report
from pipelines.data_checks import compare
from pipelines.eval_report import PHASE_COLOURS
from pipelines.preprocess import run_preprocess
from schemas.config import build_config
from schemas.layout import RUN_REPORT_FILE
from tests.datasets import make_defective_dataset
from tests.run_table import REPO, config_file
from tests.test_eval_report import Outline
from tests.test_run_end_to_end import TINY, _finish, run_env

STEPS = (
    "download", "baseline", "preprocess", "check-data", "train-phase1", "train-phase2", "evaluate", "export", "promote"
)


def section(page: str, anchor: str) -> str:
    """The HTML of one section of the page: from its heading to the next one."""
    start = page.index(f'<h2 id="{anchor}">')
    end = page.find("<h2 ", start + 1)
    return page[start : end if end >= 0 else len(page)]


def outline(html_text: str) -> Outline:
    parsed = Outline()
    parsed.feed(html_text)
    return parsed


def chart(page: str, title: str) -> str:
    """The inline SVG chart titled `title`."""
    match = re.search(rf'<svg [^>]*aria-label="{re.escape(title)}">.*?</svg>', page, re.S)
    assert match, f"no chart {title!r}"
    return match.group(0)


# ---------------------------------------------------------------------------------------------
# Nothing ran (fast)


def test_a_run_root_where_nothing_ran_says_each_section_is_missing(tmp_path):
    page = build_run_report(build_config({"run_root": str(tmp_path / "run")}))

    text = " ".join("".join(outline(page).text).split())
    assert "No preprocess report at" in text
    assert "No data checks at" in text
    assert "Phase 1: no training history at" in text and "Phase 2: no training history at" in text
    assert "No evaluation report at" in text
    assert "No promotion decision at" in text
    assert "No step has run in this run root" in text


def test_text_from_the_run_root_is_escaped(tmp_path):
    root = tmp_path / 'run <script>alert("x")</script> & co'

    page = build_run_report(build_config({"run_root": str(root)}))

    assert "<script>" not in page and "&lt;script&gt;" in page
    assert not outline(page).all("script")


def _statistics(train_skip_rates: dict, oov: float) -> dict:
    """A run's data statistics, as pipelines.data_checks.summarize makes them."""
    splits = {
        split: {"images": images, "skip_rates": {}, "records": 5 * images, "caption_lengths": {"8": 5 * images}}
        for split, images in (("train", 1000), ("val", 100), ("test", 200))
    }
    splits["train"]["skip_rates"] = train_skip_rates
    return {"vocabulary_id": "0123456789abcdef", "splits": splits, "words": 40000, "oov_rate": oov}


def test_the_data_checks_section_names_each_anomaly_and_shows_every_checks_values(tmp_path):
    config = build_config({"run_root": str(tmp_path / "run")})
    poisoned, champion = _statistics({"corrupt_image": 0.4}, 0.2), _statistics({}, 0.01)
    checks, not_compared = compare(poisoned, champion, 0.2, config.checks)
    anomalies = [check["text"] for check in checks if not check["passed"]]
    record = {
        "baseline": {"id": "3f2a9c81d0e4", "run_root": "/runs/night1"},
        "note": None,
        "checks": checks,
        "not_compared": not_compared + ["checks.min_records_ratio is null: that check is off"],
        "anomalies": anomalies,
        "passed": False,
    }
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "data_checks.json").write_text(json.dumps(record))

    checks_html = section(build_run_report(config), "checks")

    text = " ".join("".join(outline(checks_html).text).split())
    assert "2 anomalies against the promoted model 3f2a9c81d0e4 (trained on /runs/night1)" in text
    assert "the run stopped before training" in text
    assert len(anomalies) == 2 and all(anomaly in text for anomaly in anomalies)
    header, *rows = outline(checks_html).rows
    assert header[:6] == ["check", "split", "reason or length", "this run", "champion's data", "threshold"]
    assert len(rows) == len(checks)
    corrupt = next(row for row in rows if row[:3] == ["skipped images", "train", "corrupt_image"])
    assert corrupt[3:5] == ["40.0%", "0.0%"] and corrupt[6] == "anomaly"
    assert "checks.max_skip_rate_increase 0.05" in corrupt[5]
    oov = next(row for row in rows if row[0] == "out-of-vocabulary words")
    assert oov[1:5] == ["train", "-", "20.0%", "1.0%"] and oov[6] == "anomaly"
    records = next(row for row in rows if row[:2] == ["records", "val"])
    assert records[3:5] == ["500", "500"] and records[6] == "passed"
    assert "Not compared: checks.min_records_ratio is null: that check is off." in text


# ---------------------------------------------------------------------------------------------
# Preprocessing alone, with bad inputs (slow)


@pytest.fixture(scope="module")
def preprocessed_only(tmp_path_factory):
    dataset = make_defective_dataset(tmp_path_factory.mktemp("coco"))
    config = build_config(
        {
            "run_root": str(tmp_path_factory.mktemp("preprocessed") / "run"),
            "data": {
                "mirror": str(dataset.root),
                "shards": {"train": 2, "val": 1, "test": 1},
                "max_image_pixels": dataset.max_image_pixels,
            },
            "beam": {"direct_running_mode": "in_memory", "direct_num_workers": 1},
        }
    )
    report = run_preprocess(config)
    return config, report, dataset


@pytest.mark.slow
def test_the_preprocess_report_names_the_first_skipped_files_and_sums_up_what_was_written(preprocessed_only):
    _, report, dataset = preprocessed_only
    train = report["splits"]["train"]
    for reason, count in train["images"]["skipped"].items():
        names = train["images"]["skipped_files"][reason]
        assert len(names) == min(count, 5) and names == sorted(names)
    unsafe = {image_id for image_id, reason in dataset.skipped.items() if reason == "unsafe_file_name"}
    named = [name for names in train["images"]["skipped_files"].values() for name in names]
    assert all(name.startswith("train2014/") or "unsafe file_name" in name for name in named)
    assert len([name for name in named if "unsafe file_name" in name]) == min(len(unsafe), 5)
    for split, entry in report["splits"].items():
        # Every written caption is counted once by its length; every written image by its size.
        assert sum(entry["captions"]["lengths"].values()) == entry["records_written"], split
        if entry["images"]["written"]:
            width = entry["images"]["size"]["width"]
            assert 0 < width["min"] <= width["median"] <= width["max"], split


@pytest.mark.slow
def test_the_data_section_shows_each_skip_reason_with_its_first_files(preprocessed_only):
    config, report, _ = preprocessed_only

    data = section(build_run_report(config), "data")

    rows = outline(data).rows
    skipped = report["splits"]["train"]["images"]["skipped"]
    assert skipped  # the data set is seeded with bad inputs
    for reason, count in skipped.items():
        row = next(r for r in rows if r[:2] == ["train", reason])
        assert row[2] == str(count)
        for name in report["splits"]["train"]["images"]["skipped_files"][reason]:
            assert name in row[4]
    words = report["vocabulary"]["words"]
    text = " ".join("".join(outline(data).text).split())
    assert f"Vocabulary: {words} words" in text
    frequencies = report["word_frequencies"]
    assert f"train captions: {frequencies['words']} words, {frequencies['distinct']} distinct, each counted in" in text
    assert "data/word_frequencies.txt" in [a["href"] for a in outline(data).all("a")]
    lengths = {length for entry in report["splits"].values() for length in entry["captions"]["lengths"]}
    assert chart(data, "caption lengths (all splits)").count('class="bar"') == len(lengths)


@pytest.mark.slow
def test_a_run_stopped_after_preprocessing_reports_training_evaluation_and_promotion_missing(preprocessed_only):
    config, _, _ = preprocessed_only

    page = build_run_report(config)

    assert "Phase 1: no training history" in section(page, "training")
    assert "Phase 2: no training history" in section(page, "training")
    assert "No evaluation report at" in section(page, "evaluation")
    assert "No promotion decision at" in section(page, "promotion")
    assert "No data checks at" in section(page, "checks")


# ---------------------------------------------------------------------------------------------
# A tiny whole run (slow)

@dataclasses.dataclass(frozen=True)
class TinyRun:
    config: Path  # the tiny config file
    root: Path  # its run root
    report: subprocess.CompletedProcess  # `showtell report --config C`, run after it


_TINY_RUN: list[TinyRun] = []  # one per session, for this file and tests/test_browser.py


def tiny_run_once(tmp_path_factory) -> TinyRun:
    """A whole tiny run, once per session: phase 2 trained to step 2 by a first run stopped after
    it, then on to step 4 by a second run to the end; then `showtell report`."""
    if not _TINY_RUN:
        tmp_path = tmp_path_factory.mktemp("tiny-run")
        root = tmp_path / "run"
        config = config_file(tmp_path, {"run_root": str(root), **TINY})
        _finish(config, "--set", "train.phase2.steps=2", "--until", "train-phase2")
        _finish(config)
        command = [sys.executable, "-m", "orchestration.cli", "report", "--config", str(config)]
        report = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
        _TINY_RUN.append(TinyRun(config, root, report))
    return _TINY_RUN[0]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    return tiny_run_once(tmp_path_factory)


def _page(run: TinyRun) -> str:
    return (run.root / RUN_REPORT_FILE).read_text()


def _history(root: Path, phase: int) -> list[dict]:
    return [json.loads(line) for line in (root / "train" / f"phase{phase}" / "history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_showtell_report_writes_report_html_in_the_run_root_and_prints_its_path(tiny_run):
    process = tiny_run.report
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.strip() == str(tiny_run.root / RUN_REPORT_FILE)
    assert _page(tiny_run).startswith("<!DOCTYPE html>")


@pytest.mark.slow
def test_the_data_section_shows_the_records_of_each_split(tiny_run):
    report = json.loads((tiny_run.root / "data" / "preprocess_report.json").read_text())

    rows = outline(section(_page(tiny_run), "data")).rows

    for split, entry in report["splits"].items():
        row = next(r for r in rows if r[0] == split)
        assert row[1:3] == [str(entry["shards"]), str(entry["images"]["listed"])]
        assert row[6] == str(entry["records_written"])
        size = entry["images"]["size"]["width"]
        assert row[7] == f"{size['min']} / {size['median']} / {size['max']}"
    assert "No image was skipped." in section(_page(tiny_run), "data")


@pytest.mark.slow
def test_the_data_checks_section_of_a_first_run_says_there_was_no_model_to_compare_with(tiny_run):
    text = " ".join("".join(outline(section(_page(tiny_run), "checks")).text).split())

    assert text == "Data checks The data was not checked: no promoted model to compare with."


@pytest.mark.slow
def test_each_training_chart_has_one_point_per_history_row_of_each_phase(tiny_run):
    root = tiny_run.root
    training = section(_page(tiny_run), "training")

    for title in ("loss vs step", "perplexity vs step", "learning rate vs step", "examples/s vs step"):
        svg = chart(training, title)
        for phase in (1, 2):
            assert svg.count(f'fill="{PHASE_COLOURS[phase]}"') == len(_history(root, phase)), (title, phase)


@pytest.mark.slow
def test_the_training_table_shows_workers_wall_time_and_the_phase_2_resume(tiny_run):
    root = tiny_run.root
    manifest = json.loads((root / "manifest.json").read_text())

    header, *rows = outline(section(_page(tiny_run), "training")).rows

    columns = dict(zip(header, zip(*rows)))
    assert columns["phase"] == ("1", "2")
    assert columns["step"] == ("60 of 60", "4 of 4")
    assert columns["reports"] == (str(len(_history(root, 1))), str(len(_history(root, 2))))
    assert columns["workers"] == ("1 (final/config.yaml)", "1 (final/config.yaml)")
    assert columns["resumes"] == ("none", "1: from step 2")
    assert columns["wall time"][1] == f"{manifest['steps']['train-phase2']['seconds']:.1f} s"


@pytest.mark.slow
def test_the_evaluation_section_links_the_evaluation_page_relatively_and_names_the_best(tiny_run):
    root = tiny_run.root
    best = json.loads((root / "eval" / "best.json").read_text())
    evaluation = section(_page(tiny_run), "evaluation")

    links = [a["href"] for a in outline(evaluation).all("a")]

    assert links == ["eval/report.html"] and (root / links[0]).exists()
    assert f"best by {best['select_by']}: phase {best['checkpoint']['phase']}" in evaluation
    assert "CIDEr" in outline(evaluation).rows[0]


@pytest.mark.slow
def test_the_promotion_section_shows_the_decision_both_values_and_the_reason(tiny_run):
    decision = json.loads((tiny_run.root / "promote.json").read_text())

    rows = dict(row for row in outline(section(_page(tiny_run), "promotion")).rows)

    assert rows["decision"] == "promoted"
    assert rows["reason"] == "the first model"
    assert rows[f"new model's {decision['metric']}"] == f"{decision['new_value']:.4f}"
    assert rows[f"current model's {decision['metric']}, on the same data"] == "-"
    assert rows["threshold applied"] == "-" and rows["promote.min_value, promote.tolerance"] == "None, 0"
    where = decision["measured_on"]["new"]
    assert rows["measured on"].startswith(f"{where['images']} images of the test split of {where['run_root']}")


@pytest.mark.slow
def test_the_steps_section_shows_each_steps_state_duration_and_log(tiny_run):
    root = tiny_run.root
    steps = section(_page(tiny_run), "steps")

    header, *rows = outline(steps).rows

    assert [row[0] for row in rows] == list(STEPS)
    assert all(row[1] == "done" and row[3].endswith((" s", " min")) for row in rows)
    assert next(row for row in rows if row[0] == "train-phase2")[5] == "config train.phase2.steps 2 -> 4"
    links = [a["href"] for a in outline(steps).all("a")]
    assert links == [f"logs/{step}.log" for step in STEPS if (root / "logs" / f"{step}.log").exists()]
    assert "logs/train-phase1.log" in links


@pytest.mark.slow
def test_the_page_is_self_contained(tiny_run):
    page = _page(tiny_run)
    parsed = outline(page)

    assert not parsed.all("script") and not parsed.all("link") and not parsed.all("img")
    for tag, attrs in parsed.tags:
        for name in ("src", "href"):
            assert not re.match(r"\s*(https?:)?//", attrs.get(name) or ""), (tag, attrs)
    assert not re.search(r"url\(|@import", page)
