"""What every part of the rollout engine shares: its construction, the records it keeps
(target states, rollout transitions, events, the retained rollout state) and how it reads the
outcomes devices report. :class:`~edgekit.host.controller.rollout.RolloutEngine` builds on it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.host.controller._documents import DesiredDocuments
from edgekit.host.controller.config import RolloutSection
from edgekit.host.db import RolloutRecord, RolloutState, Store, TargetRecord, TargetState, utcnow
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.server import ArtifactServer
from edgekit.host.registry import Registry
from edgekit.protocol import encode
from edgekit.protocol.controller import (
    RolloutModel,
    RolloutStatePayload,
    deployment_id,
    rollout_state_topic,
)
from edgekit.protocol.ota.events import UpdateStep, event_kind

__all__ = ["EngineBase", "count_states"]

log = logging.getLogger("edgekit.controller.rollout")

_FINAL_KINDS = [event_kind(s) for s in (UpdateStep.SUCCEEDED, UpdateStep.FAILED,
                                        UpdateStep.ROLLED_BACK)]
_CURSOR_OVERLAP = 1000


class EngineBase:
    """The rollout engine's shared state and records (see the module docstring)."""

    def __init__(self, store: Store, registry: Registry, client: HostClient,
                 settings: RolloutSection, *, controller_id: str, lease_s: float,
                 fleets: Iterable[str] = ("+",), server: ArtifactServer | None = None,
                 signing_key: Ed25519PrivateKey | None = None,
                 url_for: Callable[[str], str] | None = None,
                 delta_dir: Path | None = None) -> None:
        self.store = store
        self.registry = registry
        self.client = client
        self.settings = settings
        self.controller_id = controller_id
        self.lease_s = lease_s
        self.fleets = list(fleets)
        self.documents = DesiredDocuments(registry, client, server=server,
                                          signing_key=signing_key, url_for=url_for,
                                          delta_dir=delta_dir)
        self._cursors: dict[int, int] = {}  # rollout id -> last device event id read
        self._driving: dict[int, dt.datetime] = {}  # rollout id -> when this engine took it

    def _forget(self, rollout_id: int) -> None:
        self._driving.pop(rollout_id, None)
        self._cursors.pop(rollout_id, None)

    def _bases(self, fleet: str, devices: Iterable[str] | None = None) -> set[str]:
        """The packages ``devices`` (None: the fleet's) serve by their last status: what a
        delta can start from."""
        wanted = None if devices is None else set(devices)
        return {d.model_sha256 for d in self.store.list_devices(fleet)
                if d.model_sha256 and (wanted is None or d.device in wanted)}

    def _observe(self, rollout: RolloutRecord, *, back: bool) -> dict[str, TargetRecord]:
        """The targets, with the outcomes that devices reported since the last pass applied."""
        targets = {t.device: t for t in self.store.list_rollout_targets(rollout.id)}
        wanted = deployment_id(rollout.id, rollout.plan["token"], back=back)
        waiting = TargetState.ROLLING_BACK if back else TargetState.ASSIGNED
        cursor = self._cursors.get(rollout.id, 0)
        # Read a little behind the cursor: with several writers an event id can commit after
        # a higher one (PostgreSQL sequences), and an applied outcome is not applied twice.
        after = max(0, cursor - _CURSOR_OVERLAP)
        for event in self.store.list_events(rollout_id=rollout.id, after_id=after,
                                            kinds=_FINAL_KINDS, limit=100_000):
            cursor = max(cursor, event.id)
            target = targets.get(event.device or "")
            if target is None or target.state != waiting or (event.data or {}).get(
                    "deployment") != wanted:
                continue
            succeeded = event.kind == event_kind(UpdateStep.SUCCEEDED)
            reason = event.reason or event.kind.removeprefix("update.")
            note: str | None
            if back:
                state = TargetState.ROLLED_BACK if succeeded else TargetState.FAILED
                note = "back on the previous model" if succeeded else \
                    f"rollback failed: {reason}: {event.message}"
            else:
                state = TargetState.SUCCEEDED if succeeded else TargetState.FAILED
                note = None if succeeded else f"{reason}: {event.message}"
            targets[target.device] = self._set(rollout, target.device, state, reason=note)
        self._cursors[rollout.id] = cursor
        self._from_status(rollout, targets, back=back)
        return targets

    def _from_status(self, rollout: RolloutRecord, targets: dict[str, TargetRecord], *,
                     back: bool) -> None:
        """Outcomes from the devices' retained status, where an outcome event may have been
        missed: for devices being sent back, and for devices asked before this engine took
        the rollout over (their event may have been sent while no controller listened; the
        status is redelivered on every subscription). The status' ``update`` section names
        the last update's outcome; else a device serving the model it was asked for (the
        previous one, when sent back) has arrived. Devices this engine asked itself wait for
        their event, which comes after probation."""
        taken = self._driving.get(rollout.id)
        waiting = TargetState.ROLLING_BACK if back else TargetState.ASSIGNED
        stale = [t for t in targets.values() if t.state == waiting and (
            back or (taken is not None and t.updated < taken))]
        if not stale:
            return
        wanted = deployment_id(rollout.id, rollout.plan["token"], back=back)
        devices = {d.device: d for d in self.store.list_devices(rollout.fleet, online=True)}
        for target in stale:
            device = devices.get(target.device)
            if device is None:
                continue
            update = (device.status or {}).get("update")
            step = update.get("step") if isinstance(update, dict) and \
                update.get("deployment") == wanted else None
            if back:
                # Off the rollout's package (a status only tells when: what the device goes
                # back to is its own record, never the controller's reading of a status).
                arrived = device.model_sha256 is not None and \
                    device.model_sha256 != rollout.plan["model"]["sha256"]
                done, failed = TargetState.ROLLED_BACK, TargetState.FAILED
            else:
                arrived = device.model_sha256 == rollout.plan["model"]["sha256"]
                done, failed = TargetState.SUCCEEDED, TargetState.FAILED
            if step in ("failed", "rolled_back") and not arrived:
                reason = update.get("reason") if isinstance(update, dict) else None
                targets[target.device] = self._set(
                    rollout, target.device, failed,
                    reason=f"{reason or step} (reported by its status)")
            elif arrived or step == "succeeded":
                targets[target.device] = self._set(rollout, target.device, done,
                                                   reason="reported by its status")

    def _set(self, rollout: RolloutRecord, device: str, state: TargetState, *,
             wave: int | None = None, reason: str | None = None,
             previous_version: str | None = None) -> TargetRecord:
        return self.store.set_target_state(rollout.id, device, state, wave=wave, reason=reason,
                                           previous_version=previous_version,
                                           owner=self.controller_id)

    def _transition(self, rollout: RolloutRecord, state: RolloutState,
                    reason: str | None) -> RolloutRecord:
        rollout = self.store.transition_rollout(rollout.id, state, owner=self.controller_id,
                                                reason=reason)
        self._publish_state(rollout)
        return rollout

    def _publish_state(self, rollout: RolloutRecord) -> None:
        counts = count_states(self.store.list_rollout_targets(rollout.id))
        payload = RolloutStatePayload(
            rollout=rollout.id, fleet=rollout.fleet,
            model=RolloutModel(name=rollout.model_name, version=rollout.model_version),
            state=rollout.state, wave=rollout.current_wave, counts=counts,
            reason=rollout.reason, ts=utcnow().timestamp())
        self.client.publish(rollout_state_topic(rollout.fleet), encode(payload),
                                      qos=1, retain=True)

    def _event(self, rollout: RolloutRecord, kind: str, message: str, *,
               device: str | None = None, level: str = "info", reason: str | None = None,
               data: dict[str, Any] | None = None) -> None:
        log.log(logging.WARNING if level != "info" else logging.INFO, "%s", message)
        self.store.record_event(rollout.fleet, kind, message, device=device, level=level,
                                reason=reason, data=data, rollout_id=rollout.id)

    def _has_event(self, rollout: RolloutRecord, kind: str, wave: int | None = None) -> bool:
        found = self.store.list_events(rollout_id=rollout.id, kinds=[kind], limit=100)
        return any(wave is None or (e.data or {}).get("wave") == wave for e in found)


def count_states(targets: Iterable[TargetRecord]) -> dict[str, int]:
    """How many targets are in each state."""
    found: dict[str, int] = {}
    for target in targets:
        found[target.state] = found.get(target.state, 0) + 1
    return found
