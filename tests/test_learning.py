"""Learning check: the demo's training budget (configs/local.yaml) brings validation perplexity
well below the unigram perplexity of the same captions. Real sample data, Beam, Ray and TF."""
from __future__ import annotations

import pytest

from orchestration.cli import main as cli_main
from schemas.config import load_config
from trainer.validation import validate_phase

pytestmark = pytest.mark.slow


def test_demo_budget_beats_the_unigram_baseline_by_far(tmp_path):
    overrides = [f"run_root={tmp_path / 'run'}"]
    config_args = ["--config", "configs/local.yaml", *(arg for o in overrides for arg in ("--set", o))]
    for step in (["download"], ["preprocess"], ["train", "--phase", "1"]):
        assert cli_main(["-q", *step, *config_args]) == 0, step

    scores = validate_phase(load_config("configs/local.yaml", overrides), phase=1)

    assert scores["unigram_perplexity"] > 10  # a real baseline: dozens of words in play
    assert scores["perplexity"] < scores["unigram_perplexity"] / 3, scores
