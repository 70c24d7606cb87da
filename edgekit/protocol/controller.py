"""The controller's own MQTT messages: presence, rollout requests and rollout state.

::

    edgekit/v1/_controllers/<controller-id>          retained presence; cleared by the last will
    edgekit/v1/<fleet>/_controller/rollout           rollout requests (``edgekit deploy``)
    edgekit/v1/<fleet>/_controller/rollout-state     retained: the fleet's latest rollout

Levels that start with ``_`` can never be device ids, so none of these topics can be
mistaken for a device's. A request names its reply topic and carries a request id, as every
request of the protocol does (docs/protocol.md). Deployment ids of rollouts are
``r<rollout id>-<token>``, so an ``update.*`` event names the rollout it belongs to.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, NotRequired, TypedDict

from edgekit.errors import ProtocolError
from edgekit.protocol import ROOT, is_valid_id

__all__ = [
    "PRESENCE_SCHEMA",
    "ROLLOUT_ACTIONS",
    "ROLLOUT_REPLY_SCHEMA",
    "ROLLOUT_REQUEST_SCHEMA",
    "ROLLOUT_STATE_SCHEMA",
    "PresencePayload",
    "RolloutReply",
    "RolloutRequest",
    "RolloutStatePayload",
    "deployment_id",
    "make_presence",
    "parse_presence",
    "parse_rollout_request",
    "presence_filter",
    "presence_topic",
    "rollout_of_deployment",
    "rollout_request_topic",
    "rollout_state_topic",
    "serves_fleet",
]

PRESENCE_SCHEMA = "edgekit.controller/1"
ROLLOUT_REQUEST_SCHEMA = "edgekit.rollout-request/1"
ROLLOUT_REPLY_SCHEMA = "edgekit.rollout-reply/1"
ROLLOUT_STATE_SCHEMA = "edgekit.rollout-state/1"
ROLLOUT_ACTIONS = ("rollout", "abort")
_CONTROLLERS = "_controllers"
_CONTROLLER = "_controller"
_DEPLOYMENT_RE = re.compile(r"^r(\d{1,18})-[0-9a-z]+(?:-back)?$")


class PresencePayload(TypedDict):
    schema: str
    id: str
    fleets: list[str]  # "+" for every fleet
    started: float
    ts: float


class RolloutRequest(TypedDict):
    schema: str
    request_id: str
    reply_to: str
    name: str  # model name
    version: str
    sha256: NotRequired[str | None]  # must match the registered package when given
    package: NotRequired[str | None]  # a path the controller can read, registered if needed
    devices: NotRequired[list[str] | None]  # only these devices (default: the fleet)
    plan: NotRequired[dict[str, Any]]  # overrides of [rollout] keys, e.g. {"canary": "50%"}
    action: NotRequired[str]  # "rollout" (the default) or "abort"
    rollout_id: NotRequired[int]  # the rollout to abort (its name and version must match)


class RolloutReply(TypedDict):
    schema: str
    request_id: str
    ok: bool
    rollout: NotRequired[dict[str, Any]]  # RolloutRecord.to_dict() and "targets"
    error: NotRequired[dict[str, str]]  # {"code", "message"}


class RolloutStatePayload(TypedDict):
    schema: str
    rollout: int
    fleet: str
    model: dict[str, str]  # name, version
    state: str
    wave: int
    counts: dict[str, int]  # target state -> devices
    reason: str | None
    ts: float


def presence_topic(controller_id: str) -> str:
    return f"{ROOT}/{_CONTROLLERS}/{controller_id}"


def presence_filter() -> str:
    return f"{ROOT}/{_CONTROLLERS}/+"


def rollout_request_topic(fleet: str) -> str:
    return f"{ROOT}/{fleet}/{_CONTROLLER}/rollout"


def rollout_state_topic(fleet: str) -> str:
    return f"{ROOT}/{fleet}/{_CONTROLLER}/rollout-state"


def deployment_id(rollout_id: int, token: str, *, back: bool = False) -> str:
    """The deployment id of a rollout's desired documents (``-back`` for its rollback)."""
    return f"r{rollout_id}-{token}" + ("-back" if back else "")


def rollout_of_deployment(deployment: object) -> int | None:
    """The rollout id a deployment id belongs to, or None when it is not a rollout's."""
    if not isinstance(deployment, str):
        return None
    match = _DEPLOYMENT_RE.match(deployment)
    return int(match.group(1)) if match else None


def make_presence(controller_id: str, fleets: list[str], started: float) -> PresencePayload:
    return PresencePayload(schema=PRESENCE_SCHEMA, id=controller_id, fleets=list(fleets),
                           started=started, ts=time.time())


def parse_presence(data: bytes) -> PresencePayload:
    """Raises: ProtocolError: not a presence payload."""
    doc = _decode(data, PRESENCE_SCHEMA)
    fleets = doc.get("fleets")
    if not isinstance(doc.get("id"), str) or not isinstance(fleets, list) or not all(
            isinstance(f, str) for f in fleets):
        raise ProtocolError("presence payload needs an id and a list of fleets")
    return PresencePayload(schema=PRESENCE_SCHEMA, id=doc["id"], fleets=fleets,
                           started=float(doc.get("started") or 0.0),
                           ts=float(doc.get("ts") or 0.0))


def serves_fleet(presence: PresencePayload, fleet: str) -> bool:
    return "+" in presence["fleets"] or fleet in presence["fleets"]


def parse_rollout_request(data: bytes) -> RolloutRequest:
    """Check a rollout request.

    Raises:
        ProtocolError: not JSON, another schema, or a field missing or of the wrong type;
            the message names the field.
    """
    doc = _decode(data, ROLLOUT_REQUEST_SCHEMA)
    for key in ("request_id", "reply_to", "name", "version"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise ProtocolError(f"rollout request: {key} must be a non-empty string")
    if any(c in doc["reply_to"] for c in "+#\0") or doc["reply_to"].startswith("$"):
        raise ProtocolError("rollout request: reply_to is not a topic one can publish to")
    request = RolloutRequest(schema=ROLLOUT_REQUEST_SCHEMA, request_id=doc["request_id"][:128],
                             reply_to=doc["reply_to"], name=doc["name"], version=doc["version"])
    for key in ("sha256", "package"):
        value = doc.get(key)
        if value is not None and not isinstance(value, str):
            raise ProtocolError(f"rollout request: {key} must be a string or null")
        request[key] = value  # type: ignore[literal-required]
    devices = doc.get("devices")
    if devices is not None:
        if not isinstance(devices, list) or not all(is_valid_id(d) for d in devices):
            raise ProtocolError("rollout request: devices must be a list of device ids")
        request["devices"] = devices
    plan = doc.get("plan")
    if plan is not None:
        if not isinstance(plan, dict):
            raise ProtocolError("rollout request: plan must be an object")
        request["plan"] = plan
    action = doc.get("action", "rollout")
    if action not in ROLLOUT_ACTIONS:
        raise ProtocolError(f"rollout request: action must be one of {', '.join(ROLLOUT_ACTIONS)}")
    request["action"] = action
    if action == "abort":
        rollout_id = doc.get("rollout_id")
        if not isinstance(rollout_id, int) or isinstance(rollout_id, bool) or rollout_id < 1:
            raise ProtocolError("rollout request: an abort needs rollout_id, a positive integer")
        request["rollout_id"] = rollout_id
    return request


def _decode(data: bytes, schema: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ProtocolError(f"payload is a JSON {type(doc).__name__}, expected an object")
    if doc.get("schema") != schema:
        raise ProtocolError(f"payload schema is {doc.get('schema')!r}, expected {schema!r}")
    return doc
