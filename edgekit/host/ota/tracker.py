"""Following a deployment from the devices' status and events (no MQTT here: feed it messages).

:class:`DeploymentTracker` turns the retained ``status`` payloads and the ``update.*`` events
of a fleet into one :class:`DeviceProgress` per device and an outcome per target: the
``deploy`` command feeds it the payloads it receives; each is decoded through
:mod:`edgekit.protocol` (status, event, and the typed update sections of both), and one
that does not decode is refused: logged, counted, and ignored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import msgspec

from edgekit.errors import ProtocolError
from edgekit.protocol import DeviceState, Document, EventPayload, StatusPayload, decode
from edgekit.protocol.ota.desired import DesiredModel
from edgekit.protocol.ota.events import (
    EVENT_PREFIX,
    FINAL_STEPS,
    UpdateStep,
    step_of,
    update_data,
)
from edgekit.protocol.ota.shadow import ShadowReport, parse_shadow_report

__all__ = ["DeployResult", "DeploymentTracker", "DeviceProgress", "Outcome"]

log = logging.getLogger("edgekit.deploy")
D = TypeVar("D", bound=Document)


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # refused before serving; the previous model kept serving
    ROLLED_BACK = "rolled_back"  # served, misbehaved, the previous model is back
    TIMED_OUT = "timed_out"  # no final answer before the deadline
    NOT_WAITED = "not_waited"  # --no-wait, or an offline device of a fleet-wide deploy
    SHADOWED = "shadowed"  # shadow mode: the report came, the candidate never served


# A shadow report the host cannot accept closes the device's shadow as failed with this.
INVALID_REPORT = "invalid_report"


_STEP_OUTCOME = {UpdateStep.SUCCEEDED: Outcome.SUCCEEDED, UpdateStep.FAILED: Outcome.FAILED,
                 UpdateStep.ROLLED_BACK: Outcome.ROLLED_BACK,
                 UpdateStep.SHADOWED: Outcome.SHADOWED}


@dataclass
class DeviceProgress:
    """What is known about one device during a deployment."""

    device: str
    state: str | None = None  # DeviceState of its latest status
    session: int = -1
    serving: dict[str, Any] | None = None  # name, version, sha256 of the model in service
    step: UpdateStep | None = None
    percent: float | None = None
    reason: str | None = None
    message: str = ""
    outcome: Outcome | None = None
    note: str = ""  # why it is not a target, or what it follows instead
    source: str | None = None  # where the bytes came from: mqtt, http, kept, delta
    shadow: ShadowReport | None = None  # shadow mode: the device's report, checked
    updated: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        serving = self.serving
        return {
            "device": self.device,
            "outcome": self.outcome.value if self.outcome else None,
            "step": self.step.value if self.step else None,
            "percent": self.percent,
            "reason": self.reason,
            "message": self.message,
            "state": self.state,
            "serving": None if serving is None else {k: serving.get(k) for k in
                                                     ("name", "version", "sha256")},
            "note": self.note,
            "source": self.source,
            "shadow": self.shadow.to_dict() if self.shadow is not None else None,
        }


@dataclass
class DeployResult:
    """The outcome of a deployment: per target device, and the devices not waited for."""

    deployment: str
    fleet: str
    model: DesiredModel
    targets: dict[str, DeviceProgress]
    not_waited: dict[str, DeviceProgress]
    elapsed_s: float

    @property
    def ok(self) -> bool:
        """Every target succeeded, or sent its shadow report (true with no targets: nothing
        failed)."""
        return all(p.outcome in (Outcome.SUCCEEDED, Outcome.SHADOWED)
                   for p in self.targets.values())

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for progress in self.targets.values():
            key = progress.outcome.value if progress.outcome else "pending"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment,
            "fleet": self.fleet,
            "model": msgspec.to_builtins(self.model),
            "ok": self.ok,
            "counts": self.counts(),
            "elapsed_s": round(self.elapsed_s, 3),
            "targets": {d: p.to_dict() for d, p in sorted(self.targets.items())},
            "not_waited": {d: p.to_dict() for d, p in sorted(self.not_waited.items())},
        }


class DeploymentTracker:
    """Progress and outcome of one deployment.

    With ``devices`` the targets are exactly those devices. Without (a fleet-wide deploy) the
    targets are the devices known online when :meth:`freeze` is called, plus offline ones
    when ``include_offline``, plus any device that comes online or reports on this deployment
    later; devices that follow a device-level desired document of their own are left out.
    """

    def __init__(self, deployment: str, fleet: str, model: DesiredModel, *,
                 devices: Iterable[str] | None = None, include_offline: bool = False) -> None:
        self.deployment = deployment
        self.fleet = fleet
        self.model = model
        self.include_offline = include_offline
        self.fleet_wide = devices is None
        self.devices: dict[str, DeviceProgress] = {}
        self.targets: set[str] = set(devices or ())
        self.own_document: set[str] = set()  # devices with a device-level desired document
        self.frozen = not self.fleet_wide
        # Payloads refused per topic kind (status, events): not decodable, or not this device's.
        self.refused: dict[str, int] = {}
        for device in self.targets:
            self._progress(device)

    # ---------------------------------------------------------------- inputs

    def observe_status(self, device: str, payload: bytes | StatusPayload) -> bool:
        """Take a status (its payload as received, or decoded); return whether anything a
        viewer shows changed. A payload that does not decode, or that names another device
        than ``device``, is refused: logged, counted in :attr:`refused`, and changes nothing.
        """
        doc = self._document(device, payload, StatusPayload, "status")
        if doc is None:
            return False
        update = doc.update
        progress = self._progress(device)
        if doc.session < progress.session:
            return False  # a late last will of an earlier connection
        progress.session = doc.session
        before = (progress.state, progress.serving)
        progress.state = doc.state.value
        progress.serving = None if doc.model is None else _model_dict(
            doc.model.name, doc.model.version, doc.model.sha256)
        changed = before != (progress.state, progress.serving)
        step = step_of(EVENT_PREFIX + update.step) if update is not None else None
        # A shadow's outcome counts only with its report, which only the event carries.
        if update is not None and update.deployment == self.deployment and \
                step != UpdateStep.SHADOWED:
            changed |= self._apply(progress, step, update.reason, update.message or "", None)
        if (self.fleet_wide and self.frozen and device not in self.targets
                and device not in self.own_document and progress.state == DeviceState.ONLINE):
            self._add_target(device)
            changed = True
        return changed

    def observe_event(self, device: str, payload: bytes | EventPayload) -> bool:
        """Take an ``events`` payload (as received, or decoded); return whether it was about
        this deployment. A payload that does not decode, names another device than
        ``device``, or is an ``update.*`` event whose data do not fit, is refused: logged,
        counted in :attr:`refused`, and changes nothing.
        """
        doc = self._document(device, payload, EventPayload, "events")
        if doc is None:
            return False
        try:
            data = update_data(doc)
        except ProtocolError as exc:
            return self._refuse("events", device, exc.message)
        if data is None or data.deployment != self.deployment:
            return False
        progress = self._progress(device)
        if device not in self.targets and self.frozen:
            self._add_target(device)
        if data.serving is not None:
            progress.serving = _model_dict(data.serving.name, data.serving.version,
                                           data.serving.sha256)
        if data.source is not None and progress.outcome is None:
            progress.source = data.source
        percent = data.progress.percent if data.progress is not None else None
        step, reason, message = data.step, doc.reason, doc.message
        if step == UpdateStep.SHADOWED and progress.outcome is None:
            try:
                details = data.details or {}
                report = parse_shadow_report(details.get("shadow"))
                if report.deployment != self.deployment:
                    raise ProtocolError(f"the report is about {report.deployment!r}")
                progress.shadow = report
            except ProtocolError as exc:
                # A device's report is a claim: one that does not parse counts as a failure.
                step, reason = UpdateStep.FAILED, INVALID_REPORT
                message = f"shadow report refused: {exc.message}"
        return self._apply(progress, step, reason, message, percent)

    def observe_desired(self, device: str, has_document: bool) -> None:
        """Note whether a device has a device-level desired document (it then ignores the
        fleet's)."""
        if has_document:
            self.own_document.add(device)
        else:
            self.own_document.discard(device)

    def freeze(self) -> None:
        """Fix the initial targets of a fleet-wide deploy from what has been seen so far."""
        if self.frozen:
            return
        for device, progress in self.devices.items():
            if device in self.own_document:
                progress.note = "follows its own device-level desired document"
                continue
            if progress.state == DeviceState.ONLINE or self.include_offline:
                self.targets.add(device)
            else:
                progress.note = (f"{progress.state or 'unknown'}: updates when it reconnects"
                                 " (not waited for; use --include-offline)")
        self.frozen = True

    # ---------------------------------------------------------------- outputs

    def finished(self) -> bool:
        return all(self.devices[d].outcome is not None for d in self.targets)

    def expire(self, outcome: Outcome = Outcome.TIMED_OUT) -> None:
        """Give every target without an outcome ``outcome`` (the deadline passed)."""
        for device in self.targets:
            progress = self.devices[device]
            if progress.outcome is None:
                progress.outcome = outcome

    def result(self, elapsed_s: float) -> DeployResult:
        targets = {d: self.devices[d] for d in self.targets}
        others = {d: p for d, p in self.devices.items()
                  if d not in self.targets and (p.note or self.fleet_wide)}
        for progress in others.values():
            progress.outcome = Outcome.NOT_WAITED
        return DeployResult(self.deployment, self.fleet, self.model, targets, others, elapsed_s)

    # ---------------------------------------------------------------- internals

    def _progress(self, device: str) -> DeviceProgress:
        if device not in self.devices:
            self.devices[device] = DeviceProgress(device)
        return self.devices[device]

    def _document(self, device: str, payload: bytes | D, cls: type[D], kind: str) -> D | None:
        if isinstance(payload, cls):
            doc = payload
        else:
            try:
                doc = decode(payload, cls)  # type: ignore[arg-type]
            except ProtocolError as exc:
                self._refuse(kind, device, exc.message)
                return None
        if doc.device != device:  # type: ignore[attr-defined]
            self._refuse(kind, device, "the payload names another device than its topic")
            return None
        return doc

    def _refuse(self, kind: str, device: str, why: str) -> bool:
        self.refused[kind] = self.refused.get(kind, 0) + 1
        log.warning("deployment %s: ignored a %s payload of %s: %s", self.deployment, kind,
                    device, why)
        return False

    def _add_target(self, device: str) -> None:
        self.targets.add(device)
        self.devices[device].note = ""

    def _apply(self, progress: DeviceProgress, step: UpdateStep | None, reason: str | None,
               message: str, percent: float | None) -> bool:
        if step is None or progress.outcome is not None:
            return False
        progress.step = step
        progress.updated = time.time()
        if percent is not None:
            progress.percent = percent
        if reason is not None:
            progress.reason = reason
        if message:
            progress.message = message
        if step in FINAL_STEPS:
            progress.outcome = _STEP_OUTCOME[step]
        return True


def _model_dict(name: str | None, version: str | None, sha256: str | None) -> dict[str, Any]:
    return {"name": name, "version": version, "sha256": sha256}
