"""`make demo`: the pipeline so far on the embedded default config, ending with the report summary."""
from __future__ import annotations

import sys

from orchestration.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for step in ("download", "preprocess"):
        code = cli_main([step, *argv])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
