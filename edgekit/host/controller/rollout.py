"""The rollout engine: canary, then waves growing by a factor, with abort and rollback.

With ``rollout.shadow_enabled`` a shadow stage comes first (:mod:`._shadow`): the canary's
devices run the new model beside their own and report, and the canary starts only when the
reports pass the gate.

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
An abort sends every updated device a signed revert of the rollout's package (the device goes
back to the model it kept from before; never a version taken from a device's report) and
waits for it to get there (:mod:`._back`). An operator's roll back of the fleet's latest
rollout is a new rollout to the model the controller deployed before it
(:meth:`RolloutEngine.roll_back`). All state is in the database, so a controller that restarts, or another one that takes the
rollout over, carries on from it.
"""

from __future__ import annotations

import secrets
from typing import Any

from edgekit.errors import UsageError
from edgekit.host.controller._back import model_before
from edgekit.host.controller._engine import count_states, log
from edgekit.host.controller._plan import (
    Figures,
    baseline_figures,
    judge_quality,
    latest_figures,
    plan_settings,
    recorded_baselines,
    wave_sizes,
)
from edgekit.host.controller._shadow import ShadowStage
from edgekit.host.db import RolloutRecord, RolloutState, TargetRecord, TargetState, utcnow
from edgekit.host.errors import LeaseLostError
from edgekit.manifest import compare_versions

__all__ = ["RolloutEngine"]

_OUTCOMES = {TargetState.SUCCEEDED, TargetState.FAILED, TargetState.TIMED_OUT}


class RolloutEngine(ShadowStage):
    """Creates and drives rollouts; see the module docstring.

    ``server`` (optional) serves the artifacts the rollouts name over MQTT; without it some
    other server must (``edgekit serve``). ``signing_key`` (the operator key) signs every
    desired document; without it no rollout can be created.
    """

    # ---------------------------------------------------------------- creating

    def create(self, fleet: str, name: str, version: str, *, devices: list[str] | None = None,
               overrides: dict[str, Any] | None = None, source: str = "api",
               request_id: str | None = None, note: str | None = None,
               back: dict[str, Any] | None = None, trial: bool = False) -> RolloutRecord:
        """Create a pending rollout of the registered ``name:version`` to ``fleet``.

        Without ``devices`` the targets are the fleet's online devices (all of its devices
        with ``include_offline``); devices that join later follow the fleet's desired
        document once the rollout has succeeded. ``back`` (only from :meth:`roll_back`)
        makes it a roll back: its documents allow the downgrade or rename it names.
        ``trial`` makes it a shadow trial: it ends after its shadow stage (:mod:`._shadow`).

        Raises:
            UsageError: the model is not registered, the fleet has an active rollout, or a
                listed device is unknown.
            ConfigError: an override is unknown or invalid.
            ArtifactError: the registered package file is missing.
        """
        if self.documents.signing_key is None:
            raise UsageError("the controller has no controller.signing_key, so it cannot sign"
                             " the desired documents of a rollout",
                             hint="set controller.signing_key to an operator key the devices"
                                  " trust (ota.intent_keys)")
        record = self.registry.get(name, version)
        self.registry.artifact_path(name, version)
        settings = plan_settings(self.settings, overrides)
        if trial:
            settings["shadow_enabled"] = True  # a trial is its shadow stage, nothing more
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
        plan = {**settings, "token": secrets.token_hex(3), "source": source,
                "request_id": request_id, "note": note, "back": back, "trial": trial,
                "scope": "devices" if devices is not None else "fleet",
                "model": {"name": record.name, "version": record.version,
                          "sha256": record.sha256, "size": record.size},
                "waves": wave_sizes(len(targets), settings["canary"], settings["wave_factor"])}
        rollout = self.store.create_rollout(fleet, name, version, plan, targets=targets)
        self._event(rollout, "rollout.created",
                    f"rollout {rollout.id}: {record.ref} to {len(targets)} device(s) of"
                    f" {fleet}, waves {plan['waves']}",
                    data={"source": source, "waves": plan["waves"], "targets": targets,
                          "note": note})
        return rollout

    def roll_back(self, fleet: str, rollout_id: int, *, name: str, version: str,
                  request_id: str | None = None) -> RolloutRecord:
        """Roll the fleet back from its latest rollout, at an operator's request: a new
        rollout (canary, waves, failure-rate and timeout criteria like any; no quality gate
        and no wait for labels: the operator judged that model better) to the model the
        controller deployed to the fleet before it (:func:`~._back.model_before`, its own
        records), whose signed documents allow that downgrade (or name change) and nothing
        else.

        Raises:
            UsageError: rollout ``rollout_id`` is not ``fleet``'s latest succeeded fleet-wide
                rollout of ``name:version``; the controller deployed no other model before
                it; that model is no longer registered with the same package; or the fleet
                has an active rollout.
        """
        rollout = self._rollout_of(fleet, rollout_id, name, version)
        done = [r.id for r in self.store.list_rollouts(fleet=fleet)
                if r.state == RolloutState.SUCCEEDED and r.plan.get("scope") == "fleet"]
        if not done or done[-1] != rollout.id:
            raise UsageError(f"rollout {rollout_id} is not fleet {fleet}'s latest succeeded"
                             " fleet-wide rollout, so the fleet does not run its model",
                             hint="abort a running rollout instead; `edgekit rollback --to"
                                  " VERSION` sends devices to a version they keep")
        model = model_before(self.store, rollout)
        if model is None:
            raise UsageError(f"the controller deployed no other model to fleet {fleet} before"
                             f" rollout {rollout_id}", hint="`edgekit rollback --to VERSION`"
                             " sends devices to a version they keep")
        record = self.registry.get(model["name"], model["version"])
        if record.sha256 != model["sha256"]:
            raise UsageError(f"{record.ref} is registered with another package than the one"
                             " the controller deployed before")
        renamed = record.name != name
        back = {"rollout": rollout.id, "allow_rename": renamed,
                "allow_downgrade": renamed or compare_versions(record.version, version) <= 0}
        return self.create(fleet, record.name, record.version, source="rollback",
                           request_id=request_id, back=back,
                           note=f"roll back of rollout {rollout.id} ({name} {version})")

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
            devices = [t.device for t in assigned]
            self.documents.ask(rollout, devices, bases=self._bases(rollout.fleet, devices))
        rolling = self.store.list_rollout_targets(rollout.id, state=TargetState.ROLLING_BACK)
        if rolling:
            self._send_back(rollout, rolling)

    # ---------------------------------------------------------------- running

    def _run(self, rollout: RolloutRecord) -> RolloutRecord:
        shadowing = self._shadow_gate(rollout)  # the shadow stage, before the canary
        if shadowing is not None:
            return shadowing
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
        if not canary or rollout.plan.get("back"):
            # A roll back returns to the model the operator chose over the one it replaces:
            # judging it against that model would keep the fleet on what was rejected.
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
        need = 0 if plan.get("back") else plan["wave_min_labels"]
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
        deltas = self.documents.ask(rollout, devices, bases=self._bases(rollout.fleet, devices))
        for device in devices:
            record = known.get(device)
            self._set(rollout, device, TargetState.ASSIGNED, wave=wave,
                      previous_version=record.model_version if record else None)
        rollout = self.store.set_rollout_wave(rollout.id, wave, owner=self.controller_id)
        self._event(rollout, "rollout.wave",
                    f"wave {wave}: asking {len(devices)} device(s) to run"
                    f" {rollout.model_name} {rollout.model_version}",
                    data={"wave": wave, "devices": devices, "baseline": baselines,
                          "deltas": [{"base_sha256": d.base_sha256, "size": d.size}
                                     for d in deltas]})
        self._publish_state(rollout)
        return rollout

    def _succeed(self, rollout: RolloutRecord,
                 targets: dict[str, TargetRecord]) -> RolloutRecord:
        if rollout.plan["scope"] == "fleet":
            self.documents.publish_fleet(rollout, bases=self._bases(rollout.fleet))
            self.documents.clear(rollout, list(targets))
        counts = count_states(targets.values())
        rollout = self._transition(rollout, RolloutState.SUCCEEDED,
                                   f"{counts.get('succeeded', 0)} of {len(targets)} devices"
                                   " updated")
        self._event(rollout, "rollout.succeeded",
                    f"rollout {rollout.id} succeeded: {rollout.model_name}"
                    f" {rollout.model_version} is the fleet's model", data={"counts": counts})
        self._forget(rollout.id)
        return rollout



