"""tests/browser.py, the report pages' screenshot checks, can fail: a page that throws is caught,
and a blank page is told from a drawn one."""
from __future__ import annotations

from tests.browser import pixel_spread, screenshot


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
