"""im2txt's `build_mscoco_data.py`, ported to TF2: the baseline that `preprocess_bench.py` times.

Reproduces the algorithm of tensorflow/models research/im2txt/im2txt/data/build_mscoco_data.py
on an extracted MSCOCO layout (`train2014/`, `val2014/`, `annotations/captions_*2014.json`):

- loads both captions files; every image keeps its captions, in annotation order;
- splits by position in the val file's `images` list: train = all of train2014 + val[:0.85 N],
  val = val[0.85 N : 0.90 N], test = val[0.90 N :];
- tokenises in Python: lower-case, `nltk.tokenize.word_tokenize`, then `<S>` ... `</S>`;
- counts every training token with a `Counter`, keeps words seen >= 4 times, sorted by
  descending count, writes `word_counts.txt`; `<UNK>` is id len(vocab);
- per split: one entry per caption, `random.seed(12345); random.shuffle(entries)`, then
  `num_threads` threads over contiguous ranges, each writing its share of the shards with one
  `tf.io.TFRecordWriter` per shard, reading each record's image file and decoding it in full
  (`tf.io.decode_jpeg(channels=3)`, eager where im2txt ran a shared session) as a validity
  check, skipping the ones that fail.

The only departure: records are serialised by `schemas.records.encode_sequence_example`, so
both writers produce the same bytes for the same (image, caption, ids).

    .venv/bin/python benchmarks/im2txt_threaded_writer.py EXTRACTED_DIR OUTPUT_DIR [--shards 256 4 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
from collections import Counter
from typing import NamedTuple, Sequence

import nltk.tokenize
import numpy as np
import tensorflow as tf

from schemas.records import encode_sequence_example, shard_name
from schemas.vocabulary import END_WORD, START_WORD

MIN_WORD_COUNT = 4
SHUFFLE_SEED = 12345


class Entry(NamedTuple):
    """One image with its tokenised captions (after expansion: exactly one caption)."""

    image_id: int
    filename: str
    captions: list[list[str]]


class Vocabulary(NamedTuple):
    word_ids: dict[str, int]
    unknown_id: int

    def ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.word_ids.get(token, self.unknown_id) for token in tokens]


def tokenize(caption: str) -> list[str]:
    return [START_WORD, *nltk.tokenize.word_tokenize(caption.lower(), preserve_line=True), END_WORD]


def load_images(captions_file: str, image_dir: str) -> list[Entry]:
    """The images of one captions JSON, in its `images` order, each with its tokenised captions."""
    with open(captions_file, encoding="utf-8") as handle:
        data = json.load(handle)
    captions_by_id: dict[int, list[str]] = {}
    for annotation in data["annotations"]:
        captions_by_id.setdefault(annotation["image_id"], []).append(annotation["caption"])
    return [
        Entry(
            image["id"], os.path.join(image_dir, image["file_name"]), [tokenize(c) for c in captions_by_id[image["id"]]]
        )
        for image in data["images"]
    ]


def build_vocabulary(train_images: list[Entry], word_counts_file: str) -> Vocabulary:
    counter: Counter[str] = Counter()
    for image in train_images:
        for caption in image.captions:
            counter.update(caption)
    word_counts = sorted((wc for wc in counter.items() if wc[1] >= MIN_WORD_COUNT), key=lambda wc: wc[1], reverse=True)
    with open(word_counts_file, "w", encoding="utf-8") as handle:
        handle.write("\n".join(f"{word} {count}" for word, count in word_counts))
    return Vocabulary({word: i for i, (word, _) in enumerate(word_counts)}, len(word_counts))


def encode_record(entry: Entry, vocab: Vocabulary) -> bytes | None:
    """The entry's SequenceExample, or None when its image does not decode (im2txt skips those)."""
    with open(entry.filename, "rb") as handle:
        jpeg = handle.read()
    try:
        image = tf.io.decode_jpeg(jpeg, channels=3)
    except tf.errors.InvalidArgumentError:
        print(f"Skipping file with invalid JPEG data: {entry.filename}")
        return None
    if len(image.shape) != 3 or image.shape[2] != 3:
        return None
    (caption,) = entry.captions
    return encode_sequence_example(entry.image_id, jpeg, caption, vocab.ids(caption))


def write_thread_shards(
    thread_index: int,
    ranges: list[tuple[int, int]],
    split: str,
    entries: list[Entry],
    vocab: Vocabulary,
    num_shards: int,
    output_dir: str,
    written: list[int],
) -> None:
    """Writes shards [t * S, (t + 1) * S) from entries[ranges[t]], S = num_shards / num_threads."""
    shards_per_thread = num_shards // len(ranges)
    start, end = ranges[thread_index]
    bounds = np.linspace(start, end, shards_per_thread + 1).astype(int)
    for s in range(shards_per_thread):
        path = os.path.join(output_dir, shard_name(split, thread_index * shards_per_thread + s, num_shards))
        with tf.io.TFRecordWriter(path) as writer:
            for i in range(bounds[s], bounds[s + 1]):
                record = encode_record(entries[i], vocab)
                if record is not None:
                    writer.write(record)
                    written[thread_index] += 1


def write_split(
    split: str, images: list[Entry], vocab: Vocabulary, num_shards: int, output_dir: str, num_threads: int
) -> int:
    entries = [Entry(image.image_id, image.filename, [caption]) for image in images for caption in image.captions]
    random.seed(SHUFFLE_SEED)
    random.shuffle(entries)
    num_threads = min(num_shards, num_threads)
    spacing = np.linspace(0, len(entries), num_threads + 1).astype(int)
    ranges = [(int(spacing[i]), int(spacing[i + 1])) for i in range(num_threads)]
    written = [0] * num_threads
    threads = [
        threading.Thread(
            target=write_thread_shards, args=(t, ranges, split, entries, vocab, num_shards, output_dir, written)
        )
        for t in range(num_threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(written)


def write_dataset(
    extracted_dir: str, output_dir: str, shards: Sequence[int] = (256, 4, 8), num_threads: int = 2
) -> int:
    """im2txt's conversion of an extracted MSCOCO folder to shards; returns the records written."""
    for count in shards:
        if count >= num_threads and count % num_threads:
            raise ValueError(f"{count} shards do not divide among {num_threads} threads")
    os.makedirs(output_dir, exist_ok=True)
    annotations = os.path.join(extracted_dir, "annotations")
    train = load_images(os.path.join(annotations, "captions_train2014.json"), os.path.join(extracted_dir, "train2014"))
    val = load_images(os.path.join(annotations, "captions_val2014.json"), os.path.join(extracted_dir, "val2014"))
    train_cutoff, val_cutoff = int(0.85 * len(val)), int(0.90 * len(val))
    splits = {"train": train + val[:train_cutoff], "val": val[train_cutoff:val_cutoff], "test": val[val_cutoff:]}
    vocab = build_vocabulary(splits["train"], os.path.join(output_dir, "word_counts.txt"))
    return sum(
        write_split(split, images, vocab, num_shards, output_dir, num_threads)
        for (split, images), num_shards in zip(splits.items(), shards)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("extracted_dir", help="folder with train2014/, val2014/ and annotations/")
    parser.add_argument("output_dir", help="where the shards and word_counts.txt go")
    parser.add_argument("--shards", type=int, nargs=3, default=(256, 4, 8), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    records = write_dataset(args.extracted_dir, args.output_dir, args.shards, args.threads)
    print(f"records {records}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
