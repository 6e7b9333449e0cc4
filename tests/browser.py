"""Headless Chromium (Debian's `chromium`, which `make test` installs) for the report pages' tests:
a screenshot of a page, and whatever the page logged to its console.

    shot = screenshot("file:///.../eval/report.html", tmp_path / "report.png")
    shot.image.size            # (1200, 1600)
    shot.console               # [] for a page that logged nothing: no JavaScript error, no log line
    pixel_spread(shot.image)   # the grey levels' standard deviation: about 0 for a blank page
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

from PIL import Image, ImageStat

CHROMIUM = "/usr/bin/chromium"
# Chromium's console lines on stderr with --enable-logging: `[...:INFO:CONSOLE:1] "message", source: ...`
CONSOLE_LINE = re.compile(r":CONSOLE(?::\d+)?\]\s*(.*)")
# No network here: without these, Chromium keeps trying to reach Google's services at start.
QUIET_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


@dataclasses.dataclass(frozen=True)
class Screenshot:
    image: Image.Image  # the page as rendered, RGB
    console: list[str]  # every line the page logged to its console (errors, uncaught exceptions, logs)


def screenshot(page: str, out: Path, width: int = 1200, height: int = 1600) -> Screenshot:
    """Renders `page` (a URL) at `width` x `height` into the PNG `out`, with its console's lines."""
    with tempfile.TemporaryDirectory(prefix="showtell-chromium-") as profile:
        done = subprocess.run(
            [
                CHROMIUM,
                *QUIET_FLAGS,
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                f"--screenshot={out}",
                f"--window-size={width},{height}",
                page,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
    console = [match.group(1) for line in done.stderr.splitlines() if (match := CONSOLE_LINE.search(line))]
    return Screenshot(Image.open(out).convert("RGB"), console)


def pixel_spread(image: Image.Image) -> float:
    """The standard deviation of the image's grey levels (0-255): 0 for a page of one colour."""
    return ImageStat.Stat(image.convert("L")).stddev[0]
