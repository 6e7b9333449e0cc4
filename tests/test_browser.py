"""tests/browser.py, the report pages' screenshot checks, can fail: a page that throws is caught,
and a blank page is told from a drawn one. And the run report of a real tiny run renders
(`tiny_run`, shared with tests/test_run_report.py; eval/report.html's screenshot is in
tests/test_evaluate.py)."""
from __future__ import annotations

import pytest

from schemas.layout import RUN_REPORT_FILE
from tests.browser import pixel_spread, screenshot
from tests.test_run_report import TinyRun, tiny_run_once


def test_a_page_that_throws_logs_the_uncaught_error_to_the_console(tmp_path):
    page = tmp_path / "throws.html"
    page.write_text("<html><body><h1>report</h1><script>undefinedFunction();</script></body></html>")

    shot = screenshot(page.as_uri(), tmp_path / "throws.png", width=400, height=300)

    assert any("Uncaught ReferenceError: undefinedFunction is not defined" in line for line in shot.console)


def test_a_blank_page_has_no_pixel_spread_and_a_drawn_one_has(tmp_path):
    blank, drawn = tmp_path / "blank.html", tmp_path / "drawn.html"
    blank.write_text("<html><body style='background: white'></body></html>")
    drawn.write_text(
        "<html><body style='margin: 0'><div style='width: 200px; height: 300px; background: black'></div>"
        "</body></html>"
    )

    blank_shot = screenshot(blank.as_uri(), tmp_path / "blank.png", width=400, height=300)
    drawn_shot = screenshot(drawn.as_uri(), tmp_path / "drawn.png", width=400, height=300)

    assert blank_shot.console == [] and pixel_spread(blank_shot.image) < 1
    assert pixel_spread(drawn_shot.image) > 100  # half black, half white: a spread of about 127


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    return tiny_run_once(tmp_path_factory)


@pytest.mark.slow
def test_the_run_report_renders_in_a_headless_browser_with_no_console_errors(tiny_run, tmp_path):
    page = tiny_run.root / RUN_REPORT_FILE

    shot = screenshot(page.as_uri(), tmp_path / "run_report.png")

    assert shot.console == []
    assert shot.image.size == (1200, 1600)
    assert pixel_spread(shot.image) > 20  # text, tables and charts on white: a blank page is about 0
