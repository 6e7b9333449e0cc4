"""COCO caption metrics, as the COCO caption evaluation code computes them (PyPI `pycocoevalcap`).

    with CocoScorer() as scorer:
        scores = scorer.score({42: ["a red circle", "a circle that is red"]}, {42: "a red circle"})
    # {"Bleu_1": ..., "Bleu_2": ..., "Bleu_3": ..., "Bleu_4": ..., "METEOR": ..., "ROUGE_L": ..., "CIDEr": ...}

As pycocoevalcap's own COCOEvalCap: every caption, references and candidates alike, goes through
its PTBTokenizer (Stanford CoreNLP on Java: lower-cased, punctuation dropped), then BLEU-1..4,
METEOR (Java), ROUGE-L and CIDEr-D score the tokenized candidates against all references of
their image; SPICE (Java, downloads Stanford CoreNLP models on first use) only when asked.
Scores are corpus-level, on pycocoevalcap's 0-1 scale (CIDEr: 0-10).

A scorer keeps one METEOR process (a JVM that takes seconds to load its paraphrase tables) for
its whole life, so many score() calls pay for it once; `close()` (or leaving the `with` block)
ends it. The tokenizer runs one short Java process per call.
"""
from __future__ import annotations

import math
import shutil
from typing import Hashable, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from schemas.config import METRICS
from schemas.errors import ShowtellError

JAVA_HINT = "install a Java runtime (e.g. `apt-get install default-jre-headless`) and put `java` on PATH"


def check_java() -> None:
    """ShowtellError unless a `java` executable is on PATH (pycocoevalcap's tokenizer and METEOR
    run on Java)."""
    if shutil.which("java") is None:
        raise ShowtellError(f"COCO caption metrics need Java for pycocoevalcap's tokenizer and METEOR: {JAVA_HINT}")


class ClosableMeteor(Meteor):
    """pycocoevalcap's Meteor with an explicit, idempotent close(); its own __del__ takes a lock
    a failed call may hold, and kills with a signal module that is gone at interpreter exit."""

    def close(self) -> None:
        process = self.meteor_p
        if process.poll() is None:
            process.stdin.close()
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()

    def __del__(self) -> None:
        if self.meteor_p.poll() is None:
            self.close()


class CocoScorer:
    """pycocoevalcap's tokenizer and scorers, with one METEOR process for many score() calls,
    started by the first of them."""

    def __init__(self, spice: bool = False):
        """`spice`: also compute SPICE (slow; fetches Stanford CoreNLP models on first use)."""
        check_java()
        self._spice = spice
        self._tokenizer = PTBTokenizer()
        self._meteor = None  # a ClosableMeteor once needed

    def __enter__(self) -> "CocoScorer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Ends the METEOR process, if one was started, and waits for it: no Java process
        outlives the scorer. A later score() starts a new one."""
        if self._meteor is not None:
            self._meteor.close()
            self._meteor = None

    def tokenize(self, captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
        """{key: [caption, ...]} -> the same captions through pycocoevalcap's PTBTokenizer, in one
        Java run; every key keeps as many captions as it had."""
        tokenized = self._tokenizer.tokenize(
            {key: [{"caption": text} for text in texts] for key, texts in captions.items()}
        )
        for key, texts in captions.items():  # the tokenizer pairs its output lines with keys by position
            if len(tokenized.get(key, ())) != len(texts):
                got = len(tokenized.get(key, ()))
                raise RuntimeError(f"PTBTokenizer returned {got} captions for {key!r}, not {len(texts)}")
        return tokenized

    def score_tokenized(
        self, references: Mapping[Hashable, list[str]], candidates: Mapping[Hashable, list[str]]
    ) -> dict[str, float]:
        """Corpus scores of already tokenized captions: `candidates` {key: [one caption]} against
        `references` {key: [caption, ...]}, the same keys. The metrics in `METRICS` order."""
        if set(references) != set(candidates):
            raise ValueError("candidates and references must have the same image keys")
        if not candidates:
            raise ValueError("no captions to score")
        bleu, _ = Bleu(4).compute_score(references, candidates, verbose=0)
        scores = {f"Bleu_{n}": value for n, value in enumerate(bleu, start=1)}
        scores["METEOR"] = self._meteor_score(references, candidates)
        scores["ROUGE_L"], _ = Rouge().compute_score(references, candidates)
        scores["CIDEr"], _ = Cider().compute_score(references, candidates)
        if self._spice:
            from pycocoevalcap.spice.spice import Spice

            scores["SPICE"], _ = Spice().compute_score(references, candidates)
        return {name: float(scores[name]) for name in METRICS if name in scores}

    def score(
        self, references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str]
    ) -> dict[str, float]:
        """Corpus scores of raw captions: `candidates` {key: caption} against `references`
        {key: [caption, ...]}, both tokenized here in one tokenizer run."""
        tokenized = self.tokenize(
            {**{("ref", k): v for k, v in references.items()}, **{("cand", k): [v] for k, v in candidates.items()}}
        )
        return self.score_tokenized(
            {k: tokenized[("ref", k)] for k in references}, {k: tokenized[("cand", k)] for k in candidates}
        )

    def _meteor_score(
        self, references: Mapping[Hashable, list[str]], candidates: Mapping[Hashable, list[str]]
    ) -> float:
        """METEOR's corpus score, with a clear error when its Java process fails."""
        if self._meteor is None:
            self._meteor = ClosableMeteor()
        process = self._meteor.meteor_p
        try:
            value, _ = self._meteor.compute_score(references, candidates)
        except (ValueError, OSError) as error:  # no number where one was due, or a broken pipe
            if self._meteor.lock.locked():  # compute_score does not release it on error
                self._meteor.lock.release()
            detail = process.stderr.read().decode(errors="replace")[-2000:] if process.poll() is not None else ""
            raise RuntimeError(f"METEOR (Java) returned no score: {error} {detail}".strip()) from None
        if not math.isfinite(value):
            raise RuntimeError(f"METEOR returned {value}")
        return value
