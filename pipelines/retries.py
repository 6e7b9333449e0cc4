"""The retry and error policy of `showtell download`: which source failures are tried again, how
long to wait, when to give up, and what the user is told.

- Retried (transient): an HTTP 5xx, 408 (request timeout) or 429 (too many requests), a timeout,
  and a refused, reset or dropped connection, a stream that ends early (`IncompleteRead`) included.
- Final at once: any other HTTP 4xx, a missing source, and every ShowtellError (a checksum or size
  mismatch, a bad checksum setting). A 404, a 410 or a missing file becomes `SourceNotFoundError`,
  another HTTP status a ShowtellError, both naming the URL; any other error is re-raised as it is.
- Backoff: the n-th retry in a row waits `download.backoff_seconds * 2**(n - 1)`.
- Counting: failures count in a row since the last progress. When `position()` (the bytes
  written so far) has moved on since the previous failure, the count starts again, so a long
  download that keeps making progress is not cut short by drops spread over hours. After
  `download.retries` further attempts without progress the last failure becomes a ShowtellError
  ("giving up after N failed attempt(s) in a row: ..."), saying where a partial is kept.

    with_retries(lambda: fs.info(path), settings, url)
    # HTTP 503, 503, then 200: two warnings ("retry 1 of 5 in 1.00s", "retry 2 of 5 in 2.00s"), the info
    # HTTP 404: SourceNotFoundError("http://host/zips/val2014.zip: HTTP 404 Not Found"), no retry
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterator, Optional, TypeVar

import aiohttp

from schemas.config import Download
from schemas.errors import ShowtellError

log = logging.getLogger("showtell.download")

T = TypeVar("T")
_RETRIED_4XX = (408, 429)  # client-error statuses that mean "try again later"


class SourceNotFoundError(ShowtellError):
    """The source file does not exist (e.g. HTTP 404): retrying will not help."""


class IncompleteRead(ConnectionError):
    """The source stream ended before the size the store reported: treated as a dropped connection."""


def with_retries(
    action: Callable[[], T],
    settings: Download,
    url: str,
    position: Callable[[], int] = lambda: 0,
    kept: Optional[str] = None,
) -> T:
    """Runs `action`, retrying transient failures of the source `url` with exponential backoff.

    `position()` is the progress made so far (bytes written): failures count from the last one
    after which it moved on. `kept` names a partial file that a final failure leaves for the next
    run to resume, so the message can say so.
    """
    failures, last_position = 0, position()
    while True:
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - classified below; non-transient errors re-raise
            if not _is_transient(error):
                user_error = _user_error(error, url)
                if user_error is error:
                    raise
                raise user_error from error
            if position() != last_position:
                failures, last_position = 0, position()
            if failures >= settings.retries:
                note = f"; {kept} is kept for the next run to resume" if kept else ""
                raise ShowtellError(
                    f"{url}: giving up after {failures + 1} failed attempt(s) in a row: {_describe(error)}{note}"
                ) from error
            delay = settings.backoff_seconds * 2**failures
            failures += 1
            resume = f" from byte {position()}" if position() else ""
            log.warning(
                "%s: %s; retry %d of %d%s in %.2fs", url, _describe(error), failures, settings.retries, resume, delay
            )
            time.sleep(delay)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and its causes, outermost first."""
    seen: set[int] = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _response_error(error: BaseException) -> Optional[aiohttp.ClientResponseError]:
    """The HTTP error response behind `error` (fsspec wraps some in FileNotFoundError), if there is one."""
    return next((item for item in _chain(error) if isinstance(item, aiohttp.ClientResponseError)), None)


def _http_status(error: BaseException) -> Optional[int]:
    """The HTTP status behind `error`, if there is one."""
    response = _response_error(error)
    return response.status if response is not None else None


def _is_transient(error: BaseException) -> bool:
    """A 5xx, 408, 429, timeout or dropped/refused connection: worth another attempt."""
    if isinstance(error, ShowtellError):
        return False
    status = _http_status(error)
    if status is not None:
        return status >= 500 or status in _RETRIED_4XX
    return any(isinstance(item, (aiohttp.ClientError, TimeoutError, ConnectionError)) for item in _chain(error))


def _describe(error: BaseException) -> str:
    """A short human account of a source failure."""
    response = _response_error(error)
    if response is not None:
        return f"HTTP {response.status} {response.message}".strip()
    if any(isinstance(item, TimeoutError) for item in _chain(error)):
        return "timed out waiting for data"
    # fsspec reports an unreachable HTTP server as FileNotFoundError: describe the cause instead.
    network = next((item for item in _chain(error) if isinstance(item, (aiohttp.ClientError, ConnectionError))), None)
    if network is not None:
        return str(network) or type(network).__name__
    if isinstance(error, FileNotFoundError):
        return "not found"
    return next((str(item) for item in _chain(error) if str(item)), type(error).__name__)


def _user_error(error: BaseException, url: str) -> Exception:
    """A ShowtellError naming `url` for failures a user can act on; other errors unchanged."""
    if isinstance(error, ShowtellError):
        return error
    status = _http_status(error)
    if status in (404, 410) or (status is None and isinstance(error, FileNotFoundError)):
        return SourceNotFoundError(f"{url}: {_describe(error)}")
    if status is not None:
        return ShowtellError(f"{url}: {_describe(error)}")
    return error
