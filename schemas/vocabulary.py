"""The caption vocabulary's format: im2txt's `word_counts.txt`, word to id and id to word.

Shared by preprocessing (which writes it, after tf.Transform counted the words:
`pipelines/vocabulary.py`), training (the model's vocab_size) and inference (the captioner's
words), so none of them needs the others' packages. No Apache Beam, no TensorFlow.

    word_counts.txt        one `word count` a line, by descending count (docs/im2txt.md, "Data"):
                               a 9
                               <S> 7
                               </S> 7
                               dog 5
    word id                its 0-based line number:    Vocabulary.ids(["<S>", "a", "zebra"]) -> [1, 0, 4]
    <UNK>                  id len(words), for every other word
    vocabulary id          `vocabulary_id(words)`: 16 hex digits of the SHA-256 of the words in id
                           order (counts left out): every artefact built with a vocabulary records it
                           (the preprocess report, checkpoints' state.json, exports, model.json), and
                           loading one under a vocabulary with another id is refused
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

WORD_COUNTS_FILE = "word_counts.txt"  # the vocabulary's file, in data/, final/ and every export

START_WORD = "<S>"  # first token of every caption
END_WORD = "</S>"  # last token of every caption
UNKNOWN_WORD = "<UNK>"  # any word not in the vocabulary; id len(words)


@dataclass(frozen=True)
class Vocabulary:
    """Words in id order with their training counts; `<UNK>` is id len(words)."""

    words: tuple[str, ...]  # words[i] has id i
    counts: tuple[int, ...]  # counts[i] is how often words[i] occurs in training captions

    @property
    def unknown_id(self) -> int:
        return len(self.words)

    def ids(self, tokens: Sequence[str]) -> list[int]:
        """Word to id: `ids(["a", "zebra"])` -> [0, unknown_id] when "a" is line 0 and "zebra" absent."""
        index = self._index()
        return [index.get(token, self.unknown_id) for token in tokens]

    def word(self, word_id: int) -> str:
        """Id to word: `words[word_id]`, or `<UNK>` for any id past the vocabulary."""
        return self.words[word_id] if 0 <= word_id < len(self.words) else UNKNOWN_WORD

    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_cached_index")
        if cached is None:
            cached = {word: i for i, word in enumerate(self.words)}
            object.__setattr__(self, "_cached_index", cached)
        return cached

    @property
    def id(self) -> str:
        """The vocabulary's identity: `vocabulary_id(self.words)`."""
        return vocabulary_id(self.words)

    def to_word_counts(self) -> str:
        """im2txt's word_counts.txt: one `word count` a line, in id order."""
        return "".join(f"{word} {count}\n" for word, count in zip(self.words, self.counts))


def vocabulary_id(words: Sequence[str]) -> str:
    """16 hex digits of the SHA-256 of `words` in id order, one a line: equal ids, equal word ids.

        vocabulary_id(["a", "<S>", "</S>"]) != vocabulary_id(["<S>", "a", "</S>"])   # order counts
    """
    return hashlib.sha256("".join(f"{word}\n" for word in words).encode("utf-8")).hexdigest()[:16]


def parse_word_counts(text: str) -> Vocabulary:
    """Reads im2txt's `word count` lines (a word never holds a space; the count is last)."""
    words, counts = [], []
    for line in text.splitlines():
        if line.strip():
            word, _, count = line.rpartition(" ")
            words.append(word)
            counts.append(int(count))
    return Vocabulary(tuple(words), tuple(counts))
