"""A run's fingerprints do not depend on how a path is written (orchestration/manifest.py's
`Places` and content signatures): a real `showtell run --until preprocess` on the tiny sample,
made with a relative run_root, is up to date through its absolute path, in a copy elsewhere on
disk and in an upload to S3 (moto's server), and a changed input there still makes the step
reading it stale (`slow`: a real Beam run). A run over tests/run_table.py's small steps shows
that the hashes of big files are kept for the next look.

`showtell status` is `orchestration.run.step_status`; a row's `fingerprint` is "current" or
"stale", its `next_run` what `showtell run` would do.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestration import manifest as mf
from orchestration.cli import main as cli_main
from orchestration.run import SKIPPED, run_pipeline, step_status
from schemas.config import Config, build_config
from tests.run_table import TABLE, config_file, manifest_json, run_table, step_results
from tests.s3_server import s3_fixture
from tests.test_run_end_to_end import TINY

BUCKET = "showtell-fingerprints"
DONE_STEPS = ("download", "baseline", "preprocess")  # what `--until preprocess` ran

s3 = s3_fixture(BUCKET)  # a moto S3 server on 127.0.0.1 with BUCKET; an s3fs file system on it


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """The folder a run started in: `showtell run --until preprocess` of the tiny sample config
    with `run_root: run`, relative to that folder. The run folder is `<made>/run`."""
    folder = tmp_path_factory.mktemp("fingerprint-paths")
    config_file(folder, {**TINY, "run_root": "run"})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert cli_main(["-q", "run", "--config", "config.yaml", "--until", "preprocess"]) == 0
    return folder


@pytest.fixture(params=["hashed", "vouched"])
def signing(request, monkeypatch) -> str:
    """How the run's files are signed when looked at: small ones hashed (the default), or every
    file counted as big, so that `sample.json` vouches for the mirrored zips and the rest is
    hashed once (the run hashed them as small files: their signatures must be the same)."""
    if request.param == "vouched":
        monkeypatch.setattr(mf, "SMALL_FILE_BYTES", 0)
    return request.param


def _config(run_root: str) -> Config:
    return build_config({**TINY, "run_root": run_root})


def _rows(run_root: str) -> dict[str, tuple[str, str]]:
    """`showtell status` of the run at `run_root`: {step: (fingerprint, next_run)} for the steps it ran."""
    rows = step_status(_config(run_root))
    return {row.name: (row.fingerprint, row.next_run) for row in rows if row.name in DONE_STEPS}


UP_TO_DATE = {name: ("current", "skip") for name in DONE_STEPS}


@pytest.mark.slow
def test_a_run_made_through_a_relative_run_root_is_up_to_date_through_its_absolute_path(made, monkeypatch, tmp_path):
    monkeypatch.chdir(made)
    assert _rows("run") == UP_TO_DATE

    monkeypatch.chdir(tmp_path)  # another folder: only the absolute path reaches the run
    assert _rows(str(made / "run")) == UP_TO_DATE
    assert _rows(f"file://{made}/./run/") == UP_TO_DATE


@pytest.mark.slow
def test_a_run_through_the_absolute_path_skips_every_step_and_the_relative_one_stays_up_to_date(made, monkeypatch):
    result = run_pipeline(_config(str(made / "run")), until="preprocess")

    assert step_results(result) == {name: SKIPPED for name in DONE_STEPS}
    monkeypatch.chdir(made)
    assert _rows("run") == UP_TO_DATE


@pytest.mark.slow
def test_a_copy_of_the_run_folder_elsewhere_on_disk_is_up_to_date(made, tmp_path, signing):
    copy = tmp_path / "moved" / "run"
    shutil.copytree(made / "run", copy)

    assert _rows(str(copy)) == UP_TO_DATE


@pytest.mark.slow
def test_an_upload_of_the_run_folder_to_s3_is_up_to_date_and_a_run_there_skips_every_step(made, s3, signing):
    root = f"{BUCKET}/{signing}/run"
    s3.put(str(made / "run"), root, recursive=True)

    assert _rows(f"s3://{root}") == UP_TO_DATE
    assert step_results(run_pipeline(_config(f"s3://{root}"), until="preprocess")) == {
        name: SKIPPED for name in DONE_STEPS
    }


@pytest.mark.slow
def test_a_mirrored_file_changed_in_a_copy_makes_the_step_reading_it_stale(made, tmp_path, signing):
    copy = tmp_path / "copy" / "run"
    shutil.copytree(made / "run", copy)
    zip_file = copy / "raw" / "zips" / "val2014.zip"
    data = bytearray(zip_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of an image: same size, rewritten after sample.json vouched for it
    zip_file.write_bytes(bytes(data))

    rows = _rows(str(copy))

    assert rows["download"] == ("current", "skip")
    assert rows["preprocess"] == ("stale", "run: input {data.mirror}/zips/val2014.zip changed")
    assert _rows(str(made / "run")) == UP_TO_DATE  # the original is untouched


def test_a_run_keeps_the_hashes_of_big_files_it_made_even_when_it_skips_every_step(tmp_path, monkeypatch):
    monkeypatch.setattr(mf, "SMALL_FILE_BYTES", 0)  # every file is big: hashed once, then cached
    run_table(tmp_path / "run")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy, copy_function=shutil.copy)  # new modification times

    result = run_table(copy)

    assert step_results(result) == {step.name: SKIPPED for step in TABLE}
    hashes = manifest_json(copy)[mf.HASHES]
    assert sorted(hashes) == ["{run_root}/fetch.txt", "{run_root}/prepare.txt", "{run_root}/train.txt"]
    for key, cached in hashes.items():
        path = copy / key.removeprefix("{run_root}/")
        assert cached["stamp"] == f"size:{path.stat().st_size}:mtime:{path.stat().st_mtime}"
