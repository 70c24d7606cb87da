"""The operator's actions: start a rollout to a registered version, abort a running
rollout, roll the fleet back from its last rollout.

They go to the controller as the CLI's requests do: :func:`build_request` makes the request
(:func:`~edgekit.protocol.controller.make_rollout_request`), :meth:`Submitter.submit` signs
it with the operator key (``[console] operator_key``) and sends it through
:func:`~edgekit.host.controller.remote.submit_request`, the one path every request takes.
An abort reverts the devices the rollout updated (signed revert documents); a roll back
asks the controller for a rollout back to the model it deployed to the fleet before; the
controller, not the console, picks that model from its own records (docs/console.md).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import ProtocolError, UsageError
from edgekit.host.controller.remote import submit_request
from edgekit.host.mqtt_client import HostClient
from edgekit.protocol import is_valid_id
from edgekit.protocol.controller import RolloutRequest, make_rollout_request

__all__ = ["Action", "Submitter", "build_request", "parse_action"]

_CANARY_MAX = 16


@dataclass(frozen=True)
class Action:
    """What an operator asked for, checked."""

    kind: str  # "rollout", "abort" or "rollback"
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
    if kind in ("abort", "rollback"):
        text = field("rollout", 18)
        if not text.isdigit() or int(text) < 1:
            raise UsageError(f"{kind}: rollout must be a rollout id")
        return Action(kind, fleet, name, version, rollout_id=int(text))
    raise UsageError(f"unknown action {kind!r}")


def build_request(action: Action) -> RolloutRequest:
    """The controller request that carries ``action`` (not yet signed).

    Raises:
        UsageError: a field is one the controller would refuse (too long, ...).
    """
    try:
        return make_rollout_request(
            action.fleet, secrets.token_hex(8), name=action.name, version=action.version,
            plan={"canary": action.canary} if action.canary else None, action=action.kind,
            rollout_id=action.rollout_id)
    except ProtocolError as exc:
        raise UsageError(f"{action.kind}: {exc.message}") from exc


class Submitter:
    """Signs requests with the operator ``key`` and sends them to the fleet's controller
    over ``client``."""

    def __init__(self, client: HostClient, key: Ed25519PrivateKey, *,
                 timeout: float = 20.0) -> None:
        self.client = client
        self.key = key
        self.timeout = timeout

    def submit(self, request: RolloutRequest) -> dict[str, Any]:
        """Sign and send ``request``; return the rollout of the controller's reply.

        Raises:
            RemoteRolloutError: the controller refused the request.
            EdgekitError: no controller answered in time.
        """
        return submit_request(self.client, request, self.key, timeout=self.timeout)
