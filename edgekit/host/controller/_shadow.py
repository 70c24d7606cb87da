"""The shadow stage of a rollout: before its canary, the canary's devices judge the new model.

With ``rollout.shadow_enabled`` in the rollout's plan, the first pass asks the devices the
canary will take (per-device documents of deployment ``r<id>-<token>-shadow``) to verify the
new model and run it beside their own on ``shadow_sample`` of live requests until
``shadow_requests`` are compared. Each device answers ``update.shadowed`` with a report
(:class:`~edgekit.protocol.ota.shadow.ShadowReport`, parsed here as hostile input) or
``update.failed``. The gate passes when every device reported, each one's agreement reaches
``shadow_min_agreement``, and, where a report has ``shadow_min_labels`` labelled rows, the
new model's accuracy minus the serving model's reaches ``shadow_min_accuracy_delta``. Then
the canary starts; otherwise the rollout aborts with the reason (no device ever served the
new model, so there is nothing to send back). Canary devices that serve no model yet sit
the stage out (nothing to compare with); with none left it is skipped. The stage's progress is the rollout's own
events (``rollout.shadow_started``, ``rollout.shadow``), so a controller that takes the
rollout over carries on.

A *shadow trial* (``trial`` in the plan, made by the maintenance policy to compare
candidates, :mod:`._pick`) is a rollout that ends after its shadow stage: succeeded when the
gate passed (its targets skipped: nothing is deployed), aborted when it did not.
"""

from __future__ import annotations

from typing import Any

import msgspec

from edgekit.errors import ProtocolError
from edgekit.host.controller._back import AbortingEngine
from edgekit.host.db import RolloutRecord, RolloutState, TargetState, utcnow
from edgekit.protocol.controller import deployment_id
from edgekit.protocol.ota.events import UpdateStep, event_kind
from edgekit.protocol.ota.shadow import ShadowReport, make_shadow, parse_shadow_report

__all__ = ["ShadowStage", "judge_shadow"]

_STARTED, _DONE = "rollout.shadow_started", "rollout.shadow"
_KINDS = [event_kind(UpdateStep.SHADOWED), event_kind(UpdateStep.FAILED)]


def judge_shadow(reports: dict[str, ShadowReport], plan: dict[str, Any]) -> list[str]:
    """What keeps the reports from passing the gate (empty: they pass)."""
    problems = []
    for device, r in sorted(reports.items()):
        if r.requests == 0 or r.agreement is None:
            problems.append(f"{device}: no request was compared ({r.ended})")
            continue
        if r.agreement < plan["shadow_min_agreement"]:
            problems.append(f"{device}: agreement {r.agreement:.3f} below"
                            f" {plan['shadow_min_agreement']:g}")
        s, c = r.serving.accuracy, r.candidate.accuracy
        if s is not None and c is not None and r.labelled >= plan["shadow_min_labels"] \
                and c - s < plan["shadow_min_accuracy_delta"]:
            problems.append(f"{device}: accuracy {c:.3f} against {s:.3f} serving (delta"
                            f" {c - s:+.3f}, at least {plan['shadow_min_accuracy_delta']:+g})")
    return problems


class ShadowStage(AbortingEngine):
    """The shadow stage of the rollout engine; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shadow_passed: set[int] = set()  # rollouts past their shadow stage

    def _shadow_gate(self, rollout: RolloutRecord) -> RolloutRecord | None:
        """The rollout while its shadow stage runs or after it aborted it; None when the
        rollout has no shadow stage or passed it."""
        plan = rollout.plan
        if not plan.get("shadow_enabled") or rollout.id in self._shadow_passed:
            return None
        if self._has_event(rollout, _DONE):
            self._shadow_passed.add(rollout.id)
            return self._end_trial(rollout) if plan.get("trial") else None
        started = self.store.list_events(rollout_id=rollout.id, kinds=[_STARTED], limit=1)
        if not started:
            return self._start_shadow(rollout)
        devices = list((started[0].data or {}).get("devices") or [])
        reports, failures = self._shadow_reports(rollout, devices)
        waiting = sorted(set(devices) - set(reports) - set(failures))
        if waiting:
            age = (utcnow() - started[0].ts).total_seconds()
            if age <= plan["shadow_timeout_s"]:
                return rollout
            failures.update({d: f"no report within {plan['shadow_timeout_s']:g} s"
                             for d in waiting})
        problems = [f"{d}: {why}" for d, why in sorted(failures.items())]
        problems += judge_shadow(reports, plan)
        data = {"devices": devices, "reports": {d: r.to_dict() for d, r in reports.items()},
                "problems": problems}
        self.documents.clear(rollout, devices)
        if problems:
            return self._abort(rollout, "shadow", "shadow stage: " + "; ".join(problems), data)
        self._event(rollout, _DONE, f"shadow stage passed on {len(devices)} device(s)",
                    reason="passed", data=data)
        self._shadow_passed.add(rollout.id)
        return self._end_trial(rollout) if plan.get("trial") else None

    def _end_trial(self, rollout: RolloutRecord) -> RolloutRecord:
        """A shadow trial ends after its stage passed: nothing is deployed."""
        for target in self.store.list_rollout_targets(rollout.id):
            if target.state == TargetState.PENDING:
                self._set(rollout, target.device, TargetState.SKIPPED,
                          reason="shadow trial: nothing deployed")
        rollout = self._transition(rollout, RolloutState.SUCCEEDED,
                                   "shadow trial passed; nothing deployed")
        self._forget(rollout.id)
        return rollout

    def _start_shadow(self, rollout: RolloutRecord) -> RolloutRecord | None:
        plan = rollout.plan
        pending = sorted(t.device for t in self.store.list_rollout_targets(rollout.id)
                         if t.state == TargetState.PENDING)
        canary = pending[:plan["waves"][0]] if plan["waves"] else []
        serving = {d.device for d in self.store.list_devices(rollout.fleet)
                   if d.model_sha256 is not None}
        devices = [d for d in canary if d in serving]
        if not devices:
            # Nothing serves on the canary's devices (a first deploy): nothing to compare.
            self._event(rollout, _DONE, "shadow stage skipped: no canary device serves a"
                        " model to compare with", reason="skipped", data={"devices": canary})
            self._shadow_passed.add(rollout.id)
            return self._end_trial(rollout) if plan.get("trial") else None
        spec = make_shadow(int(plan["shadow_requests"]), float(plan["shadow_sample"]),
                           float(plan["shadow_timeout_s"]))
        if devices:
            self.documents.ask_shadow(rollout, devices, spec)
        self._event(rollout, _STARTED,
                    f"shadow stage: {len(devices)} device(s) run {rollout.model_name}"
                    f" {rollout.model_version} beside their model on"
                    f" {spec.sample:.0%} of requests",
                    data={"devices": devices, "shadow": msgspec.to_builtins(spec),
                          "deployment": deployment_id(rollout.id, plan["token"], shadow=True)})
        return rollout

    def _shadow_reports(self, rollout: RolloutRecord, devices: list[str]
                        ) -> tuple[dict[str, ShadowReport], dict[str, str]]:
        """Each device's report, or why it has none (failed, or a report that does not
        parse: a device's claim is checked like any input from the network)."""
        wanted = deployment_id(rollout.id, rollout.plan["token"], shadow=True)
        reports: dict[str, ShadowReport] = {}
        failures: dict[str, str] = {}
        for event in self.store.list_events(rollout_id=rollout.id, kinds=_KINDS,
                                            limit=10_000):
            data = event.data or {}
            device = event.device or ""
            if device not in devices or data.get("deployment") != wanted or \
                    device in reports or device in failures:
                continue
            if event.kind != event_kind(UpdateStep.SHADOWED):
                failures[device] = f"{event.reason or 'failed'}: {event.message}"
                continue
            details = data.get("details")
            try:
                report = parse_shadow_report(
                    details.get("shadow") if isinstance(details, dict) else None)
                if report.deployment != wanted:
                    raise ProtocolError(f"the report is about {report.deployment!r}")
            except ProtocolError as exc:
                failures[device] = f"shadow report refused: {exc.message}"
                continue
            reports[device] = report
        return reports, failures
