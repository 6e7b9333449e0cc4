"""`make demo`: the pipeline so far on the embedded default config.

Mirrors the sample data, preprocesses it, trains phase 1 and phase 2, and ends with each
phase's validation perplexity beside the unigram baseline it has to beat.
"""
from __future__ import annotations

import sys

from orchestration.cli import main as cli_main
from schemas.config import load_config


def _config_args(argv: list[str]) -> tuple[str, list[str]]:
    """(--config value, --set values) from the demo's own arguments."""
    path, overrides = "configs/local.yaml", []
    for flag, value in zip(argv, argv[1:]):
        if flag == "--config":
            path = value
        elif flag == "--set":
            overrides.append(value)
    return path, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for step in (["download"], ["preprocess"], ["train", "--phase", "1"], ["train", "--phase", "2"]):
        code = cli_main([*step, *argv])
        if code:
            return code
    from trainer.validation import validate_phase

    config = load_config(*_config_args(argv))
    print("\nvalidation perplexity (teacher-forced, val split):")
    for phase in (1, 2):
        scores = validate_phase(config, phase)
        print(f"  phase {phase}: {scores['perplexity']:.2f}   (unigram baseline {scores['unigram_perplexity']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
