"""`{date}` in a config: the run's day, for configs that name one run_root per day.

    # configs/nightly.yaml: run_root: gs://YOUR-BUCKET/showtell/runs/{date}
    day = run_day("2025-01-31T02:00:07Z")                    # -> "2025-01-31"
    fill_date({"run_root": "gs://b/runs/{date}"}, day)       # -> {"run_root": "gs://b/runs/2025-01-31"}

`schemas.config.load_dated_config` applies it to a loaded config, for `showtell run` and
`showtell status`; other subcommands leave `{date}` as it is.
"""
from __future__ import annotations

import datetime
from typing import Any, Optional

from schemas.errors import ShowtellError

DATE_FIELD = "{date}"  # in any string value of a config, stands for the run's day (YYYY-MM-DD)


def run_day(date: Optional[str]) -> str:
    """YYYY-MM-DD (UTC) of `date`: a day, an ISO 8601 time (converted to UTC), or None for today.

        run_day("2025-01-31")                 # -> "2025-01-31"
        run_day("2025-01-31T23:30:00-02:00")  # -> "2025-02-01" (a Kubeflow job's creation time, say)
        run_day("31/01/2025")                 # ShowtellError: expected YYYY-MM-DD or an ISO 8601 time
    """
    if date is None:
        return datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    try:
        return datetime.date.fromisoformat(date).isoformat()
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(date.replace("Z", "+00:00"))  # Python 3.10 reads no "Z"
    except ValueError:
        raise ShowtellError(f"--date {date!r}: expected YYYY-MM-DD or an ISO 8601 time, e.g. 2025-01-31") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.timezone.utc)
    return moment.date().isoformat()


def fill_date(node: Any, day: str) -> Any:
    """`node` (a config tree, or any value in it) with `{date}` in every string replaced by `day`."""
    if isinstance(node, str):
        return node.replace(DATE_FIELD, day)
    if isinstance(node, dict):
        return {key: fill_date(value, day) for key, value in node.items()}
    if isinstance(node, list):
        return [fill_date(value, day) for value in node]
    return node
