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
from typing import Annotated, Any, ClassVar, Literal, cast

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from msgspec import Meta

from edgekit.errors import ProtocolError, SignatureError
from edgekit.protocol import ROOT, encode
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
    "RolloutAction",
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


RolloutAction = Literal["rollout", "abort", "rollback"]


class RolloutRequest(Document, tag=ROLLOUT_REQUEST_SCHEMA):
    """A request to a fleet's controller (the payload of an operator's signed envelope).

    Decoding (:func:`parse_rollout_request`) checks every field and the rules across them:
    ``reply_to`` is ``reply_topic(fleet, request_id)``, and an abort or a rollback names its
    ``rollout_id``.
    """

    max_bytes: ClassVar[int] = 256 * 1024
    request_id: Annotated[str, Meta(pattern=_REQUEST_ID_RE.pattern)]
    reply_to: Annotated[str, Meta(max_length=256)]  # edgekit/v1/<fleet>/_host/rollout-reply/<id>
    fleet: Annotated[str, Meta(pattern=ID_PATTERN)]  # signed: cannot be moved to another fleet
    issued: Annotated[float, Meta(ge=0, le=1e11)]  # Unix time; refused past REQUEST_TTL_S
    name: Annotated[str, Meta(min_length=1, max_length=256)]  # a registered model's name
    version: Annotated[str, Meta(min_length=1, max_length=64)]
    sha256: Annotated[str, Meta(pattern=_SHA256_RE.pattern)] | None = None  # must match
    devices: list[Annotated[str, Meta(pattern=ID_PATTERN)]] | None = None  # None: the fleet
    plan: dict[str, Any] | None = None  # overrides of [rollout] keys, e.g. {"canary": "50%"}
    action: RolloutAction = "rollout"
    rollout_id: Annotated[int, Meta(ge=1)] | None = None  # abort, rollback: the rollout


class _Refused(msgspec.Struct):
    """Keys a request may not carry (a file path instead of a registered model)."""

    package: Any = msgspec.UNSET


# What each field of a rollout request must be, for the error that names it.
_REQUEST_RULES = {
    "request_id": "request_id must be 8 to 64 lowercase hex digits",
    "reply_to": "reply_to must be edgekit/v1/<fleet>/_host/rollout-reply/<request_id>",
    "fleet": "fleet must be a fleet id (letters, digits, _ . -; at most 64)",
    "issued": "issued must be a Unix time (a finite number of seconds)",
    "name": "name must be a non-empty string of at most 256 characters",
    "version": "version must be a non-empty string of at most 64 characters",
    "sha256": "sha256 must be 64 lowercase hex digits or null",
    "devices": "devices must be a list of device ids or null",
    "plan": "plan must be an object",
    "action": f"action must be one of {', '.join(ROLLOUT_ACTIONS)}",
    "rollout_id": "rollout_id must be a positive integer",
}
_FIELD_RE = re.compile(r"`\$\.([a-z_0-9]+)|field `([a-z_0-9]+)`")


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
        ProtocolError: a field is invalid; the message names it.
    """
    request = RolloutRequest(request_id=request_id, reply_to=reply_topic(fleet, request_id),
                             fleet=fleet, issued=time.time() if issued is None else issued,
                             name=name, version=version, sha256=sha256, devices=devices,
                             plan=plan or None, action=cast(RolloutAction, action),
                             rollout_id=rollout_id)
    return parse_rollout_request(encode(request))


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
    if request.fleet != fleet:
        raise ProtocolError(f"the request is signed for fleet {request.fleet!r}, and came"
                            f" on the topic of {fleet!r}")
    age = (time.time() if now is None else now) - request.issued
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
    """Decode and check a rollout request (the signed payload).

    Raises:
        ProtocolError: over 256 KiB, not JSON, another schema, a field missing, of the
            wrong type or out of range, a ``package`` key, a ``reply_to`` other than the
            request's own reply topic, or an abort or rollback without ``rollout_id``; the
            message names the field.
    """
    try:
        request = decode(data, RolloutRequest)
    except ProtocolError as exc:
        raise _named(exc) from None
    if msgspec.json.decode(data, type=_Refused).package is not msgspec.UNSET:
        raise ProtocolError("rollout request: package is not accepted; a request names a"
                            " registered model (name, version)",
                            hint="push the package with `edgekit registry push` first")
    if request.reply_to != reply_topic(request.fleet, request.request_id):
        raise ProtocolError(f"rollout request: {_REQUEST_RULES['reply_to']}")
    if request.action != "rollout" and request.rollout_id is None:
        raise ProtocolError(f"rollout request: {request.action} needs rollout_id, a positive"
                            " integer")
    return request


def _named(exc: ProtocolError) -> ProtocolError:
    """``exc`` (from decoding a request) with the rule of the field it names up front."""
    match = _FIELD_RE.search(exc.message)
    rule = _REQUEST_RULES.get(match.group(1) or match.group(2)) if match else None
    message = f"rollout request: {rule} ({exc.message})" if rule else \
        f"rollout request: {exc.message}"
    return ProtocolError(message, hint=exc.hint)
