"""Beam pipeline options from the `beam:` config section, shared by every showtell pipeline."""
from __future__ import annotations

import os
from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions

from schemas.config import Beam


def pipeline_options(beam_config: Beam, job_name: str) -> PipelineOptions:
    """Runner flags from config; `beam.options` are appended untouched (they win over ours).

    On the DirectRunner, bundles run in `direct_num_workers` processes (default: one per core),
    since only `multi_processing` mode uses more than one core.
    """
    flags = [f"--runner={beam_config.runner}", f"--job_name={job_name}"]
    if is_direct_runner(beam_config.runner):
        workers = beam_config.direct_num_workers or os.cpu_count() or 1
        flags += [f"--direct_running_mode={beam_config.direct_running_mode}", f"--direct_num_workers={workers}"]
    return PipelineOptions(flags + list(beam_config.options))


def is_direct_runner(runner: Optional[str]) -> bool:
    """Whether `runner` (as `--runner` names it; None is Beam's default) is the DirectRunner,
    whose workers all run on this machine and share its disk."""
    return runner is None or runner.lower() in ("direct", "directrunner")
