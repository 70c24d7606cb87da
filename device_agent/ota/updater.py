"""The updater: follows the desired documents and carries out updates, one at a time.

It subscribes to the fleet's and the device's desired topics (retained; the device's own
document wins, an empty payload clears a level), keeps the raw payloads, and a worker
thread reconciles. Every document passes the :class:`~device_agent.ota.intent.IntentGate`
first (signature before parsing, fleet and device binding, expiry, replay, version floor);
a refused one is reported once (rate-limited) and treated as absent, so a forged
device-level document cannot hide the fleet's. A document whose deployment this device has
not finished, asking for a model other than the one in service, becomes the current update
(journalled), which
:class:`~device_agent.ota.steps.UpdateRun` carries out. A newer document arriving before
activation cancels the current update (``superseded``); one arriving during probation waits
for the probation to end.

:meth:`Updater.recover` runs before the agent loads its model: after a crash once the new
model was switched in (activating, probation, rolling back), it puts the previous model back
on disk, so the agent starts on a model that passed its probation. Earlier steps resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from edgekit.artifact import open_package, sha256_file
from edgekit.errors import ArtifactError, EdgekitError
from edgekit.protocol import MAX_UPDATE_MESSAGE, EventLevel, prepare
from edgekit.protocol.ota import (
    DEFAULT_CHUNK_BYTES,
    DESIRED_VARIANTS,
    ChunkHeader,
    DesiredDocument,
    DesiredModel,
    UpdateEventData,
    UpdateModel,
    UpdateProgress,
    UpdateReason,
    UpdateStatus,
    UpdateStep,
    desired_topic,
    encode_desired,
    event_kind,
    ota_reply_topic,
    parse_desired,
)
from edgekit.protocol.signed import SignedDocument
from edgekit.signing import load_public_key

from .._events import EventSink
from .._mqtt import MqttLink
from .._slot import ModelSlot
from .._status import StatusPublisher
from .._store import StoredPackage
from ..config import DeviceSection
from .download import DownloadSettings, MqttDownload
from .errors import UpdateFailure
from .intent import IntentGate, RefusalLimiter
from .journal import JournalStep, OtaJournal, UpdateRecord
from .steps import UpdateRun, crash_point

if TYPE_CHECKING:
    from .._predict import Predictor
    from ..config import OtaSection

__all__ = ["OtaSettings", "Updater", "prepare_decoders"]

log = logging.getLogger("device_agent.ota")

_FINAL_LEVEL = {UpdateStep.FAILED: EventLevel.ERROR, UpdateStep.ROLLED_BACK: EventLevel.ERROR}


@dataclass(frozen=True)
class OtaSettings:
    """The ``[ota]`` configuration section, as the updater uses it."""

    enabled: bool = True
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    window: int = 4
    request_timeout_s: float = 10.0
    stall_timeout_s: float = 300.0
    max_artifact_bytes: int = 1024**3
    min_free_bytes: int = 64 * 1024**2
    intent_keys: tuple[str, ...] = ()
    allow_unsigned_intents: bool = False
    max_kbps: int = 0
    maintenance_window: str = ""
    nice: int = 10
    direct_io: bool = True

    @classmethod
    def from_config(cls, section: OtaSection) -> OtaSettings:
        values = {f.name: getattr(section, f.name) for f in dataclasses.fields(cls)}
        values["intent_keys"] = tuple(values["intent_keys"])
        return cls(**values)


class Updater:
    """Over-the-air updates of one agent's model; see the module docstring.

    It switches models only through ``slot``, reports through ``events`` and refreshes the
    status through ``status``; the MQTT link is given to :meth:`start`.
    """

    def __init__(self, slot: ModelSlot, events: EventSink, status: StatusPublisher,
                 settings: OtaSettings, state_dir: Path, device: DeviceSection,
                 requests: Predictor | None = None) -> None:
        self.slot = slot
        self.requests = requests  # the request path, for a shadow evaluation
        self.store = slot.store
        self.events = events
        self.status = status
        self.settings = settings
        self.device = device
        self.link: MqttLink | None = None
        self.journal = OtaJournal(state_dir / "ota" / "journal.json")
        self.gate = IntentGate(state_dir / "ota" / "trust.json",
                               [load_public_key(p) for p in settings.intent_keys],
                               allow_unsigned=settings.allow_unsigned_intents,
                               fleet=device.fleet, device=device.id)
        self.refusals = RefusalLimiter()
        self.stopping = threading.Event()
        self.current_download: MqttDownload | None = None
        self._docs: dict[str, bytes | None] = {"fleet": None, "device": None}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def recover(self) -> None:
        """Before the agent loads its model: undo an update that a crash interrupted after
        the switch (the previous model becomes active on disk again), or mark where an
        earlier one resumes.

        Raises:
            OutputWriteError: ``active.json`` cannot be written.
        """
        record = self.journal.current
        if record is None:
            return
        step = JournalStep(record.step)
        try:
            active = self.store.active()
        except ArtifactError:
            active = None
        switched = active is not None and active.active.sha256 == record.sha256
        if step in (JournalStep.PROBATION, JournalStep.ROLLING_BACK) or (
                step == JournalStep.ACTIVATING and switched):
            previous = record.previous
            if previous is None:
                self.journal.step(JournalStep.PROBATION)  # nothing to go back to: watch again
                return
            stored = self.stored_from(previous)
            self.store.activate(stored, demote_current=False)
            # A rollback already under way keeps its reason; otherwise the restart is it.
            reason = UpdateReason(record.reason) if record.reason else UpdateReason.INTERRUPTED
            self.finish(record, UpdateStep.ROLLED_BACK, reason,
                        f"the agent stopped during '{step.value}'; back to {stored.name}"
                        f" {stored.version}", serving=_short(previous))
        elif step == JournalStep.ACTIVATING:
            # The new model never served: check it again and go on.
            self.journal.step(JournalStep.VERIFYING)

    def start(self, link: MqttLink | None) -> None:
        """Subscribe to the desired documents and start the worker thread."""
        self.link = link
        cfg = self.device
        current = self.slot.current
        if current is not None:
            self.gate.ensure_floor(current.name, current.version)
        if link is not None and self.settings.enabled and not self.gate.keys and \
                not self.gate.allow_unsigned:
            log.warning("no ota.intent_keys: every desired document will be refused")
        if link is not None and self.settings.enabled:
            link.subscribe(desired_topic(cfg.fleet), lambda _t, p: self._on_desired("fleet", p))
            link.subscribe(desired_topic(cfg.fleet, cfg.id),
                           lambda _t, p: self._on_desired("device", p))
            link.subscribe_buffers(ota_reply_topic(cfg.fleet, cfg.id), self._on_reply)
        prepare_decoders()
        self._thread = threading.Thread(target=self._loop, name="ota", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        self._cancel.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---------------------------------------------------------------- MQTT callbacks

    def _on_desired(self, level: str, payload: bytes) -> None:
        with self._lock:
            self._docs[level] = payload or None
        record = self.journal.current
        if record is not None and JournalStep(record.step) in (
                JournalStep.QUEUED, JournalStep.DOWNLOADING, JournalStep.VERIFYING,
                JournalStep.STAGED):
            doc = self._effective(report=False)
            if doc is not None and doc.deployment != record.deployment:
                self._cancel.set()
        self._wake.set()

    def _on_reply(self, _topic: str, payload: bytes | bytearray) -> None:
        download = self.current_download
        if download is not None:
            download.deliver(payload)

    # ---------------------------------------------------------------- the worker

    def _loop(self) -> None:
        while not self.stopping.is_set():
            record = self.journal.current
            if record is not None:
                try:
                    self._carry_out(record)
                except Exception:
                    # The journal still names the step; try again from there, later.
                    log.exception("update %s stopped unexpectedly", record.deployment)
                    self.stopping.wait(5.0)
                continue
            try:
                started = self._consider()
            except EdgekitError as exc:
                log.error("could not start an update: %s", exc.message)
                started = False
            if not started:
                self._wake.wait(1.0)
                self._wake.clear()

    def _carry_out(self, record: UpdateRecord) -> None:
        try:
            doc = parse_desired(record.desired)
        except EdgekitError as exc:
            self.finish(record, UpdateStep.FAILED, UpdateReason.INVALID_DESIRED, exc.message)
            return
        self._cancel.clear()
        UpdateRun(self, record, doc, self._cancel).run()

    def _consider(self) -> bool:
        doc = self._effective(report=True)
        if doc is None or self.journal.outcome_of(doc.deployment) is not None:
            return False
        if doc.revert:
            reverted = self._revert_target(doc)
            if reverted is None:
                return False
            doc = reverted
        wanted = doc.model
        serving = self.slot.current
        if self._serves(doc):
            assert serving is not None
            self.journal.record(doc.deployment, UpdateStep.SUCCEEDED.value, None,
                                "already serving this model", _journal(_short(wanted)))
            self._emit(UpdateStep.SUCCEEDED, doc.deployment, _short(wanted),
                       f"already serving {serving.name} {serving.version}")
            return False
        self.gate.acted_on(doc)
        try:
            self.gate.check_floor(doc, wanted.name, wanted.version)
        except UpdateFailure as refusal:
            self._close_unstarted(doc.deployment, _short(wanted), UpdateStep.FAILED,
                                  refusal.reason, refusal.message, hint=refusal.hint)
            return False
        record = UpdateRecord(deployment=doc.deployment, desired=msgspec.to_builtins(doc))
        self.journal.begin(record)
        self.emit(UpdateStep.QUEUED, record, f"update to {wanted.name} {wanted.version}"
                  f" (deployment {doc.deployment})")
        crash_point("queued")
        return True

    def _effective(self, *, report: bool) -> DesiredDocument | None:
        """The document to follow: the device's own if it passes the gate, else the
        fleet's if it does, else None. Refusals are reported once (rate-limited)."""
        with self._lock:
            payloads = [self._docs["device"], self._docs["fleet"]]
        for payload in payloads:
            if not payload:
                continue
            doc: DesiredDocument | None = None
            try:
                doc = self.gate.open(payload)
                self.gate.check_bound(doc)
                if self.journal.outcome_of(doc.deployment) is not None or \
                        (not doc.revert and self._serves(doc)):
                    return doc  # carried out already, or nothing to change: quietly
                self.gate.check_fresh(doc)
                return doc
            except UpdateFailure as refusal:
                if report:
                    self._refused(payload, doc, refusal)
        return None

    def _refused(self, payload: bytes, doc: DesiredDocument | None,
                 refusal: UpdateFailure) -> None:
        key = hashlib.sha256(payload).hexdigest()
        if not self.refusals.allow(key):
            return
        log.warning("ignored a desired document: %s", refusal.message)
        self._emit(UpdateStep.FAILED, doc.deployment if doc else "",
                   _short(doc.model) if doc else None,
                   f"ignored a desired document: {refusal.message}", reason=refusal.reason,
                   details={"suppressed": self.refusals.suppressed} if
                   self.refusals.suppressed else None)

    def _serves(self, doc: DesiredDocument) -> bool:
        wanted = doc.model
        serving = self.slot.current
        return serving is not None and (serving.sha256 == wanted.sha256 or (
            wanted.sha256 is None and (serving.name, serving.version)
            == (wanted.name, wanted.version)))

    def _revert_target(self, doc: DesiredDocument) -> DesiredDocument | None:
        """A revert names the model to leave; the model to go back to is this device's own
        record of what it ran before (never a version someone else names). None (and the
        outcome recorded) when there is nothing to do."""
        left = doc.model
        serving = self.slot.current
        try:
            record = self.store.active()
        except ArtifactError:
            record = None
        if serving is None or serving.sha256 != left.sha256:
            note = f"not serving {left.name} {left.version}: nothing to revert"
            outcome, reason = UpdateStep.SUCCEEDED, None
        elif record is None or not record.previous or not record.previous[0].path.is_file():
            note = f"no model kept from before {left.name} {left.version}"
            outcome, reason = UpdateStep.FAILED, UpdateReason.UNAVAILABLE
        else:
            back = record.previous[0]
            target = msgspec.structs.replace(doc, model=DesiredModel(
                name=back.name, version=back.version, sha256=back.sha256,
                size=back.path.stat().st_size, key_id=None))
            return parse_desired(encode_desired(target))
        self.gate.acted_on(doc)
        self._close_unstarted(doc.deployment, _short(left), outcome, reason, note)
        return None

    def _close_unstarted(self, deployment: str, model: UpdateModel, step: UpdateStep,
                         reason: UpdateReason | None, message: str,
                         hint: str | None = None) -> None:
        """The outcome of a signed document this device decided on without starting an
        update: journalled (not tried again), reported, and shown in the status."""
        text = f"{message} (hint: {hint})" if hint else message
        self.journal.record(deployment, step.value, reason.value if reason else None, text,
                            _journal(model))
        self._emit(step, deployment, model, text, reason=reason)
        self.status.publish()

    # ---------------------------------------------------------------- helpers for steps

    def emit(self, step: UpdateStep, record: UpdateRecord, message: str, **kw: Any) -> None:
        """An ``update.<step>`` event about ``record``."""
        self._emit(step, record.deployment, _short(record.desired.get("model", {})), message,
                   **kw)

    def _emit(self, step: UpdateStep, deployment: str, model: UpdateModel | None,
              message: str, *, reason: UpdateReason | None = None, source: str | None = None,
              progress: tuple[int, int] | None = None, details: dict[str, Any] | None = None,
              serving: UpdateModel | None = None) -> None:
        current = self.slot.current
        if serving is None and current is not None:
            serving = _short(current.ref.as_dict())
        done, total = progress or (0, 0)
        data = UpdateEventData(
            deployment=deployment, step=step, model=model, serving=serving,
            source=source or None, details=details or None,
            progress=None if progress is None else UpdateProgress(
                bytes=done, total=total, percent=round(100.0 * done / max(total, 1), 1)))
        self.events.event(event_kind(step), _FINAL_LEVEL.get(step, EventLevel.INFO), message,
                         reason=reason.value if reason else None, data=data.as_data())

    def finish(self, record: UpdateRecord, step: UpdateStep, reason: UpdateReason | None,
               message: str, *, details: dict[str, Any] | None = None, hint: str | None = None,
               serving: UpdateModel | None = None) -> None:
        """Close the current update with an outcome, report it, and refresh the status."""
        text = f"{message} (hint: {hint})" if hint else message
        self.journal.finish(step.value, reason.value if reason else None, text,
                            _journal(_short(record.desired.get("model", {}))))
        self.emit(step, record, text, reason=reason, details=details, serving=serving)
        self.status.publish()

    def mqtt_download(self, request_topic: str, sha256: str, size: int,
                      settings: DownloadSettings, cancel: threading.Event) -> MqttDownload:
        """A chunked download of ``sha256`` over this device's MQTT link (a package or a
        delta: the one place that binds the downloader to the link)."""
        link, cfg = self.link, self.device

        def publish(topic: str, payload: bytes) -> bool:
            return link is not None and link.publish(topic, payload).rc == 0

        return MqttDownload(publish, lambda: link is not None and link.connected,
                            request_topic, ota_reply_topic(cfg.fleet, cfg.id), sha256, size,
                            settings, cancel)

    def find_kept(self, name: str, version: str, sha256: str | None) -> Path | None:
        """A package of the model folder with this sha256 (or, without one, this name and
        version, the newest), if the device keeps one."""
        for path in reversed(self.store.packages()):
            try:
                if sha256 is not None:
                    if path.name.endswith(f"-{sha256[:12]}.edgepkg") and \
                            sha256_file(path) == sha256:
                        return path
                    continue
                manifest = open_package(path).manifest
            except (ArtifactError, OSError):
                continue
            if (manifest.name, manifest.version) == (name, version):
                return path
        return None

    def stored_from(self, entry: dict[str, str]) -> StoredPackage:
        return StoredPackage(self.abs(entry["package"]), entry["sha256"], entry["name"],
                             entry["version"])

    def rel(self, path: Path) -> str:
        return path.resolve().relative_to(self.store.root.resolve()).as_posix()

    def abs(self, rel: str | None) -> Path:
        if rel is None:
            raise ArtifactError("the journal names no package for this update")
        return self.store.root / rel

    def discard_files(self, record: UpdateRecord, doc: DesiredDocument) -> None:
        """Remove the partial download and a refused package the model folder does not use."""
        sha = doc.model.sha256
        if sha is not None:
            (self.store.packages_dir / f".{sha}.part").unlink(missing_ok=True)
        if record.package is None or record.source == "kept":
            return
        try:
            active = self.store.active()
        except ArtifactError:
            return
        used = set() if active is None else {p.sha256 for p in (active.active, *active.previous)}
        if record.sha256 not in used:
            self.abs(record.package).unlink(missing_ok=True)

    def status_section(self) -> UpdateStatus | None:
        """The ``update`` field of the status: the update in progress, else the last one."""
        record = self.journal.current
        if record is not None:
            return UpdateStatus(deployment=record.deployment, step=record.step,
                                model=_short(record.desired.get("model", {})))
        last = self.journal.last
        if last is None:
            return None
        return UpdateStatus(deployment=last.deployment, step=last.outcome,
                            model=_short(last.model), reason=last.reason or None,
                            message=last.message[:MAX_UPDATE_MESSAGE])


def prepare_decoders() -> None:
    """Make the decoders of what an update reads (the signed envelope, the desired document,
    chunk replies) now: otherwise every device of a fleet makes them when the same deploy
    arrives, before its first chunk request."""
    prepare(SignedDocument)
    prepare(DesiredDocument, variants=DESIRED_VARIANTS)
    prepare(ChunkHeader)


def _short(model: DesiredModel | Mapping[str, Any]) -> UpdateModel:
    """The name, version and sha256 of a model (a desired document's, or as a journal or a
    stored package keeps it)."""
    if isinstance(model, DesiredModel):
        return UpdateModel(name=model.name, version=model.version, sha256=model.sha256)
    return UpdateModel(name=model.get("name"), version=model.get("version"),
                       sha256=model.get("sha256"))


def _journal(model: UpdateModel) -> dict[str, Any]:
    """``model`` as the journal keeps it."""
    return msgspec.structs.asdict(model)

