"""Headless Chromium (Debian's `chromium`, which `make test` installs) for the pages' tests: a
screenshot of a page, and whatever the page logged to its console.

    shot = screenshot("file:///.../eval/report.html", tmp_path / "report.png")
    shot.image.size            # (1200, 1600)
    shot.console               # [] for a page that logged nothing: no JavaScript error, no log line
    pixel_spread(shot.image)   # the grey levels' standard deviation: about 0 for a blank page

A page a test acts on (uploads a file, reads what the page then shows) is driven over Chromium's
DevTools protocol, as a person would use it:

    async with devtools_page(width=900, height=900) as page:
        await page.navigate("http://127.0.0.1:8000/")
        await page.set_input_files("#photo", [tmp_path / "photo.jpg"])
        text = await page.wait_for("document.querySelector('li')?.textContent")
        image = await page.screenshot(tmp_path / "page.png")
        page.console           # what it logged, uncaught exceptions included
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import aiohttp
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
        browser = subprocess.Popen(
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
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            _, stderr = browser.communicate(timeout=120)
        finally:
            _end_process_group(browser)
        if browser.returncode != 0:
            raise subprocess.CalledProcessError(browser.returncode, browser.args, stderr=stderr)
    console = [match.group(1) for line in stderr.splitlines() if (match := CONSOLE_LINE.search(line))]
    return Screenshot(Image.open(out).convert("RGB"), console)


def pixel_spread(image: Image.Image) -> float:
    """The standard deviation of the image's grey levels (0-255): 0 for a page of one colour."""
    return ImageStat.Stat(image.convert("L")).stddev[0]


DEVTOOLS_LINE = re.compile(r"DevTools listening on ws://([\w.]+:\d+)/")  # Chromium's stderr, once it listens
STARTS_WITHIN_S = 60.0  # Chromium's start, to its DevTools line


class DevToolsError(Exception):
    """A DevTools command that failed, or a page expression that threw."""


class DevToolsPage:
    """One Chromium tab over its DevTools websocket: commands in order, each awaited; the events
    that arrive meanwhile are kept (its console's lines, page loads)."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse):
        self.socket = socket
        self.console: list[str] = []  # console.* calls as "type: text", uncaught exceptions as "exception: ..."
        self.loads = 0  # Page.loadEventFired events so far
        self.sent = 0

    async def send(self, method: str, **params: Any) -> dict:
        """Runs a DevTools command (https://chromedevtools.github.io/devtools-protocol/); its result."""
        self.sent += 1
        command = self.sent
        await self.socket.send_json({"id": command, "method": method, "params": params})
        reply = await self._receive(lambda message: message.get("id") == command)
        if "error" in reply:
            raise DevToolsError(f"{method}: {reply['error'].get('message')}")
        return reply["result"]

    async def navigate(self, url: str) -> None:
        """Opens `url` and returns once it has loaded (its load event)."""
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        loads = self.loads
        await self.send("Page.navigate", url=url)
        await self._receive(lambda message: self.loads > loads)

    async def set_input_files(self, selector: str, paths: Sequence[Path]) -> None:
        """Picks `paths` in the file input at `selector`, as a person does: its change event fires."""
        document = await self.send("DOM.getDocument")
        node = await self.send("DOM.querySelector", nodeId=document["root"]["nodeId"], selector=selector)
        if not node["nodeId"]:
            raise DevToolsError(f"no element matches {selector}")
        await self.send("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(path) for path in paths])

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression on the page (a promise's, once it settles)."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression}: {_exception_text(result['exceptionDetails'])}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """The expression's value as soon as it is truthy, evaluated every 0.1 s for up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not (value := await self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise DevToolsError(f"still {value!r} after {timeout:g} s: {expression}")
            await asyncio.sleep(0.1)
        return value

    async def screenshot(self, out: Path) -> Image.Image:
        """The page as it shows now (its window), into the PNG `out`; the image, RGB."""
        data = base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"])
        out.write_bytes(data)
        return Image.open(io.BytesIO(data)).convert("RGB")

    async def _receive(self, until: Callable[[dict], bool]) -> dict:
        """Reads messages, keeping the events', until one for which `until` holds; that message."""
        while True:
            message = await self.socket.receive_json()
            method, params = message.get("method"), message.get("params", {})
            if method == "Runtime.consoleAPICalled":
                text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params["args"])
                self.console.append(f"{params['type']}: {text}")
            elif method == "Runtime.exceptionThrown":
                self.console.append(f"exception: {_exception_text(params['exceptionDetails'])}")
            elif method == "Page.loadEventFired":
                self.loads += 1
            if until(message):
                return message


def _exception_text(details: dict) -> str:
    exception = details.get("exception", {})
    return exception.get("description") or details.get("text", "")


@contextlib.asynccontextmanager
async def devtools_page(width: int = 1200, height: int = 1600) -> AsyncIterator[DevToolsPage]:
    """A headless Chromium of its own, its window `width` x `height`, and its one tab (blank) to drive."""
    with tempfile.TemporaryDirectory(prefix="showtell-chromium-") as profile:
        stderr_path = Path(profile) / "stderr.txt"
        with open(stderr_path, "wb") as stderr:
            browser = subprocess.Popen(
                [
                    CHROMIUM,
                    *QUIET_FLAGS,
                    f"--user-data-dir={profile}/data",
                    "--remote-debugging-port=0",  # any free port; Chromium prints it
                    f"--window-size={width},{height}",
                    "about:blank",
                ],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            address = await _devtools_address(browser, stderr_path)
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://{address}/json/list") as response:
                    targets = await response.json()
                tab = next(target for target in targets if target["type"] == "page")
                async with session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as socket:
                    yield DevToolsPage(socket)
        finally:
            _end_process_group(browser)


def _end_process_group(browser: subprocess.Popen, within_s: float = 30.0) -> None:
    """Ends Chromium and every process it started (renderers, utility processes, crashpad), which
    share its process group, and waits until none of them runs: a renderer still writing into the
    profile makes removing the profile fail ("Directory not empty")."""
    group = browser.pid  # start_new_session=True: Chromium leads its own group
    for sig, wait_s in ((signal.SIGTERM, within_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, sig)
        deadline = time.monotonic() + wait_s
        while (browser.poll() is None or _running_in_group(group)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if browser.poll() is not None and not _running_in_group(group):
            return


def _running_in_group(group: int) -> bool:
    """Whether a process of process group `group` still runs (zombies, waiting to be reaped, do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses, so split after its last ')'
            state, _, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
            if int(pgrp) == group and state != "Z":
                return True
    return False


async def _devtools_address(browser: subprocess.Popen, stderr_path: Path) -> str:
    """host:port of the DevTools server, from the line Chromium writes on its stderr once it listens."""
    deadline = time.monotonic() + STARTS_WITHIN_S
    while time.monotonic() < deadline:
        match = DEVTOOLS_LINE.search(stderr_path.read_text(errors="replace"))
        if match:
            return match.group(1)
        if browser.poll() is not None:
            raise DevToolsError(f"Chromium exited ({browser.returncode}): {stderr_path.read_text(errors='replace')}")
        await asyncio.sleep(0.1)
    raise DevToolsError(f"Chromium printed no DevTools address within {STARTS_WITHIN_S:g} s")
