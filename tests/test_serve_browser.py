"""`showtell serve`'s page in a real browser: headless Chromium loads GET /, a photo is picked in
its file input as a person picks one, and the page shows the model's own captions (or, for a file
that is no image, the server's reason). The tiny export (tests/captioning.py), real Ray Serve."""
from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Iterator

import pytest

from inference.captioner import load_captioner
from inference.serve import ServeSettings, serving
from tests.browser import devtools_page, pixel_spread
from tests.captioning import export_tiny, image
from tests.s3_server import free_port

PHOTO = image(3, size=96)
# The page's captions once they are there: [[sentence, "p = ..."], ...], best first.
SHOWN_CAPTIONS = (
    "[...document.querySelectorAll('#captions li')]"
    ".map(li => [li.querySelector('.sentence').textContent, li.querySelector('.p').textContent])"
)
SHOWN_ERROR = "document.querySelector('#status.error')?.textContent"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    return export_tiny(tmp_path_factory.mktemp("serve_browser"))


@pytest.fixture(scope="module")
def url(exported) -> Iterator[str]:
    with serving(ServeSettings(model=exported, port=free_port())) as served:
        yield served


async def pick_on_the_page(url: str, file: Path, shown: str, screenshot: Path) -> tuple[object, list[str], object]:
    """Loads the page, picks `file` in its file input, waits for `shown` to be truthy; its value,
    the page's console lines, and the screenshot taken then."""
    async with devtools_page(width=800, height=700) as page:
        await page.navigate(f"{url}/")
        await page.set_input_files("#photo", [file])
        value = await page.wait_for(f"(() => {{ const v = {shown}; return v && v.length ? v : null; }})()")
        image = await page.screenshot(screenshot)
        return value, page.console, image


def test_a_photo_picked_on_the_page_shows_the_models_captions(url, exported, tmp_path):
    model = load_captioner(exported)
    expected = model.caption([PHOTO], **dataclasses.asdict(model.default_search()))[0]
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(PHOTO)

    shown, console, screenshot = asyncio.run(pick_on_the_page(url, photo, SHOWN_CAPTIONS, tmp_path / "page.png"))

    assert shown == [[sentence, f"p = {p:.6f}"] for sentence, p in expected]
    assert console == []  # no JavaScript error, no log line
    assert pixel_spread(screenshot) > 20  # the photo and the text on white: a blank page is about 0


def test_a_file_that_is_no_image_shows_the_servers_reason_on_the_page(url, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("a shopping list, not a photo")

    shown, console, _ = asyncio.run(pick_on_the_page(url, notes, SHOWN_ERROR, tmp_path / "page.png"))

    assert shown.startswith("400: not an image that can be decoded (")
    assert console == []
