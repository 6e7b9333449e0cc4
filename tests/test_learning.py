"""Learning check: the demo's training budget (configs/local.yaml) brings validation perplexity
well below the unigram perplexity of the same captions. Real sample data, Beam, Ray and TF."""
from __future__ import annotations

import pytest

from trainer.validation import validate_phase

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("phase", [1, 2])
def test_demo_budget_beats_the_unigram_baseline_by_far(demo_run, phase):
    scores = validate_phase(demo_run.config, phase=phase)

    assert scores["unigram_perplexity"] > 10  # a real baseline: dozens of words in play
    assert scores["perplexity"] < scores["unigram_perplexity"] / 3, scores
