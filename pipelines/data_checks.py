"""The data checks before any training: a night's data against the data its champion was trained on.

    statistics = data_statistics(config.data_dir)    # a run's data summed up (model.json keeps it)
    checks, not_compared = compare(statistics, champion, oov, config.checks)   # pure: statistics in, checks out
    record = check_data(config)                       # this run against its baseline model: data_checks.json's record
    summary = run_data_checks(config)                 # the check-data step: writes data_checks.json, then
                                                      # raises a one-line DataAnomaliesError naming each anomaly

As TFX's StatisticsGen + ExampleValidator, with statistics the preprocess pipeline computes
(pipelines/preprocess.py: tensorflow-data-validation has no release that matches TF 2.21). The
champion is the run's baseline model (`<run_root>/baseline.json`): the promote step stored the
statistics of its training data in its model.json (`data.statistics`), so no run folder of the
champion is needed. A run's statistics, from its `data/preprocess_report.json`,
`data/word_frequencies.txt` and `data/word_counts.txt`:

    {"vocabulary_id": "3f1c0d5e9a7b2468",
     "splits": {"train": {"images": 334, "skip_rates": {"corrupt_image": 0.003}, "records": 1665,
                          "caption_lengths": {"6": 410, "7": 802, ...}},
                "val": ..., "test": ...},
     "words": 13902,       # words of the written train captions (`<S>` and `</S>` not counted)
     "oov_rate": 0.0021}   # their share that the data's own vocabulary (word_counts.txt) lacks

`images` counts a split's listed images and `skip_rates` their shares skipped, by reason;
`records` counts its written records (one per caption), `caption_lengths` them by words.

The checks (`checks.*` in the config; a null threshold turns one off), each a JSON object with
its `value`, the `champion_value`, the `threshold`, whether it `passed` and a `text` in words:

- `skip_rate`, per split and skip reason: the share of the listed images skipped for it, at most
  `checks.max_skip_rate_increase` above the champion's (a split that skipped none on either side
  has one check, for reason `any`);
- `caption_lengths`, per split: the L-infinity distance between the normalised histograms of
  words per caption, at most `checks.max_caption_length_drift` (as TFDV's drift comparator);
  `value` and `champion_value` are the two shares of the length where they differ most. A split
  with fewer than `checks.min_captions_compared` captions on either side is not compared;
- `oov_rate`, train split: the share of the train captions' words missing from the champion's
  vocabulary (its model folder's word_counts.txt), at most `checks.max_oov_rate_increase` above
  the share its own training captions had under it;
- `records`, per split: records written, at least `checks.min_records_ratio` of the champion's.

`<run_root>/data_checks.json` holds the run's statistics, the champion's, the checks, what was not
compared and why, and the anomalies in words. With no promoted model to compare with (the first
night), or one promoted before its statistics were recorded, it says so and the step passes.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Mapping, Optional

from pipelines.preprocess_report import WORD_FREQUENCIES_SPLIT, parse_word_frequencies
from schemas.config import Checks, Config, join_url
from schemas.errors import ShowtellError
from schemas.layout import BASELINE_FILE, DATA_CHECKS_FILE, PREPROCESS_REPORT_FILE, WORD_FREQUENCIES_FILE
from schemas.models_root import baseline_location, model_id, read_baseline
from schemas.storage import absolute, exists, read_json, read_text, write_text
from schemas.vocabulary import WORD_COUNTS_FILE, parse_word_counts

log = logging.getLogger("showtell.checks")

SKIP_RATE, CAPTION_LENGTHS, OOV_RATE, RECORDS = "skip_rate", "caption_lengths", "oov_rate", "records"
ANY_REASON = "any"  # the skip reason of a split's one skip check when neither side skipped an image
NO_MODEL = "no promoted model to compare with"


# ---------------------------------------------------------------------------------------------
# Statistics


def oov_rate(frequencies: Mapping[str, int], vocabulary: Iterable[str]) -> Optional[float]:
    """The share of the words counted in `frequencies` ({word: count}) that `vocabulary` lacks;
    None when no word is counted."""
    total = sum(frequencies.values())
    if not total:
        return None
    known = set(vocabulary)
    return sum(count for word, count in frequencies.items() if word not in known) / total


def summarize(report: dict[str, Any], frequencies: Optional[Mapping[str, int]], vocabulary: Iterable[str]) -> dict:
    """A run's statistics (the module's docstring) from its preprocess report, its train
    captions' word frequencies (None for data preprocessed before they were counted: `words`
    and `oov_rate` are then None) and its vocabulary's words."""
    splits = {}
    for split, entry in report["splits"].items():
        listed, skipped = entry["images"]["listed"], entry["images"]["skipped"]
        splits[split] = {
            "images": listed,
            "skip_rates": {reason: count / listed for reason, count in sorted(skipped.items()) if listed},
            "records": entry["records_written"],
            "caption_lengths": dict(entry["captions"].get("lengths", {})),
        }
    return {
        "vocabulary_id": report["vocabulary"].get("id"),
        "splits": splits,
        "words": sum(frequencies.values()) if frequencies is not None else None,
        "oov_rate": oov_rate(frequencies, vocabulary) if frequencies is not None else None,
    }


def _frequencies_url(data_dir: str) -> str:
    return join_url(data_dir, WORD_FREQUENCIES_FILE)


def data_statistics(data_dir: str) -> Optional[dict]:
    """The statistics of the preprocessed data in `data_dir` (`<run_root>/data`), for model.json;
    None when it holds no preprocess report."""
    report = read_json(join_url(data_dir, PREPROCESS_REPORT_FILE))
    if report is None:
        return None
    url = _frequencies_url(data_dir)
    frequencies = parse_word_frequencies(read_text(url)) if exists(url) else None
    vocabulary = parse_word_counts(read_text(join_url(data_dir, WORD_COUNTS_FILE)))
    return summarize(report, frequencies, vocabulary.words)


# ---------------------------------------------------------------------------------------------
# Comparison


def normalized(histogram: Mapping[str, int]) -> dict[str, float]:
    """{value: count} as {value: share of the total}; empty when the total is 0."""
    total = sum(histogram.values())
    return {value: count / total for value, count in histogram.items()} if total else {}


def largest_difference(new: Mapping[str, float], old: Mapping[str, float]) -> tuple[Optional[str], float]:
    """The L-infinity distance between two normalised histograms and where it is: (the value
    whose shares differ most, by how much); (None, 0.0) when both are empty. Ties go to the
    smallest value."""
    values = sorted(set(new) | set(old), key=lambda value: (float(value), value))
    where, distance = None, 0.0
    for value in values:
        difference = abs(new.get(value, 0.0) - old.get(value, 0.0))
        if where is None or difference > distance:
            where, distance = value, difference
    return where, distance


def _percent(share: float) -> str:
    return f"{share:.1%}"


def _points(share: float) -> str:
    return f"{share * 100:.1f} points"


def _check(
    kind: str, split: str, key: str, value: Any, champion: Any, threshold: float, passed: bool, text: str, **more: Any
) -> dict[str, Any]:
    """One check's record: what was compared (`more`: its skip reason, length, ...), the values,
    the threshold (the config key `checks.<key>`), whether it passed, and all that in words."""
    return {
        "check": kind,
        "split": split,
        **more,
        "key": f"checks.{key}",
        "value": value,
        "champion_value": champion,
        "threshold": threshold,
        "passed": passed,
        "text": text,
    }


def _skip_checks(split: str, new: dict, old: dict, threshold: float) -> list[dict[str, Any]]:
    reasons = sorted(set(new["skip_rates"]) | set(old["skip_rates"])) or [ANY_REASON]
    checks = []
    for reason in reasons:
        value, champion = new["skip_rates"].get(reason, 0.0), old["skip_rates"].get(reason, 0.0)
        what = "skipped as " + reason if reason != ANY_REASON else "skipped"
        text = (
            f"{split}: {_percent(value)} of the images {what}, the champion's data {_percent(champion)} "
            f"(checks.max_skip_rate_increase: {_points(threshold)} more at most)"
        )
        passed = value - champion <= threshold
        checks.append(
            _check(SKIP_RATE, split, "max_skip_rate_increase", value, champion, threshold, passed, text, reason=reason)
        )
    return checks


def _length_check(split: str, new: dict, old: dict, threshold: float) -> dict[str, Any]:
    new_shares, old_shares = normalized(new["caption_lengths"]), normalized(old["caption_lengths"])
    length, distance = largest_difference(new_shares, old_shares)
    value, champion = new_shares.get(length, 0.0), old_shares.get(length, 0.0)
    words = "word" if length == "1" else "words"
    text = (
        f"{split}: caption lengths drifted by {distance:.2f}: {_percent(value)} of the captions have {length} {words}, "
        f"the champion's data {_percent(champion)} (checks.max_caption_length_drift: {threshold:g} at most)"
    )
    passed = distance <= threshold
    return _check(
        CAPTION_LENGTHS, split, "max_caption_length_drift", value, champion, threshold, passed, text,
        length=int(length), distance=distance,
    )


def _records_check(split: str, value: int, champion: int, threshold: float) -> dict[str, Any]:
    text = (
        f"{split}: {value} records, {value / champion:.0%} of the champion's data's {champion} "
        f"(checks.min_records_ratio: {threshold:.0%} at least)"
    )
    return _check(RECORDS, split, "min_records_ratio", value, champion, threshold, value >= threshold * champion, text)


def compare(
    new: dict[str, Any], champion: dict[str, Any], oov_under_champion: Optional[float], checks: Checks
) -> tuple[list[dict[str, Any]], list[str]]:
    """This run's statistics `new` against the `champion`'s (both as `summarize` makes them),
    with `oov_under_champion` the share of this run's train caption words that the champion's
    vocabulary lacks (None: no words): (the checks made, in the module docstring's order, and
    what was not compared, in words). A check that did not pass is an anomaly."""
    made: list[dict[str, Any]] = []
    not_compared: list[str] = []
    for key in ("max_skip_rate_increase", "max_caption_length_drift", "max_oov_rate_increase", "min_records_ratio"):
        if getattr(checks, key) is None:
            not_compared.append(f"checks.{key} is null: that check is off")
    splits = [split for split in new["splits"] if split in champion["splits"]]
    not_compared += [
        f"{split}: not in the champion's data" for split in new["splits"] if split not in champion["splits"]
    ]
    if checks.max_skip_rate_increase is not None:
        for split in splits:
            made += _skip_checks(split, new["splits"][split], champion["splits"][split], checks.max_skip_rate_increase)
    if checks.max_caption_length_drift is not None:
        for split in splits:
            counts = [sum(side["splits"][split]["caption_lengths"].values()) for side in (new, champion)]
            if min(counts) < checks.min_captions_compared:
                not_compared.append(
                    f"{split}: caption lengths of {counts[0]} captions, the champion's data {counts[1]}: fewer than "
                    f"checks.min_captions_compared ({checks.min_captions_compared})"
                )
                continue
            made.append(
                _length_check(split, new["splits"][split], champion["splits"][split], checks.max_caption_length_drift)
            )
    if checks.max_oov_rate_increase is not None:
        threshold, champion_rate = checks.max_oov_rate_increase, champion.get("oov_rate")
        if oov_under_champion is None or champion_rate is None:
            side = "this run's" if oov_under_champion is None else "the champion's"
            not_compared.append(f"{WORD_FREQUENCIES_SPLIT}: out-of-vocabulary rate: {side} data has no words counted")
        else:
            text = (
                f"{WORD_FREQUENCIES_SPLIT}: {_percent(oov_under_champion)} of the captions' words are not in the "
                f"champion's vocabulary, the champion's data {_percent(champion_rate)} under it "
                f"(checks.max_oov_rate_increase: {_points(threshold)} more at most)"
            )
            passed = oov_under_champion - champion_rate <= threshold
            key, value = "max_oov_rate_increase", oov_under_champion
            made.append(_check(OOV_RATE, WORD_FREQUENCIES_SPLIT, key, value, champion_rate, threshold, passed, text))
    if checks.min_records_ratio is not None:
        for split in splits:
            value, old = new["splits"][split]["records"], champion["splits"][split]["records"]
            if not old:
                not_compared.append(f"{split}: records: the champion's data has none")
                continue
            made.append(_records_check(split, value, old, checks.min_records_ratio))
    return made, not_compared


# ---------------------------------------------------------------------------------------------
# The check-data step


class DataAnomaliesError(ShowtellError):
    """The run's data failed its checks: the data is the user's input (exit code 2)."""


def data_checks_file(config: Config) -> str:
    """`<run_root>/data_checks.json`."""
    return join_url(config.run_root, DATA_CHECKS_FILE)


def _run_data(config: Config) -> tuple[dict, dict[str, int]]:
    """This run's statistics and its train captions' word frequencies; a ShowtellError naming
    what the preprocess step has not written."""
    report_url, frequencies_url = join_url(config.data_dir, PREPROCESS_REPORT_FILE), _frequencies_url(config.data_dir)
    for url in (report_url, frequencies_url):
        if not exists(url):
            raise ShowtellError(f"{url} not found: the preprocess step writes it (`showtell run --force preprocess`)")
    frequencies = parse_word_frequencies(read_text(frequencies_url))
    vocabulary = parse_word_counts(read_text(join_url(config.data_dir, WORD_COUNTS_FILE)))
    return summarize(read_json(report_url), frequencies, vocabulary.words), frequencies


def _champion_vocabulary(location: str) -> list[str]:
    url = join_url(location, WORD_COUNTS_FILE)
    if not exists(url):
        raise ShowtellError(f"{url} not found: the baseline model's folder has no vocabulary to check the data with")
    return list(parse_word_counts(read_text(url)).words)


def check_data(config: Config) -> dict[str, Any]:
    """This run's data against its baseline model's training data: data_checks.json's record
    (the module's docstring), written nowhere."""
    statistics, frequencies = _run_data(config)
    pinned = read_baseline(config.run_root)
    if pinned is None:
        raise ShowtellError(f"{join_url(config.run_root, BASELINE_FILE)} not found: the baseline step writes it")
    model = pinned.get("model")
    champion = ((model or {}).get("data") or {}).get("statistics")
    record: dict[str, Any] = {
        "run_root": absolute(config.run_root),
        "baseline": None,
        "note": None,
        "statistics": statistics,
        "champion": champion,
        "checks": [],
        "not_compared": [],
        "anomalies": [],
        "passed": True,
    }
    if model is None:
        record["note"] = NO_MODEL
        return record
    location = baseline_location(config.run_root)
    record["baseline"] = {"id": model_id(model), "run_root": model.get("run_root"), "location": location}
    if champion is None:
        record["note"] = (
            f"{NO_MODEL}: the promoted model {model_id(model)} records no statistics of its training data "
            "(it was promoted before they were recorded)"
        )
        return record
    oov = oov_rate(frequencies, _champion_vocabulary(location))
    checks, not_compared = compare(statistics, champion, oov, config.checks)
    anomalies = [check["text"] for check in checks if not check["passed"]]
    record.update(checks=checks, not_compared=not_compared, anomalies=anomalies, passed=not anomalies)
    return record


def run_data_checks(config: Config) -> dict[str, Any]:
    """The check-data step: writes `<run_root>/data_checks.json`, and raises a one-line
    DataAnomaliesError naming each anomaly when there is one; returns a summary."""
    record = check_data(config)
    url = data_checks_file(config)
    write_text(url, json.dumps(record, indent=1) + "\n")
    baseline = (record["baseline"] or {}).get("id")
    if record["anomalies"]:
        raise DataAnomaliesError(
            f"the data failed {len(record['anomalies'])} check(s) against the promoted model {baseline}'s training "
            f"data, so nothing was trained: {'; '.join(record['anomalies'])}. Details: {url}; to accept such data, "
            "relax the checks.* key named, or set it to null"
        )
    if record["note"]:
        log.info("check-data: %s", record["note"])
    else:
        log.info("check-data: %d checks passed against the promoted model %s", len(record["checks"]), baseline)
    return {"baseline": baseline, "checks": len(record["checks"]), "anomalies": 0, "note": record["note"]}
