"""The rollout engine: canary, then waves growing by a factor, with abort and rollback.

A rollout is a row in the database (:class:`~edgekit.host.Store`); this engine drives the
rollouts its controller owns, one pass per :meth:`RolloutEngine.tick`:

1. claim unowned rollouts of its fleets (leases: two controllers never drive one rollout),
   renew the leases of those it drives, and start pending ones;
2. for each device asked to update, read its ``update.*`` outcome from the events the
   ingest stored (the deployment id ``r<id>-<token>`` ties them to the rollout) or time it out;
3. abort when the install failure rate is too high, or when the canary's field quality with
   the new model is worse than with the previous one by more than the margin;
4. when every device of the wave has an outcome (and, if configured, enough labelled
   predictions), start the next wave, or finish: publish the fleet's desired document and
   clear the per-device ones.

Devices are asked through retained per-device desired documents (:mod:`edgekit.protocol.ota.desired`).
An abort sends every updated device a signed rollback instruction back to its previous model
and waits for it to get there. All state is in the database, so a controller that restarts,
or another one that takes the rollout over, carries on from it.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Callable, Iterable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import EdgekitError, UsageError
from edgekit.host.controller._documents import DesiredDocuments
from edgekit.host.controller._plan import (
    Figures,
    baseline_figures,
    judge_quality,
    latest_figures,
    plan_settings,
    recorded_baselines,
    wave_sizes,
)
from edgekit.host.controller.config import RolloutSection
from edgekit.host.db import RolloutRecord, RolloutState, Store, TargetRecord, TargetState, utcnow
from edgekit.host.errors import LeaseLostError
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.server import ArtifactServer
from edgekit.host.registry import Registry
from edgekit.protocol import encode
from edgekit.protocol.controller import (
    ROLLOUT_STATE_SCHEMA,
    RolloutStatePayload,
    deployment_id,
    rollout_state_topic,
)
from edgekit.protocol.ota.events import UpdateStep, event_kind

__all__ = ["RolloutEngine"]

log = logging.getLogger("edgekit.controller.rollout")

_FINAL_KINDS = [event_kind(s) for s in (UpdateStep.SUCCEEDED, UpdateStep.FAILED,
                                        UpdateStep.ROLLED_BACK)]
_OUTCOMES = {TargetState.SUCCEEDED, TargetState.FAILED, TargetState.TIMED_OUT}
_CURSOR_OVERLAP = 1000


class RolloutEngine:
    """Creates and drives rollouts; see the module docstring.

    ``server`` (optional) serves the artifacts the rollouts name over MQTT; without it some
    other server must (``edgekit serve``). ``signing_key`` signs rollback instructions;
    without it an abort cannot send devices back to an older version.
    """

    def __init__(self, store: Store, registry: Registry, client: HostClient,
                 settings: RolloutSection, *, controller_id: str, lease_s: float,
                 fleets: Iterable[str] = ("+",), server: ArtifactServer | None = None,
                 signing_key: Ed25519PrivateKey | None = None,
                 url_for: Callable[[str], str] | None = None) -> None:
        self.store = store
        self.registry = registry
        self.client = client
        self.settings = settings
        self.controller_id = controller_id
        self.lease_s = lease_s
        self.fleets = list(fleets)
        self.documents = DesiredDocuments(registry, client, server=server,
                                          signing_key=signing_key, url_for=url_for)
        self._cursors: dict[int, int] = {}  # rollout id -> last device event id read
        self._driving: dict[int, dt.datetime] = {}  # rollout id -> when this engine took it

    # ---------------------------------------------------------------- creating

    def create(self, fleet: str, name: str, version: str, *, devices: list[str] | None = None,
               overrides: dict[str, Any] | None = None, source: str = "api",
               request_id: str | None = None, note: str | None = None) -> RolloutRecord:
        """Create a pending rollout of the registered ``name:version`` to ``fleet``.

        Without ``devices`` the targets are the fleet's online devices (all of its devices
        with ``include_offline``); devices that join later follow the fleet's desired
        document once the rollout has succeeded.

        Raises:
            UsageError: the model is not registered, the fleet has an active rollout, or a
                listed device is unknown.
            ConfigError: an override is unknown or invalid.
            ArtifactError: the registered package file is missing.
        """
        record = self.registry.get(name, version)
        self.registry.artifact_path(name, version)
        settings = plan_settings(self.settings, overrides)
        known = {d.device: d for d in self.store.list_devices(fleet)}
        if devices is not None:
            unknown = sorted(set(devices) - set(known))
            if unknown:
                raise UsageError(f"device(s) {', '.join(unknown)} of fleet {fleet} never"
                                 " reported to this controller",
                                 hint="see `edgekit fleet status`")
            targets = sorted(set(devices))
        else:
            targets = sorted(d.device for d in known.values()
                             if d.online or settings["include_offline"])
        previous = {d: {"name": known[d].model_name, "version": known[d].model_version,
                        "sha256": known[d].model_sha256} for d in targets}
        plan = {**settings, "token": secrets.token_hex(3), "source": source,
                "request_id": request_id, "note": note,
                "scope": "devices" if devices is not None else "fleet",
                "model": {"name": record.name, "version": record.version,
                          "sha256": record.sha256, "size": record.size},
                "waves": wave_sizes(len(targets), settings["canary"], settings["wave_factor"]),
                "previous": previous}
        rollout = self.store.create_rollout(fleet, name, version, plan, targets=targets)
        self._event(rollout, "rollout.created",
                    f"rollout {rollout.id}: {record.ref} to {len(targets)} device(s) of"
                    f" {fleet}, waves {plan['waves']}",
                    data={"source": source, "waves": plan["waves"], "targets": targets,
                          "note": note})
        return rollout

    def find_request(self, fleet: str, request_id: str) -> RolloutRecord | None:
        """The rollout a request created already (requests are retried on reconnects)."""
        for rollout in reversed(self.store.list_rollouts(fleet=fleet)):
            if rollout.plan.get("request_id") == request_id:
                return rollout
        return None

    # ---------------------------------------------------------------- driving

    def tick(self) -> list[RolloutRecord]:
        """Claim and drive this controller's rollouts once; return the ones it drove."""
        rollouts = {r.id: r for r in self.store.owned_rollouts(self.controller_id)}
        for fleet in self.fleets:
            while (claimed := self.store.claim_rollout(
                    self.controller_id, self.lease_s,
                    fleet=None if fleet == "+" else fleet)) is not None:
                rollouts[claimed.id] = claimed
        driven = []
        for rollout in rollouts.values():
            try:
                driven.append(self._drive(rollout))
            except LeaseLostError as exc:
                log.warning("%s", exc.message)
                self._forget(rollout.id)
        return driven

    def release_all(self) -> None:
        """Give up every rollout this controller drives, so another can take it at once."""
        for rollout in self.store.owned_rollouts(self.controller_id):
            self.store.release_rollout(rollout.id, self.controller_id)
            self._forget(rollout.id)

    def _forget(self, rollout_id: int) -> None:
        self._driving.pop(rollout_id, None)
        self._cursors.pop(rollout_id, None)

    def _drive(self, rollout: RolloutRecord) -> RolloutRecord:
        if not self.store.renew_rollout(rollout.id, self.controller_id, self.lease_s):
            raise LeaseLostError(f"controller {self.controller_id} lost rollout {rollout.id}")
        if rollout.id not in self._driving:
            self._driving[rollout.id] = utcnow()
            self._take_over(rollout)
        if rollout.state == RolloutState.PENDING:
            rollout = self._transition(rollout, RolloutState.RUNNING,
                                       f"driven by controller {self.controller_id}")
        if rollout.state == RolloutState.RUNNING:
            return self._run(rollout)
        if rollout.state == RolloutState.ABORTING:
            return self._roll_back(rollout)
        return rollout

    def _take_over(self, rollout: RolloutRecord) -> None:
        """Publish again the documents of devices in progress (a controller that stopped
        between publishing and recording may have left one unpublished)."""
        self._event(rollout, "rollout.claimed",
                    f"controller {self.controller_id} drives rollout {rollout.id}",
                    data={"controller": self.controller_id, "state": rollout.state})
        assigned = self.store.list_rollout_targets(rollout.id, state=TargetState.ASSIGNED)
        if assigned and rollout.state == RolloutState.RUNNING:
            self.documents.ask(rollout, [t.device for t in assigned])
        rolling = self.store.list_rollout_targets(rollout.id, state=TargetState.ROLLING_BACK)
        if rolling:
            self._send_back(rollout, rolling)

    # ---------------------------------------------------------------- running

    def _run(self, rollout: RolloutRecord) -> RolloutRecord:
        plan = rollout.plan
        targets = self._observe(rollout, back=False)
        now = utcnow()
        for target in targets.values():
            if target.state == TargetState.ASSIGNED and target.assigned_at is not None and (
                    now - target.assigned_at).total_seconds() > plan["device_timeout_s"]:
                targets[target.device] = self._set(
                    rollout, target.device, TargetState.TIMED_OUT,
                    reason=f"no outcome within {plan['device_timeout_s']:g} s")
                self._event(rollout, "rollout.device_timeout",
                            f"{target.device} did not answer within"
                            f" {plan['device_timeout_s']:g} s", device=target.device,
                            level="warning", reason="timeout")
        current = [t for t in targets.values() if t.wave == rollout.current_wave]
        wave_done = all(t.state in _OUTCOMES for t in current)
        problem = self._failure_rate(rollout, list(targets.values()), wave_done)
        verdict = self._canary_quality(rollout, targets)
        if problem is None and verdict is not None and verdict.decided and not verdict.passed:
            problem = ("quality", f"canary quality: {verdict.note}", verdict.to_dict())
        if problem is not None:
            return self._abort(rollout, *problem)
        if not wave_done:
            return rollout
        waiting = self._labels_pending(rollout, current, verdict)
        if waiting is not None:
            return waiting
        pending = sorted(t.device for t in targets.values() if t.state == TargetState.PENDING)
        if not pending:
            return self._succeed(rollout, targets)
        started = [t for t in targets.values() if t.wave is not None]
        wave = rollout.current_wave + 1 if started else 0
        sizes = plan["waves"]
        size = sizes[wave] if wave < len(sizes) else len(pending)
        return self._start_wave(rollout, wave, pending[:size])

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
                previous = rollout.plan["previous"].get(target.device) or {}
                arrived = device.model_version == (previous.get("version")
                                                   or target.previous_version)
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

    def _failure_rate(self, rollout: RolloutRecord, targets: list[TargetRecord],
                      wave_done: bool) -> tuple[str, str, dict[str, Any]] | None:
        plan = rollout.plan
        outcomes = [t for t in targets if t.state in _OUTCOMES]
        bad = [t for t in outcomes if t.state != TargetState.SUCCEEDED]
        if not bad:
            return None
        rate = len(bad) / len(outcomes)
        # Mid-wave, a few early failures do not decide; at a wave's end the rate always does,
        # so a failed canary never leads to a larger wave.
        if rate <= plan["max_failure_rate"] or (len(outcomes) < plan["min_devices"]
                                                and not wave_done):
            return None
        return ("failure_rate",
                f"{len(bad)} of {len(outcomes)} devices failed or timed out ({rate:.0%}, more"
                f" than {plan['max_failure_rate']:.0%})",
                {"failed": sorted(t.device for t in bad), "outcomes": len(outcomes),
                 "rate": rate, "max_failure_rate": plan["max_failure_rate"]})

    def _canary_quality(self, rollout: RolloutRecord, targets: dict[str, TargetRecord]) -> Any:
        canary = [t for t in targets.values() if t.wave == 0]
        if not canary:
            return None
        plan = rollout.plan
        baselines = recorded_baselines(self.store, rollout.id)
        pairs: list[tuple[Figures | None, Figures | None]] = []
        for target in canary:
            if target.state != TargetState.SUCCEEDED or target.assigned_at is None:
                continue
            new = latest_figures(self.store, rollout.fleet, target.device, target.assigned_at,
                                 plan["model"]["sha256"])
            pairs.append((new, baselines.get(target.device)))
        if not pairs:
            return None
        verdict = judge_quality(pairs, metric=plan["quality_metric"],
                                margin=plan["quality_margin"],
                                min_labels=plan["quality_min_labels"])
        if verdict.decided and verdict.passed and not self._has_event(rollout, "rollout.quality"):
            self._event(rollout, "rollout.quality", f"canary quality passed: {verdict.note}",
                        reason="passed", data=verdict.to_dict())
        return verdict

    def _labels_pending(self, rollout: RolloutRecord, wave: list[TargetRecord],
                        verdict: Any) -> RolloutRecord | None:
        """The rollout while the finished wave still waits for labels; None when it need not."""
        plan = rollout.plan
        need = plan["wave_min_labels"]
        short = []
        if need > 0:
            for target in wave:
                if target.state != TargetState.SUCCEEDED or target.assigned_at is None:
                    continue
                found = latest_figures(self.store, rollout.fleet, target.device,
                                       target.assigned_at, plan["model"]["sha256"])
                if found is None or found.labels < need:
                    short.append(target.device)
        undecided = rollout.current_wave == 0 and verdict is not None and not verdict.decided
        if not short and not undecided:
            return None
        last = max(t.updated for t in wave)
        if (utcnow() - last).total_seconds() <= plan["labels_timeout_s"]:
            return rollout
        what = (f"devices {', '.join(short)} reported fewer than {need} labels" if short else
                "the canary's quality could not be judged")
        message = f"wave {rollout.current_wave}: {what} within {plan['labels_timeout_s']:g} s"
        if plan["labels_timeout_action"] == "abort":
            return self._abort(rollout, "labels_timeout", message, {"devices": short})
        if not self._has_event(rollout, "rollout.labels_timeout", rollout.current_wave):
            self._event(rollout, "rollout.labels_timeout", message + "; going on",
                        level="warning", reason="labels_timeout",
                        data={"wave": rollout.current_wave, "devices": short})
        return None

    def _start_wave(self, rollout: RolloutRecord, wave: int,
                    devices: list[str]) -> RolloutRecord:
        now = utcnow()
        known = {d.device: d for d in self.store.list_devices(rollout.fleet)}
        baselines: dict[str, Any] = {}
        for device in devices:
            record = known.get(device)
            figures = baseline_figures(self.store, record, now) if record else None
            baselines[device] = figures.to_dict() if figures else None
        self.documents.ask(rollout, devices)
        for device in devices:
            record = known.get(device)
            self._set(rollout, device, TargetState.ASSIGNED, wave=wave,
                      previous_version=record.model_version if record else None)
        rollout = self.store.set_rollout_wave(rollout.id, wave, owner=self.controller_id)
        self._event(rollout, "rollout.wave",
                    f"wave {wave}: asking {len(devices)} device(s) to run"
                    f" {rollout.model_name} {rollout.model_version}",
                    data={"wave": wave, "devices": devices, "baseline": baselines})
        self._publish_state(rollout)
        return rollout

    def _succeed(self, rollout: RolloutRecord,
                 targets: dict[str, TargetRecord]) -> RolloutRecord:
        if rollout.plan["scope"] == "fleet":
            self.documents.publish_fleet(rollout)
            self.documents.clear(rollout, list(targets))
        counts = _counts(targets.values())
        rollout = self._transition(rollout, RolloutState.SUCCEEDED,
                                   f"{counts.get('succeeded', 0)} of {len(targets)} devices"
                                   " updated")
        self._event(rollout, "rollout.succeeded",
                    f"rollout {rollout.id} succeeded: {rollout.model_name}"
                    f" {rollout.model_version} is the fleet's model", data={"counts": counts})
        self._forget(rollout.id)
        return rollout

    # ---------------------------------------------------------------- aborting

    def abort(self, fleet: str, rollout_id: int, *, name: str, version: str,
              request_id: str | None = None) -> RolloutRecord:
        """Abort a rollout at an operator's request: devices it updated go back to their
        previous model, the others are skipped. A rollout already aborting or aborted by
        this request is returned as it is (requests are retried on reconnects).

        Raises:
            UsageError: the rollout is not ``fleet``'s rollout of ``name:version``, it is
                finished, or another controller drives it.
        """
        try:
            rollout = self.store.get_rollout(rollout_id)
        except UsageError:
            rollout = None
        if rollout is None or rollout.fleet != fleet or (rollout.model_name,
                                                          rollout.model_version) != (name, version):
            raise UsageError(f"fleet {fleet} has no rollout {rollout_id} of {name}:{version}",
                             hint="see `edgekit fleet rollouts`")
        if rollout.state in (RolloutState.ABORTING, RolloutState.ABORTED) and \
                request_id is not None and self._has_request(rollout, request_id):
            return rollout
        if rollout.state not in (RolloutState.PENDING, RolloutState.RUNNING):
            raise UsageError(f"rollout {rollout_id} is {rollout.state}; only a pending or running"
                             " rollout can be aborted")
        if rollout.owner != self.controller_id:
            raise UsageError(f"rollout {rollout_id} is driven by controller {rollout.owner}"
                             " (or by none yet); try again", hint="its owner takes the request"
                             " when it reaches it")
        self._event(rollout, "rollout.abort_requested", f"rollout {rollout.id}: abort requested"
                    " by an operator", reason="operator", data={"request_id": request_id})
        return self._abort(rollout, "operator", "aborted by an operator",
                           {"request_id": request_id})

    def _has_request(self, rollout: RolloutRecord, request_id: str) -> bool:
        found = self.store.list_events(rollout_id=rollout.id, kinds=["rollout.abort_requested"],
                                       limit=100)
        return any((e.data or {}).get("request_id") == request_id for e in found)

    def _abort(self, rollout: RolloutRecord, reason: str, message: str,
               data: dict[str, Any]) -> RolloutRecord:
        rollout = self._transition(rollout, RolloutState.ABORTING, message)
        self._event(rollout, "rollout.abort", f"aborting rollout {rollout.id}: {message}",
                    level="error", reason=reason, data=data)
        targets = self.store.list_rollout_targets(rollout.id)
        for target in targets:
            if target.state == TargetState.PENDING:
                self._set(rollout, target.device, TargetState.SKIPPED,
                          reason="the rollout was aborted first")
        # A device that timed out may still be installing: it is sent back too.
        updated = [t for t in targets if t.state in (TargetState.ASSIGNED, TargetState.SUCCEEDED,
                                                     TargetState.TIMED_OUT)]
        back = [self._set(rollout, t.device, TargetState.ROLLING_BACK) for t in updated]
        self._send_back(rollout, back)
        return self._roll_back(rollout)

    def _send_back(self, rollout: RolloutRecord, targets: list[TargetRecord]) -> None:
        for target in targets:
            try:
                self.documents.send_back(rollout, target)
            except EdgekitError as exc:
                self._set(rollout, target.device, TargetState.FAILED,
                          reason=f"cannot roll back: {exc.message}")
                self._event(rollout, "rollout.rollback_failed",
                            f"{target.device} cannot be rolled back: {exc.message}",
                            device=target.device, level="error", reason="no_rollback")
                continue

    def _roll_back(self, rollout: RolloutRecord) -> RolloutRecord:
        targets = self._observe(rollout, back=True)
        now = utcnow()
        timeout = rollout.plan["rollback_timeout_s"]
        for target in targets.values():
            if target.state == TargetState.ROLLING_BACK and (
                    now - target.updated).total_seconds() > timeout:
                targets[target.device] = self._set(
                    rollout, target.device, TargetState.TIMED_OUT,
                    reason=f"not back on the previous model within {timeout:g} s")
        if any(t.state == TargetState.ROLLING_BACK for t in targets.values()):
            return rollout
        if rollout.plan["scope"] == "fleet":
            self.documents.clear(rollout, list(targets))
        counts = _counts(targets.values())
        rollout = self._transition(rollout, RolloutState.ABORTED, rollout.reason)
        self._event(rollout, "rollout.aborted",
                    f"rollout {rollout.id} aborted; {counts.get('rolled_back', 0)} device(s)"
                    " rolled back", level="warning", data={"counts": counts})
        self._forget(rollout.id)
        return rollout

    # ---------------------------------------------------------------- records

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
        counts = _counts(self.store.list_rollout_targets(rollout.id))
        payload = RolloutStatePayload(
            schema=ROLLOUT_STATE_SCHEMA, rollout=rollout.id, fleet=rollout.fleet,
            model={"name": rollout.model_name, "version": rollout.model_version},
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


def _counts(targets: Iterable[TargetRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for target in targets:
        counts[target.state] = counts.get(target.state, 0) + 1
    return counts

