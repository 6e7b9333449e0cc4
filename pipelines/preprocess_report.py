"""The preprocess report, `data/preprocess_report.json`: what preprocessing wrote and skipped.

The pipeline tallies each event under a path-like key (`train/images/skipped/empty_file`); the
runner folds the tallies into the report, which says per split how many images and captions were
listed, written and skipped (by reason), and checks that they add up. For example:

    {"splits": {"train": {"shards": 8,
                          "images": {"listed": 334, "written": 333, "skipped": {"empty_file": 1},
                                     "skipped_files": {"empty_file": ["train2014/COCO_train2014_...jpg"]},
                                     "reencoded": {},
                                     "size": {"width": {"min": 96, "median": 96, "max": 96},
                                              "height": {"min": 96, "median": 96, "max": 96}}},
                          "captions": {"listed": 1670, "written": 1665, "skipped": {"empty_file": 5},
                                       "lengths": {"6": 410, "7": 802, ...}, "words": 13902},
                          "records_written": 1665}, "val": ..., "test": ...},
     "vocabulary": {"words": 41, "unknown_id": 41, "min_word_count": 4, "id": "3f1c0d5e9a7b2468"},
     "word_frequencies": {"file": "word_frequencies.txt", "split": "train", "words": 13902, "distinct": 44},
     "annotations": {"orphan_annotations": 0, ...}, "records_written": 2415, "seconds": 27.3}

`skipped_files` names the first `SKIPPED_FILES_KEPT` skipped files per reason (by name); `size`
sums up the written images' widths and heights in pixels; `lengths` counts the written captions
by their number of words (tokens, `<S>` and `</S>` not counted) and `words` is those words' total;
the vocabulary's `id` is word_counts.txt's `schemas.vocabulary.vocabulary_id`, the identity every
checkpoint and export built on this data records.

`word_frequencies` sums up `data/word_frequencies.txt` (`schemas.layout.WORD_FREQUENCIES_FILE`):
every word of the train split's written captions with its count, those under
`data.min_word_count` too, so that the out-of-vocabulary rate of these captions under any
vocabulary can be computed later (`pipelines.data_checks`). It is a file, not part of the
report: MSCOCO's captions hold some 25,000 distinct words. Its lines are word_counts.txt's
(`word count`), by descending count, then by word.
"""
from __future__ import annotations

import collections
from typing import Iterable, Mapping, Optional, Sequence

from schemas.layout import PREPROCESS_REPORT_FILE, WORD_FREQUENCIES_FILE
from schemas.vocabulary import Vocabulary

SKIPPED_FILES_KEPT = 5  # skipped files named per split and reason
WORD_FREQUENCIES_SPLIT = "train"  # the split whose captions' words are counted into word_frequencies.txt


def skipped_files_key(split: str, reason: str) -> str:
    """The tally key under which the pipeline gathers the names of a split's files skipped for `reason`."""
    return f"{split}/images/skipped_files/{reason}"


def written_image_tallies(split: str, size: tuple[int, int], captions: Iterable[Sequence[str]]) -> dict[str, int]:
    """The tallies of a written image: its width and height, its captions' lengths in words and
    their words' total (each caption's tokens, `<S>` ... `</S>`; the two markers are not counted)."""
    width, height = size
    tallies = collections.Counter({f"{split}/images/width/{width}": 1, f"{split}/images/height/{height}": 1})
    lengths = [len(tokens) - 2 for tokens in captions]
    tallies.update(f"{split}/captions/length/{length}" for length in lengths)
    tallies[f"{split}/captions/words"] = sum(lengths)
    return dict(tallies)


def caption_words(captions: Iterable[Sequence[str]]) -> collections.Counter:
    """How often each word occurs in `captions` (each caption's tokens, `<S>` ... `</S>`; the two
    markers are not counted): what a written image adds to word_frequencies.txt."""
    return collections.Counter(word for tokens in captions for word in tokens[1:-1])


def format_word_frequencies(counts: Iterable[tuple[str, int]]) -> str:
    """word_frequencies.txt's text: one `word count` a line, by descending count, then by word."""
    return "".join(f"{word} {count}\n" for word, count in sorted(counts, key=lambda item: (-item[1], item[0])))


def parse_word_frequencies(text: str) -> dict[str, int]:
    """word_frequencies.txt's words and counts (a word never holds a space; the count is last)."""
    counts = {}
    for line in text.splitlines():
        if line.strip():
            word, _, count = line.rpartition(" ")
            counts[word] = int(count)
    return counts


def _min_median_max(counts: dict[str, int]) -> Optional[dict[str, int]]:
    """{"min", "median", "max"} of the values counted in {str(value): count} (None when empty)."""
    values = sorted((int(value), count) for value, count in counts.items() if count)
    if not values:
        return None
    middle, seen = (sum(count for _, count in values) + 1) // 2, 0
    for value, count in values:
        seen += count
        if seen >= middle:
            return {"min": values[0][0], "median": value, "max": values[-1][0]}
    raise AssertionError("unreachable")


def _nest(flat: dict[str, int]) -> dict:
    """{"train/images/skipped/empty_file": 1} -> {"train": {"images": {"skipped": {"empty_file": 1}}}}."""
    tree: dict = {}
    for key, value in sorted(flat.items()):
        *path, leaf = key.split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def build_report(
    tallies: dict[str, int],
    shards: Sequence[tuple[str, int]],
    min_word_count: int,
    vocabulary: Vocabulary,
    seconds: float,
    word_frequencies: Mapping[str, int],
) -> dict:
    """The report from the pipeline's tallies, for the splits and shard counts of `shards`, e.g.
    (("train", 256), ("val", 4), ("test", 8)), and the train split's `word_frequencies` (those
    of word_frequencies.txt); raises if any split's counts don't add up (listed = written +
    skipped), or if the word frequencies' total is not the train captions' words: a tally lost on
    the way would otherwise go unnoticed."""
    nested = _nest(tallies)
    splits = {}
    for split, num_shards in shards:
        counts = nested.get(split, {})
        images, captions = counts.get("images", {}), counts.get("captions", {})
        written_records = counts.get("records", {}).get("written", 0)
        entry = {
            "shards": num_shards,
            "images": {
                "listed": images.get("listed", 0),
                "written": images.get("written", 0),
                "skipped": images.get("skipped", {}),
                "skipped_files": images.get("skipped_files", {}),
                "reencoded": images.get("reencoded", {}),
                "size": {side: _min_median_max(images.get(side, {})) for side in ("width", "height")},
            },
            "captions": {
                "listed": captions.get("listed", 0),
                "written": written_records,
                "skipped": captions.get("skipped", {}),
                "lengths": dict(sorted(captions.get("length", {}).items(), key=lambda item: int(item[0]))),
                "words": captions.get("words", 0),
            },
            "records_written": written_records,
        }
        for unit in ("images", "captions"):
            part = entry[unit]
            if part["listed"] != part["written"] + sum(part["skipped"].values()):
                raise RuntimeError(f"preprocess report does not add up for {split} {unit}: {part}")
        splits[split] = entry
    counted = sum(word_frequencies.values())
    train_words = splits.get(WORD_FREQUENCIES_SPLIT, {}).get("captions", {}).get("words", 0)
    if counted != train_words:
        raise RuntimeError(f"preprocess report: {counted} words in the word frequencies, {train_words} in the captions")
    return {
        "splits": splits,
        "vocabulary": {
            "words": len(vocabulary.words),
            "unknown_id": vocabulary.unknown_id,
            "min_word_count": min_word_count,
            "id": vocabulary.id,
        },
        "word_frequencies": {
            "file": WORD_FREQUENCIES_FILE,
            "split": WORD_FREQUENCIES_SPLIT,
            "words": counted,
            "distinct": len(word_frequencies),
        },
        "annotations": nested.get("annotations", {}),
        "records_written": sum(s["records_written"] for s in splits.values()),
        "seconds": round(seconds, 1),
    }


def summarize_report(report: dict) -> str:
    """A few lines a person reads: per split, images and captions listed/written/skipped."""
    lines = [f"preprocess report ({report['output_dir']}/{PREPROCESS_REPORT_FILE}):"]
    lines.append(f"  {'split':<6}{'shards':>7}{'images':>9}{'written':>9}{'captions':>10}{'records':>9}  skipped")
    for split, entry in report["splits"].items():
        skipped = {**entry["images"]["skipped"]}
        skipped_text = ", ".join(f"{reason}={n}" for reason, n in sorted(skipped.items())) or "-"
        lines.append(
            f"  {split:<6}{entry['shards']:>7}{entry['images']['listed']:>9}{entry['images']['written']:>9}"
            f"{entry['captions']['listed']:>10}{entry['records_written']:>9}  {skipped_text}"
        )
    vocab = report["vocabulary"]
    lines.append(
        f"  vocabulary: {vocab['words']} words seen >= {vocab['min_word_count']} times; <UNK> id {vocab['unknown_id']}"
    )
    frequencies = report.get("word_frequencies")
    if frequencies:
        lines.append(
            f"  {frequencies['split']} captions: {frequencies['words']} words, {frequencies['distinct']} distinct "
            f"({frequencies['file']})"
        )
    dropped = {k: v for k, v in report["annotations"].items() if v}
    if dropped:
        lines.append("  dropped before splitting: " + ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())))
    lines.append(f"  {report['records_written']} records in {report['seconds']} s")
    return "\n".join(lines)
