"""Pacing a download on a thin link: a token bucket on chunk requests and the maintenance
window.

:class:`Pace` answers, before each chunk request, whether it may go out now: only inside
the maintenance window (:mod:`.window`), and only while the bucket holds tokens. A request
for ``n`` bytes takes ``n`` tokens; the bucket refills at ``max_kbps`` and holds at most one
second of them, so the bytes asked for average at most ``max_kbps`` over any stretch of a
few seconds whatever the chunk size and the number of requests in flight. A request may
take the bucket below zero (a chunk larger than a second's worth still goes out); the next
waits until the debt is paid. The rate counts artifact bytes, not the few per cent MQTT and
the chunk headers add.

The limits come from the device (``ota.max_kbps``, ``ota.maintenance_window``) and from the
signed desired document (``transfer.max_kbps``, ``transfer.window``): the lower rate wins,
and the device's own window wins over the document's (whoever set up the site knows its
link).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import Protocol

from edgekit.protocol.ota import DesiredDocument, Transfer

from .window import MaintenanceWindow, local_now

__all__ = ["DeviceLimits", "Pace", "TokenBucket"]

_MAX_SLEEP_S = 1.0  # a blocked wait looks at its cancel event at least this often


class TokenBucket:
    """``rate`` bytes a second, at most ``burst`` saved up; see the module docstring."""

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = rate if burst is None else burst
        self.clock = clock
        self.tokens = self.burst
        self.at = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Take ``n`` tokens when the bucket is not in debt; False (nothing taken) when it is."""
        with self._lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens <= 0:
                return False
            self.tokens -= n
            return True

    def seconds_to_ready(self) -> float:
        """How long until :meth:`take` succeeds."""
        with self._lock:
            missing = -(self.tokens + (self.clock() - self.at) * self.rate)
        return max(0.0, missing / self.rate)


class DeviceLimits(Protocol):
    """The device's own limits (``[ota]``: the config section or the updater's settings)."""

    @property
    def max_kbps(self) -> int: ...

    @property
    def maintenance_window(self) -> str: ...


class Pace:
    """Whether a download may ask for bytes now: the window and the bucket together."""

    def __init__(self, max_kbps: int | None = None, window: MaintenanceWindow | None = None,
                 *, clock: Callable[[], dt.datetime] = local_now,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.max_kbps = max_kbps
        self.window = window
        self.clock = clock
        self.monotonic = monotonic
        self.bucket = TokenBucket(max_kbps * 125.0, clock=monotonic) if max_kbps else None
        self.resumed = 0.0

    @classmethod
    def for_update(cls, section: DeviceLimits, doc: DesiredDocument) -> Pace:
        """The limits of one update: the device's ``[ota]`` and the document's ``transfer``
        (see the module docstring).

        Raises:
            ProtocolError: a window that does not parse (both are checked when read, so
                this is a bug).
        """
        transfer = doc.transfer or Transfer()
        rates = [r for r in (section.max_kbps, transfer.max_kbps) if r]
        window = MaintenanceWindow.parse(section.maintenance_window, "ota.maintenance_window")
        if window is None and transfer.window:
            window = MaintenanceWindow.parse(transfer.window, "desired.transfer.window")
        return cls(min(rates) if rates else None, window)

    @property
    def limited(self) -> bool:
        return self.bucket is not None or self.window is not None

    def open(self) -> bool:
        """Inside the maintenance window (or no window)."""
        return self.window is None or self.window.contains(self.clock())

    def admit(self, n: int) -> bool:
        """A request for ``n`` bytes may go out now (its tokens are taken)."""
        return self.open() and (self.bucket is None or self.bucket.take(n))

    def wait(self, n: int, cancel: threading.Event) -> None:
        """Block until ``n`` bytes may be asked for (or ``cancel`` is set). After a wait,
        :attr:`resumed` is the monotonic time it ended (a stall clock starts again there)."""
        waited = False
        while not cancel.is_set() and not self.admit(n):
            waited = True
            if self.window is not None and not self.open():
                pause = self.window.seconds_to_open(self.clock())
            else:
                pause = self.bucket.seconds_to_ready() if self.bucket is not None else 0.0
            cancel.wait(min(max(pause, 0.01), _MAX_SLEEP_S))
        if waited:
            self.resumed = self.monotonic()

    def __str__(self) -> str:
        parts = [f"{self.max_kbps} kbit/s" if self.max_kbps else "",
                 f"window {self.window}" if self.window else ""]
        return ", ".join(p for p in parts if p) or "no limit"
