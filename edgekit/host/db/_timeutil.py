"""UTC clock and the ``--since`` parser the host commands share."""

from __future__ import annotations

import datetime as dt
import re

from edgekit.errors import UsageError

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def utcnow() -> dt.datetime:
    """The current time, timezone-aware, in UTC."""
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    """An aware UTC datetime; a naive one is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def iso(value: dt.datetime | None) -> str | None:
    """ISO 8601 text in UTC (``...+00:00``), or None."""
    return None if value is None else as_utc(value).isoformat()


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """Parse ``--since``: an ISO 8601 time (naive means UTC) or a duration before now.

    Durations are numbers with units s, m, h, d, w, combined as in ``1h30m`` or ``7d``.

    Raises:
        UsageError: the text is neither; the message shows both forms.
    """
    raw = text.strip()
    parts = _DURATION_PART.findall(raw)
    if parts and "".join(n + u for n, u in parts) == raw:
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
        return (now or utcnow()) - dt.timedelta(seconds=seconds)
    try:
        return as_utc(dt.datetime.fromisoformat(raw))
    except ValueError:
        raise UsageError(
            f"--since {text!r} is neither an ISO time nor a duration",
            hint="use for example 2026-05-01T12:00:00Z, 30m, 2h, 1h30m or 7d",
        ) from None
