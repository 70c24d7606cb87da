"""The operator's actions: start a rollout to a registered version, abort a rollout.

They go to the controller as the CLI's requests do (:mod:`edgekit.host.controller.remote`):
:func:`build_request` makes the request, :meth:`Submitter.submit` sends it and waits for
the controller's reply. An abort is the controller's roll back: every device the rollout
updated goes back to its previous model under a signed rollback instruction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgekit.errors import UsageError
from edgekit.host.controller.remote import new_request, submit_request
from edgekit.host.mqtt_client import HostClient
from edgekit.protocol import is_valid_id
from edgekit.protocol.controller import RolloutRequest

__all__ = ["Action", "Submitter", "build_request", "parse_action"]

_CANARY_MAX = 16


@dataclass(frozen=True)
class Action:
    """What an operator asked for, checked."""

    kind: str  # "rollout" or "abort"
    fleet: str
    name: str
    version: str
    rollout_id: int | None = None
    canary: str | None = None


def parse_action(kind: str, form: Mapping[str, Any]) -> Action:
    """Check a submitted form.

    Raises:
        UsageError: a field is missing or malformed; the message names it.
    """
    def field(name: str, limit: int = 128) -> str:
        value = str(form.get(name) or "").strip()
        if not value or len(value) > limit:
            raise UsageError(f"{kind}: {name} is missing or too long")
        return value

    fleet = field("fleet", 64)
    if not is_valid_id(fleet):
        raise UsageError(f"{kind}: {fleet!r} is not a fleet id")
    model = field("model")
    name, sep, version = model.partition(":")
    if not sep or not name or not version:
        raise UsageError(f"{kind}: model must be NAME:VERSION")
    if kind == "rollout":
        canary = str(form.get("canary") or "").strip() or None
        if canary is not None and (len(canary) > _CANARY_MAX or not canary.rstrip("%").replace(
                ".", "", 1).isdigit()):
            raise UsageError("rollout: canary must be a count or a percentage")
        return Action("rollout", fleet, name, version, canary=canary)
    if kind == "abort":
        text = field("rollout", 18)
        if not text.isdigit() or int(text) < 1:
            raise UsageError("abort: rollout must be a rollout id")
        return Action("abort", fleet, name, version, rollout_id=int(text))
    raise UsageError(f"unknown action {kind!r}")


def build_request(action: Action) -> RolloutRequest:
    """The controller request that carries ``action``."""
    request = new_request(action.fleet, name=action.name, version=action.version)
    if action.kind == "abort":
        request["action"] = "abort"
        assert action.rollout_id is not None
        request["rollout_id"] = action.rollout_id
    else:
        request["plan"] = {"canary": action.canary} if action.canary else {}
        request["sha256"] = None
        request["devices"] = None
    return request


class Submitter:
    """Sends requests to the fleet's controller over ``client``.

    ``operator_key`` is the path of the operator's key (``[console] operator_key``) for the
    controllers that take only requests an operator signed.
    """

    def __init__(self, client: HostClient, *, operator_key: str | None = None,
                 timeout: float = 20.0) -> None:
        self.client = client
        self.operator_key = operator_key
        self.timeout = timeout

    def submit(self, fleet: str, request: RolloutRequest) -> dict[str, Any]:
        """Send ``request`` and return the rollout of the controller's reply.

        Raises:
            RemoteRolloutError: the controller refused the request.
            EdgekitError: no controller answered in time.
        """
        return submit_request(self.client, fleet, request, timeout=self.timeout)
