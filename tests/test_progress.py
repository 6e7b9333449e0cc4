"""Progress displays (schemas/progress.py): plain lines at a bounded rate off a terminal, a tqdm bar
on one, nothing when off; counts from real worker processes (plain subprocesses, Beam's
multi_processing DirectRunner) reach the driver's display."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from schemas import progress

REPO = Path(__file__).resolve().parent.parent
LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (?P<name>[\w ]+): "
    r"(?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \((?P<percent>\d+)%\), "
    r"(?P<rate>[\d.?e+]+) (?P=unit)/s, (?P<elapsed>[\d:]+) elapsed, (?P<left>[\d:]+|\?) left(?:; (?P<fields>.*))?$"
)


@pytest.fixture(autouse=True)
def _displays_off_after_each_test():
    yield
    progress.configure(None, bar=False)


def _python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, text=True, **kwargs)


def _lines(text: str) -> list[re.Match]:
    matches = [LINE.match(line) for line in text.splitlines()]
    assert all(matches), text
    return matches


def test_piped_a_display_writes_at_most_one_line_per_every_seconds_then_a_last_one():
    # A real process whose stderr is a pipe, configured as the CLI does: a bar only on a terminal.
    child = _python(
        """
        import sys, time
        from schemas import progress
        progress.configure(sys.stderr, bar=sys.stderr.isatty(), every=1.0)
        with progress.tracked("preprocess", total=70, unit="images"):
            for _ in range(70):
                progress.advance()
                time.sleep(0.05)
        """,
        stderr=subprocess.PIPE,
    )
    arrivals = []
    for line in child.stderr:
        arrivals.append((time.monotonic(), line.rstrip("\n")))
    assert child.wait(timeout=60) == 0

    lines = _lines("\n".join(text for _, text in arrivals))
    times = [when for when, _ in arrivals]
    assert 2 <= len(lines) <= 5  # ~3.5 s of work: a line a second at most, and the last one
    assert all(later - earlier >= 0.9 for earlier, later in zip(times[:-2], times[1:-1]))
    assert [int(m["done"]) for m in lines] == sorted(int(m["done"]) for m in lines)
    last = lines[-1]
    assert (last["done"], last["total"], last["percent"], last["left"]) == ("70", "70", "100", "00:00")
    assert float(last["rate"]) > 0


def test_a_line_shows_done_of_total_with_its_rate_time_left_and_fields():
    out = io.StringIO()
    progress.configure(out, bar=False, every=0.6)
    with progress.tracked("train phase 1", total=40, unit="steps"):
        for step in range(1, 21):
            progress.advance(at=step, loss=2.5, **{"examples/s": 120.25})
            time.sleep(0.06)

    first = _lines(out.getvalue())[0]
    assert first["name"] == "train phase 1" and first["total"] == "40" and first["unit"] == "steps"
    assert 0 < int(first["done"]) < 40 and first["percent"] == str(round(100 * int(first["done"]) / 40))
    assert float(first["rate"]) > 0 and first["left"] != "?"
    assert first["fields"] == "loss 2.5, examples/s 120.2"
    assert _lines(out.getvalue())[-1]["done"] == "20"


def test_on_a_terminal_the_display_is_a_tqdm_bar():
    out = io.StringIO()
    progress.configure(out, bar=True)
    with progress.tracked("evaluate", total=4, unit="checkpoints"):
        for _ in range(4):
            progress.advance(checkpoint="phase 1 step 200", images="20/20")
            time.sleep(0.2)

    text = out.getvalue()
    assert "\r" in text and "%|" in text  # tqdm redraws one line in place
    assert "4/4 [" in text.rsplit("\r", 1)[-1]
    assert "checkpoints/s, checkpoint phase 1 step 200, images 20/20]" in text


def test_off_a_display_shows_nothing_and_workers_get_no_spool():
    out = io.StringIO()
    progress.configure(out, bar=False, every=0.0)
    progress.configure(None, bar=False)
    with progress.tracked("preprocess", total=3, unit="images") as spool:
        assert spool is None and progress.SPOOL_ENV not in os.environ
        progress.advance(3)
    assert out.getvalue() == ""


def test_until_configured_displays_are_off():
    child = _python(
        """
        from schemas import progress
        with progress.tracked("preprocess", total=3, unit="images") as spool:
            progress.advance(3)
        print(spool)
        """,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = child.communicate(timeout=60)
    assert (out, err) == ("None\n", "")


def test_advance_without_a_reachable_spool_does_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.SPOOL_ENV, raising=False)
    progress.advance(5, loss=1.0)  # no display open anywhere

    elsewhere = tmp_path / "on-another-machine"  # as a remote worker sees the driver's spool
    monkeypatch.setenv(progress.SPOOL_ENV, str(elsewhere))
    progress.advance(5, loss=1.0)
    assert not elsewhere.exists()


def test_the_spool_is_named_for_the_block_only_and_removed_after(tmp_path):
    progress.configure(io.StringIO(), bar=False)
    with progress.tracked("preprocess", total=1, unit="images") as spool:
        assert os.environ[progress.SPOOL_ENV] == spool and os.path.isdir(spool)
        progress.advance()
    assert progress.SPOOL_ENV not in os.environ and not os.path.exists(spool)


def test_counts_from_worker_processes_add_up_on_the_drivers_display():
    out = io.StringIO()
    progress.configure(out, bar=False, every=60.0)
    with progress.tracked("preprocess", total=150, unit="images"):
        workers = [
            _python(
                """
                import time
                from schemas.progress import advance
                for _ in range(50):
                    advance()
                    time.sleep(0.01)
                """
            )
            for _ in range(3)
        ]
        assert [worker.wait(timeout=60) for worker in workers] == [0, 0, 0]

    (last,) = _lines(out.getvalue())  # every=60: only the last line
    assert (last["done"], last["total"]) == ("150", "150")


def test_the_latest_position_wins_when_a_restarted_worker_goes_back():
    out = io.StringIO()
    progress.configure(out, bar=False, every=60.0)
    with progress.tracked("train phase 1", total=800, unit="steps"):
        first = _python("from schemas.progress import advance; advance(at=500, loss=2.0)")
        assert first.wait(timeout=60) == 0
        time.sleep(0.05)  # its report is older than the restarted worker's
        restarted = _python("from schemas.progress import advance; advance(at=400, loss=2.2)")
        assert restarted.wait(timeout=60) == 0

    (last,) = _lines(out.getvalue())
    assert (last["done"], last["fields"]) == ("400", "loss 2.2")


def _checked(element: int) -> int:
    """A Beam DoFn's work: reports one element done, from whatever process runs it."""
    progress.advance()
    time.sleep(0.01)
    return os.getpid()


def test_counts_from_beams_multi_processing_workers_reach_the_display():
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that

    out = io.StringIO()
    progress.configure(out, bar=False, every=60.0)
    options = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    driver = os.getpid()

    def in_workers(pids):
        assert pids and driver not in pids

    with progress.tracked("preprocess", total=120, unit="images"):
        with beam.Pipeline(options=options) as pipeline:
            pids = pipeline | beam.Create(range(120)) | beam.Reshuffle() | beam.Map(_checked)
            assert_that(pids | beam.Distinct() | beam.combiners.ToList(), lambda lists: in_workers(lists[0]))

    (last,) = _lines(out.getvalue())
    assert (last["done"], last["total"]) == ("120", "120")
