"""The controller's own MQTT messages: presence, rollout requests and rollout state.

::

    edgekit/v1/_controllers/<controller-id>          retained presence; cleared by the last will
    edgekit/v1/<fleet>/_controller/rollout           rollout requests (``edgekit deploy``)
    edgekit/v1/<fleet>/_controller/rollout-state     retained: the fleet's latest rollout

Levels that start with ``_`` can never be device ids, so none of these topics can be
mistaken for a device's. A request names its reply topic and carries a request id, as every
request of the protocol does (docs/protocol.md). A rollout request travels signed by an
operator key (:func:`sign_request`, an :mod:`edgekit.protocol.signed` envelope) and expires;
it names a registered model (name, version, optional sha256), never a file. The controller
checks the signature before it reads the request (:func:`open_rollout_request`). ``action``
(signed with the rest) is ``"rollout"``, ``"abort"`` (stop the fleet's running rollout
``rollout_id`` and revert its devices) or ``"rollback"`` (send the fleet back to the model
the controller deployed before its rollout ``rollout_id``). Deployment ids of rollouts are
``r<rollout id>-<token>``, so an ``update.*`` event names the rollout it belongs to.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, NotRequired, TypedDict

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from msgspec import Meta

from edgekit.errors import ProtocolError, SignatureError
from edgekit.protocol import ROOT, encode, is_valid_id
from edgekit.protocol.codec import DEFAULT_MAX_BYTES, Document, decode
from edgekit.protocol.signed import is_sealed, open_sealed, seal
from edgekit.protocol.topics import ID_PATTERN

__all__ = [
    "PRESENCE_SCHEMA",
    "ROLLOUT_ACTIONS",
    "ROLLOUT_REPLY_SCHEMA",
    "ROLLOUT_REQUEST_SCHEMA",
    "ROLLOUT_STATE_SCHEMA",
    "PresencePayload",
    "ReplyError",
    "RolloutModel",
    "RolloutReply",
    "RolloutRequest",
    "RolloutStatePayload",
    "deployment_id",
    "make_presence",
    "make_rollout_request",
    "open_rollout_request",
    "parse_presence",
    "parse_rollout_request",
    "peek_reply_to",
    "presence_filter",
    "presence_topic",
    "reply_topic",
    "rollout_of_deployment",
    "rollout_request_topic",
    "rollout_state_topic",
    "serves_fleet",
    "sign_request",
]

PRESENCE_SCHEMA = "edgekit.controller/1"
ROLLOUT_REQUEST_SCHEMA = "edgekit.rollout-request/1"
ROLLOUT_REPLY_SCHEMA = "edgekit.rollout-reply/1"
ROLLOUT_STATE_SCHEMA = "edgekit.rollout-state/1"
ROLLOUT_ACTIONS = ("rollout", "abort", "rollback")
_CONTROLLERS = "_controllers"
_CONTROLLER = "_controller"
_DEPLOYMENT_RE = re.compile(r"^r(\d{1,18})-[0-9a-z]+(?:-back|-shadow)?$")
_REPLY_RE = re.compile(r"^edgekit/v1/([A-Za-z0-9_.-]{1,64})/_host/rollout-reply/[0-9a-f]{8,64}$")
_REQUEST_ID_RE = re.compile(r"^[0-9a-f]{8,64}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
REQUEST_TTL_S = 300.0  # a request older than this is refused (a replay, or a stale retry)
_MAX_SKEW_S = 300.0


class PresencePayload(Document, tag=PRESENCE_SCHEMA):
    """Retained on the controller's presence topic while it runs."""

    id: Annotated[str, Meta(min_length=1, max_length=128)]
    fleets: Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=1024)]
    started: float = 0.0
    ts: float = 0.0


class RolloutRequest(TypedDict):
    schema: str
    request_id: str  # 8..64 lowercase hex digits
    reply_to: str  # edgekit/v1/<fleet>/_host/rollout-reply/<request_id>
    fleet: str  # the fleet it is for (signed: a request cannot be moved to another fleet)
    issued: float  # Unix time; the controller refuses requests older than REQUEST_TTL_S
    name: str  # a registered model's name
    version: str
    sha256: NotRequired[str | None]  # must match the registered package when given
    devices: NotRequired[list[str] | None]  # only these devices (default: the fleet)
    plan: NotRequired[dict[str, Any]]  # overrides of [rollout] keys, e.g. {"canary": "50%"}
    action: NotRequired[str]  # "rollout" (the default), "abort" or "rollback"
    rollout_id: NotRequired[int]  # abort, rollback: the rollout (name and version must match)


class RolloutModel(msgspec.Struct, kw_only=True, frozen=True):
    name: Annotated[str, Meta(max_length=256)]
    version: Annotated[str, Meta(max_length=64)]


class ReplyError(msgspec.Struct, kw_only=True, frozen=True):
    """Why the controller refused a request: its error class name, message and hint."""

    code: Annotated[str, Meta(max_length=64)]
    message: Annotated[str, Meta(max_length=8192)]
    hint: Annotated[str, Meta(max_length=8192)] = ""


class RolloutReply(Document, tag=ROLLOUT_REPLY_SCHEMA):
    """The controller's answer to a request, on the request's ``reply_to`` topic."""

    max_bytes: ClassVar[int] = 16 * 1024 * 1024  # a rollout lists its targets
    request_id: Annotated[str, Meta(pattern=_REQUEST_ID_RE.pattern)]
    ok: bool
    rollout: dict[str, Any] | None = None  # RolloutRecord.to_dict() and "targets"
    error: ReplyError | None = None


class RolloutStatePayload(Document, tag=ROLLOUT_STATE_SCHEMA):
    """Retained on the fleet's rollout-state topic: its latest rollout."""

    rollout: Annotated[int, Meta(ge=1)]
    fleet: Annotated[str, Meta(pattern=ID_PATTERN)]
    model: RolloutModel
    state: Annotated[str, Meta(min_length=1, max_length=32)]
    wave: Annotated[int, Meta(ge=0)]
    counts: Annotated[dict[Annotated[str, Meta(max_length=32)], Annotated[int, Meta(ge=0)]],
                      Meta(max_length=32)]  # target state -> devices
    reason: Annotated[str, Meta(max_length=8192)] | None
    ts: float


def presence_topic(controller_id: str) -> str:
    return f"{ROOT}/{_CONTROLLERS}/{controller_id}"


def presence_filter() -> str:
    return f"{ROOT}/{_CONTROLLERS}/+"


def rollout_request_topic(fleet: str) -> str:
    return f"{ROOT}/{fleet}/{_CONTROLLER}/rollout"


def rollout_state_topic(fleet: str) -> str:
    return f"{ROOT}/{fleet}/{_CONTROLLER}/rollout-state"


def reply_topic(fleet: str, request_id: str) -> str:
    """Where the controller answers a request (the only reply topics it publishes to)."""
    return f"{ROOT}/{fleet}/_host/rollout-reply/{request_id}"


def deployment_id(rollout_id: int, token: str, *, back: bool = False,
                  shadow: bool = False) -> str:
    """The deployment id of a rollout's desired documents (``-back`` for its rollback,
    ``-shadow`` for its shadow stage)."""
    return f"r{rollout_id}-{token}" + ("-back" if back else "-shadow" if shadow else "")


def rollout_of_deployment(deployment: object) -> int | None:
    """The rollout id a deployment id belongs to, or None when it is not a rollout's."""
    if not isinstance(deployment, str):
        return None
    match = _DEPLOYMENT_RE.match(deployment)
    return int(match.group(1)) if match else None


def make_presence(controller_id: str, fleets: list[str], started: float) -> PresencePayload:
    return PresencePayload(id=controller_id, fleets=list(fleets), started=started,
                           ts=time.time())


def parse_presence(data: bytes) -> PresencePayload:
    """Raises: ProtocolError: not a presence payload."""
    return decode(data, PresencePayload)


def serves_fleet(presence: PresencePayload, fleet: str) -> bool:
    return "+" in presence.fleets or fleet in presence.fleets


def make_rollout_request(fleet: str, request_id: str, *, name: str, version: str,
                         sha256: str | None = None, devices: list[str] | None = None,
                         plan: dict[str, Any] | None = None, action: str = "rollout",
                         rollout_id: int | None = None,
                         issued: float | None = None) -> RolloutRequest:
    """A request to the fleet's controller, checked as the controller checks it: a rollout
    of the registered ``name:version``, or (``action``) the abort or the roll back of the
    fleet's rollout ``rollout_id``, which is of ``name:version``.

    Raises:
        ProtocolError: a field is invalid.
    """
    request = RolloutRequest(schema=ROLLOUT_REQUEST_SCHEMA, request_id=request_id,
                             reply_to=reply_topic(fleet, request_id), fleet=fleet,
                             issued=time.time() if issued is None else issued, name=name,
                             version=version, sha256=sha256, devices=devices, plan=plan or {},
                             action=action)
    if rollout_id is not None:
        request["rollout_id"] = rollout_id
    return parse_rollout_request(json.dumps(request).encode())


def sign_request(request: RolloutRequest, key: Ed25519PrivateKey) -> bytes:
    """The payload to publish for ``request``: signed by an operator key."""
    return seal(encode(request), key)


def open_rollout_request(data: bytes, trusted: Sequence[Ed25519PublicKey], fleet: str, *,
                         now: float | None = None) -> RolloutRequest:
    """Verify a signed rollout request received on ``fleet``'s request topic, then parse it.

    Raises:
        SignatureError: unsigned, not signed by a trusted operator key, or altered.
        ProtocolError: a signed request that is invalid, for another fleet, or expired.
    """
    if not trusted:
        raise SignatureError("the controller trusts no operator key, so it takes no remote"
                             " requests", hint="set controller.operator_keys")
    if not is_sealed(data):
        raise SignatureError("the rollout request is not signed",
                             hint="send it with `edgekit deploy --key OPERATOR_KEY`")
    opened = open_sealed(data, trusted, what="rollout request")
    request = parse_rollout_request(opened.payload)
    if request["fleet"] != fleet:
        raise ProtocolError(f"the request is signed for fleet {request['fleet']!r}, and came"
                            f" on the topic of {fleet!r}")
    age = (time.time() if now is None else now) - request["issued"]
    if not -_MAX_SKEW_S <= age <= REQUEST_TTL_S:
        raise ProtocolError(f"the request was issued {age:.0f} s ago, outside"
                            f" -{_MAX_SKEW_S:g}..{REQUEST_TTL_S:g} s: stale or replayed",
                            hint="send a new request (and check the clocks)")
    return request


def peek_reply_to(data: bytes) -> tuple[str, str] | None:
    """(request id, reply topic) of a request that failed its checks, to answer it with an
    error: only a reply topic of the controller's own pattern, never one of the sender's
    choice elsewhere in the tree."""
    if len(data) > DEFAULT_MAX_BYTES:
        return None
    try:
        doc = json.loads(data)
        if isinstance(doc, dict) and doc.get("schema") == "edgekit.signed/1":
            doc = json.loads(base64.b64decode(str(doc.get("payload")), validate=True))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    request_id, reply = doc.get("request_id"), doc.get("reply_to")
    if isinstance(request_id, str) and isinstance(reply, str) and \
            _REQUEST_ID_RE.match(request_id) and _REPLY_RE.match(reply) and \
            reply.endswith("/" + request_id):
        return request_id, reply
    return None


def parse_rollout_request(data: bytes) -> RolloutRequest:
    """Check a rollout request (the signed payload).

    Raises:
        ProtocolError: not JSON, another schema, or a field missing or of the wrong type;
            the message names the field.
    """
    doc = _decode(data, ROLLOUT_REQUEST_SCHEMA)
    for key in ("request_id", "reply_to", "fleet", "name", "version"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise ProtocolError(f"rollout request: {key} must be a non-empty string")
    if not _REQUEST_ID_RE.match(doc["request_id"]):
        raise ProtocolError("rollout request: request_id must be 8 to 64 lowercase hex digits")
    if not is_valid_id(doc["fleet"]) or doc["reply_to"] != reply_topic(doc["fleet"],
                                                                       doc["request_id"]):
        raise ProtocolError("rollout request: reply_to must be"
                            " edgekit/v1/<fleet>/_host/rollout-reply/<request_id>")
    if len(doc["name"]) > 256 or len(doc["version"]) > 64:
        raise ProtocolError("rollout request: name or version is too long")
    issued = doc.get("issued")
    if not isinstance(issued, int | float) or isinstance(issued, bool) or issued != issued:
        raise ProtocolError("rollout request: issued must be a Unix time")
    if "package" in doc:
        raise ProtocolError("rollout request: package is not accepted; a request names a"
                            " registered model (name, version)",
                            hint="push the package with `edgekit registry push` first")
    request = RolloutRequest(schema=ROLLOUT_REQUEST_SCHEMA, request_id=doc["request_id"],
                             reply_to=doc["reply_to"], fleet=doc["fleet"], issued=float(issued),
                             name=doc["name"], version=doc["version"])
    sha = doc.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA256_RE.match(sha)):
        raise ProtocolError("rollout request: sha256 must be 64 lowercase hex digits or null")
    request["sha256"] = sha
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
    if action != "rollout":
        rollout_id = doc.get("rollout_id")
        if not isinstance(rollout_id, int) or isinstance(rollout_id, bool) or rollout_id < 1:
            raise ProtocolError(f"rollout request: {action} needs rollout_id, a positive"
                                " integer")
        request["rollout_id"] = rollout_id
    return request


_MAX_REQUEST_BYTES = 256 * 1024


def _decode(data: bytes, schema: str) -> dict[str, Any]:
    if len(data) > _MAX_REQUEST_BYTES:
        raise ProtocolError(f"payload is {len(data)} bytes, over the limit of"
                            f" {_MAX_REQUEST_BYTES}")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ProtocolError(f"payload is a JSON {type(doc).__name__}, expected an object")
    if doc.get("schema") != schema:
        raise ProtocolError(f"payload schema is {doc.get('schema')!r}, expected {schema!r}")
    return doc
