"""pipelines/coco_metrics.py: pycocoevalcap's scores, one METEOR process, Java checked."""
from __future__ import annotations

import shutil

import pytest

from pipelines.coco_metrics import CocoScorer, check_java
from schemas.config import METRICS
from schemas.errors import ShowtellError

requires_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")

REFERENCES = {
    1: ["A red circle on a white background.", "a large red circle", "there is a red circle in the picture ."],
    2: ["a small blue square", "A blue square, in the middle of the picture."],
    3: ["two green triangles side by side", "a pair of green triangles"],
}
CANDIDATES = {1: "a red circle on a white background", 2: "a blue circle", 3: "two green triangles"}


def direct_scores(references: dict, *candidate_sets: dict) -> list[dict[str, float]]:
    """pycocoevalcap called the way its COCOEvalCap does, with nothing of ours in between: the
    scores of each {key: caption} set against `references` {key: [caption, ...]}."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    meteor = Meteor()
    results = []
    try:
        for candidates in candidate_sets:
            res = tokenizer.tokenize({k: [{"caption": v}] for k, v in candidates.items()})
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            scores = {f"Bleu_{i + 1}": value for i, value in enumerate(bleu)}
            scores["METEOR"], _ = meteor.compute_score(gts, res)
            scores["ROUGE_L"], _ = Rouge().compute_score(gts, res)
            scores["CIDEr"], _ = Cider().compute_score(gts, res)
            results.append({k: float(v) for k, v in scores.items()})
    finally:
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    return results


@pytest.fixture(scope="module")
def scorer():
    with CocoScorer() as scorer:
        yield scorer


@requires_java
def test_scores_are_pycocoevalcaps_own(scorer):
    ours = scorer.score(REFERENCES, CANDIDATES)
    assert list(ours) == [m for m in METRICS if m != "SPICE"]
    assert ours == pytest.approx(direct_scores(REFERENCES, CANDIDATES)[0], abs=1e-9)


@requires_java
def test_a_caption_equal_to_every_reference_scores_top_marks(scorer):
    references = {1: ["a red circle", "a red circle"], 2: ["a blue square on the left", "a blue square on the left"]}
    scores = scorer.score(references, {1: "a red circle", 2: "a blue square on the left"})
    for name in ("Bleu_1", "ROUGE_L"):
        assert scores[name] == pytest.approx(1.0)
    worse = scorer.score(references, {1: "a green square", 2: "two triangles"})
    assert all(worse[name] < scores[name] for name in scores)


@requires_java
def test_tokenizing_is_ptb_lowercase_without_punctuation(scorer):
    tokenized = scorer.tokenize({("ref", 1): ["A Red circle, on the left."], ("cap", 1): [""]})
    assert tokenized == {("ref", 1): ["a red circle on the left"], ("cap", 1): [""]}


@requires_java
def test_an_empty_caption_scores_zero_without_breaking_the_others(scorer):
    scores = scorer.score(REFERENCES, {**CANDIDATES, 3: ""})
    assert all(value >= 0 for value in scores.values())
    blank = scorer.score({1: REFERENCES[1]}, {1: ""})
    assert blank["CIDEr"] == 0 and blank["ROUGE_L"] == 0


@requires_java
def test_mismatched_keys_are_an_error(scorer):
    with pytest.raises(ValueError, match="same image keys"):
        scorer.score(REFERENCES, {1: "a red circle"})
    with pytest.raises(ValueError, match="no captions"):
        scorer.score({}, {})


@requires_java
def test_closing_ends_the_meteor_process():
    with CocoScorer() as scorer:
        scorer.score({1: ["a red circle"]}, {1: "a red circle"})
        process = scorer._meteor.meteor_p
        assert process.poll() is None  # kept for the next score()
    assert process.poll() is not None  # ended and reaped: no Java process left behind
    scorer.close()  # idempotent


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ShowtellError, match="need Java.*install a Java runtime"):
        check_java()
    with pytest.raises(ShowtellError, match="need Java"):
        CocoScorer()
