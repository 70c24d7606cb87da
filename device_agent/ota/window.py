"""The maintenance window: the hours of the device's local day when it may download.

Written ``HH:MM-HH:MM`` in local time (the device's clock and time zone): ``01:00-05:00``
opens at one and closes at five; a window whose end is not after its start runs over
midnight (``22:00-06:00``). The start is inside the window, the end is not. An empty text
means no window (always open). Documents and the configuration carry the text; the parsing
and its errors live here and in :func:`edgekit.protocol.ota.parse_window`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from edgekit.protocol.ota import parse_window

__all__ = ["MaintenanceWindow", "local_now"]

_DAY = 24 * 60


def local_now() -> dt.datetime:
    """The device's local time (its clock and time zone)."""
    return dt.datetime.now().astimezone()


@dataclass(frozen=True)
class MaintenanceWindow:
    """Minutes after local midnight: ``start`` (inside) to ``end`` (outside)."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str, where: str = "window") -> MaintenanceWindow | None:
        """``HH:MM-HH:MM``; None for an empty text.

        Raises:
            ProtocolError: not two times of the day (the message names ``where``).
        """
        minutes = parse_window(text, where)
        return None if minutes is None else cls(*minutes)

    def contains(self, moment: dt.datetime) -> bool:
        minute = moment.hour * 60 + moment.minute
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def seconds_to_open(self, moment: dt.datetime) -> float:
        """0 inside the window, else the seconds until it opens."""
        if self.contains(moment):
            return 0.0
        minute = moment.hour * 60 + moment.minute
        ahead = (self.start - minute) % _DAY
        return ahead * 60.0 - moment.second - moment.microsecond / 1e6

    def __str__(self) -> str:
        return f"{_hhmm(self.start)}-{_hhmm(self.end)}"


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"
