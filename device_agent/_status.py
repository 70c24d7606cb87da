"""The device's retained status: built and published from this one place.

:class:`StatusPublisher` builds the status document (the birth and the will of each MQTT
session, ``stopped`` at shutdown, and a fresh ``online`` one whenever something it shows
changes) and publishes it when the link is up. The MQTT link asks it for the bytes of the
birth, will and stop; the model slot's swap listener and the OTA updater call
:meth:`StatusPublisher.publish` after a change.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edgekit.protocol import (
    DeviceState,
    HardwareInfo,
    Kind,
    RuntimeInfo,
    StatusPayload,
    encode,
    topic,
)
from edgekit.protocol.ota import UpdateStatus
from edgekit.signing import key_id

from ._model import TrustPolicy
from ._mqtt import MqttLink
from ._slot import ModelSlot
from .config import DeviceSection

__all__ = ["StatusPublisher"]

UpdateSection = Callable[[], "UpdateStatus | None"]


class StatusPublisher:
    """The status of one agent. ``http_address``, ``runtimes`` and ``update_section`` are
    filled in by the parts that know them."""

    def __init__(self, device: DeviceSection, version: str, slot: ModelSlot,
                 trust: TrustPolicy, hardware: HardwareInfo) -> None:
        self.device = device
        self.version = version
        self.started = time.time()
        self.slot = slot
        self.trust = trust
        self.hardware = hardware
        self.runtimes: list[RuntimeInfo] = []
        self.http_address: str | None = None
        self.update_section: UpdateSection = lambda: None
        self.link: MqttLink | None = None

    @property
    def topic(self) -> str:
        return topic(self.device.fleet, self.device.id, Kind.STATUS)

    def attach(self, link: MqttLink | None) -> None:
        self.link = link

    def build(self, session: int, state: DeviceState, reason: str | None) -> StatusPayload:
        model = self.slot.current
        return StatusPayload(
            state=state,
            device=self.device.id,
            fleet=self.device.fleet,
            session=session,
            ts=time.time(),
            agent_version=self.version,
            runtimes=self.runtimes,
            hardware=self.hardware,
            # The will is set before the connection and published after it died, when
            # nothing serves: it names no model (the last online status of the session does).
            model=model.ref if model is not None and state != DeviceState.OFFLINE else None,
            http=self.http_address,
            started=self.started,
            reason=reason or None,
            update=self.update_section(),
            trusted_keys=[key_id(k) for k in self.trust.trusted_keys],
            allow_unsigned=bool(self.trust.allow_unsigned),
            variant=model.variant if model is not None and state != DeviceState.OFFLINE else None,
        )

    def encoded(self, session: int, state: DeviceState, reason: str | None) -> bytes:
        """The status as bytes (the MQTT link's birth, will and stop)."""
        return encode(self.build(session, state, reason))

    def publish(self) -> None:
        """Publish a fresh ``online`` status (retained) if the link is up."""
        link = self.link
        if link is not None and link.connected:
            link.publish(self.topic, self.encoded(link.session, DeviceState.ONLINE, None),
                         retain=True)
