"""The agent's outgoing telemetry queue: events, metrics and samples, each with its ``seq``.

:class:`EventSink` is what every part that reports something holds (the model slot's start,
the OTA updater, the request path's samples, the telemetry tick): it logs events, and with
MQTT configured it queues each document in the outbox under the next ``seq`` of its kind and
wakes the link's sender. Without MQTT only the log is written.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from edgekit.protocol import (
    MAX_EVENT_MESSAGE,
    EventKind,
    EventLevel,
    EventPayload,
    Kind,
    MetricsPayload,
    SamplePayload,
    encode,
    topic,
)

from ._mqtt import MqttLink
from ._outbox import Outbox
from .config import DeviceSection

__all__ = ["EventSink"]

log = logging.getLogger("device_agent")

_LOG_LEVEL = {EventLevel.ERROR: logging.ERROR, EventLevel.WARNING: logging.WARNING}


class EventSink:
    """Events and other telemetry documents of one device, into its outbox."""

    def __init__(self, device: DeviceSection, outbox: Outbox | None) -> None:
        self.device = device
        self.outbox = outbox
        self.link: MqttLink | None = None

    def attach(self, link: MqttLink | None) -> None:
        """Send through ``link`` (its session keys the events; it is woken on each put)."""
        self.link = link

    def topic(self, kind: Kind) -> str:
        return topic(self.device.fleet, self.device.id, kind)

    def event(self, kind: EventKind | str, level: EventLevel, message: str, *,
              reason: str | None = None, data: dict[str, Any] | None = None) -> None:
        """Log an event and queue it for the ``events`` topic."""
        log.log(_LOG_LEVEL.get(level, logging.INFO), "%s", message)
        if self.outbox is None:
            return
        # ``session`` keys the event with ``seq`` on the host: the connection session the
        # agent is on (0 before the MQTT link starts).
        payload = EventPayload(device=self.device.id, fleet=self.device.fleet, seq=0,
                               ts=time.time(),
                               session=self.link.session if self.link is not None else 0,
                               kind=kind.value if isinstance(kind, EventKind) else kind,
                               level=level, message=message[:MAX_EVENT_MESSAGE],
                               reason=reason or None, data=data or None)
        self.queue(Kind.EVENTS, payload)

    def queue(self, kind: Kind, payload: EventPayload | MetricsPayload | SamplePayload) -> int:
        """Queue ``payload`` with the next ``seq`` of its kind (set on it); return the seq,
        or 0 without an outbox (no MQTT)."""
        if self.outbox is None:
            return 0

        def make(seq: int) -> bytes:
            payload.seq = seq
            return encode(payload)

        seq = self.outbox.put(self.topic(kind), make, f"seq.{kind.value}")
        if self.link is not None:
            self.link.notify()
        return seq
