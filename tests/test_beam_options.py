"""pipelines/beam_options.py: runner flags from the `beam:` config section."""
from __future__ import annotations

import os

import pytest
from apache_beam.options.pipeline_options import DirectOptions, GoogleCloudOptions, StandardOptions

from pipelines.beam_options import pipeline_options
from schemas.config import Beam

DIRECT_FLAGS = {"direct_running_mode", "direct_num_workers"}


def _set_options(options) -> dict:
    return options.get_all_options(drop_default=True, retain_unknown_options=True)


@pytest.mark.parametrize("runner", ["DirectRunner", "direct"])
@pytest.mark.parametrize("mode", ["in_memory", "multi_threading", "multi_processing"])
def test_direct_runner_gets_the_configured_mode_and_workers(runner, mode):
    options = pipeline_options(Beam(runner=runner, direct_running_mode=mode, direct_num_workers=3), "preprocess")

    direct = options.view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == (mode, 3)
    assert options.view_as(StandardOptions).runner == runner
    assert options.view_as(GoogleCloudOptions).job_name == "preprocess"


def test_direct_runner_zero_workers_means_one_per_cpu():
    options = pipeline_options(Beam(direct_num_workers=0), "job")

    assert options.view_as(DirectOptions).direct_num_workers == (os.cpu_count() or 1)
    assert options.view_as(DirectOptions).direct_running_mode == "multi_processing"


def test_dataflow_runner_passes_beam_options_through_and_adds_no_direct_flags():
    extra = ["--project=p", "--region=us-central1", "--temp_location=gs://b/tmp", "--setup_file=./setup.py"]

    options = pipeline_options(Beam(runner="DataflowRunner", direct_num_workers=5, options=extra), "showtell-prep")

    assert _set_options(options) == {
        "runner": "DataflowRunner",
        "job_name": "showtell-prep",
        "project": "p",
        "region": "us-central1",
        "temp_location": "gs://b/tmp",
        "setup_file": "./setup.py",
    }
    assert not DIRECT_FLAGS & set(_set_options(options))


def test_unknown_extra_options_are_kept_untouched():
    options = pipeline_options(Beam(runner="FlinkRunner", options=["--my_custom_flag=x y", "--another"]), "j")

    assert options.get_all_options(retain_unknown_options=True)["my_custom_flag"] == "x y"
    assert options.get_all_options(retain_unknown_options=True)["another"] is True
    assert not DIRECT_FLAGS & set(_set_options(options))


def test_beam_options_win_over_the_configured_direct_flags():
    options = pipeline_options(
        Beam(direct_num_workers=2, options=["--direct_num_workers=7", "--direct_running_mode=in_memory"]), "j"
    )

    direct = options.view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == ("in_memory", 7)


def test_beam_options_can_override_the_runner():
    options = pipeline_options(Beam(runner="DirectRunner", options=["--runner=DataflowRunner"]), "j")

    assert options.view_as(StandardOptions).runner == "DataflowRunner"
