"""Going back: an operator's or the criteria's abort of a rollout (its updated devices get a
signed revert of its package and go back to the model each kept from before), and the model
a fleet goes back to when an operator rolls back its last rollout.

The model of a roll back comes from the controller's own records: the model of the fleet's
succeeded rollout before the one rolled back, as the controller deployed it (name, version,
sha256 in that rollout's plan). Nothing a device reported chooses it.
"""

from __future__ import annotations

from typing import Any

from edgekit.errors import EdgekitError, UsageError
from edgekit.host.controller._engine import EngineBase, count_states
from edgekit.host.db import RolloutRecord, RolloutState, Store, TargetRecord, TargetState, utcnow

__all__ = ["AbortingEngine", "model_before"]


def model_before(store: Store, rollout: RolloutRecord) -> dict[str, Any] | None:
    """The model (``name``, ``version``, ``sha256``, ``size``) of the fleet's newest succeeded
    fleet-wide rollout before ``rollout`` that deployed another model than it; None when the
    controller deployed none."""
    current = (rollout.model_name, rollout.model_version)
    for earlier in reversed(store.list_rollouts(fleet=rollout.fleet)):
        if earlier.id >= rollout.id or earlier.state != RolloutState.SUCCEEDED or \
                earlier.plan.get("scope") != "fleet":
            continue
        if (earlier.model_name, earlier.model_version) != current:
            model = earlier.plan.get("model")
            return dict(model) if isinstance(model, dict) else None
    return None


class AbortingEngine(EngineBase):
    """The abort and rollback half of the rollout engine."""

    def abort(self, fleet: str, rollout_id: int, *, name: str, version: str,
              request_id: str | None = None) -> RolloutRecord:
        """Abort a rollout at an operator's request: devices it updated go back to their
        previous model, the others are skipped. A rollout already aborting or aborted by
        this request is returned as it is (requests are retried on reconnects).

        Raises:
            UsageError: the rollout is not ``fleet``'s rollout of ``name:version``, it is
                finished, or another controller drives it.
        """
        rollout = self._rollout_of(fleet, rollout_id, name, version)
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

    def _rollout_of(self, fleet: str, rollout_id: int, name: str,
                    version: str) -> RolloutRecord:
        """Raises: UsageError: ``fleet`` has no rollout ``rollout_id`` of ``name:version``."""
        try:
            rollout = self.store.get_rollout(rollout_id)
        except UsageError:
            rollout = None
        if rollout is None or rollout.fleet != fleet or (rollout.model_name,
                                                          rollout.model_version) != (name, version):
            raise UsageError(f"fleet {fleet} has no rollout {rollout_id} of {name}:{version}",
                             hint="see `edgekit fleet rollouts`")
        return rollout

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
        counts = count_states(targets.values())
        rollout = self._transition(rollout, RolloutState.ABORTED, rollout.reason)
        self._event(rollout, "rollout.aborted",
                    f"rollout {rollout.id} aborted; {counts.get('rolled_back', 0)} device(s)"
                    " rolled back", level="warning", data={"counts": counts})
        self._forget(rollout.id)
        return rollout
