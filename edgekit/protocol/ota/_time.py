"""Timestamps in OTA documents: ISO 8601 in UTC with a ``Z``, to the second."""

from __future__ import annotations

import datetime as dt

from edgekit.errors import ProtocolError

_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_time(when: dt.datetime | None = None) -> str:
    """``when`` (default: now) as ``2026-01-31T12:00:00Z``."""
    moment = when or dt.datetime.now(dt.UTC)
    return moment.astimezone(dt.UTC).strftime(_FORMAT)


def parse_time(text: object, where: str) -> dt.datetime:
    """Parse a timestamp written by :func:`format_time` (any ISO 8601 with a zone is accepted).

    Raises:
        ProtocolError: not a string, not ISO 8601, or without a time zone; names ``where``.
    """
    if not isinstance(text, str):
        raise ProtocolError(f"{where}: expected an ISO 8601 time string, found {_kind(text)}")
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ProtocolError(f"{where}: {text!r} is not an ISO 8601 time") from exc
    if moment.tzinfo is None:
        raise ProtocolError(f"{where}: {text!r} has no time zone",
                            hint="write times in UTC with a trailing Z")
    return moment.astimezone(dt.UTC)


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
