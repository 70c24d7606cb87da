"""The desired-model document: what the host wants a fleet, or one device, to run.

Published retained on :func:`edgekit.protocol.ota.topics.desired_topic`, once per fleet and optionally
per device; the device's own document wins over the fleet's. An empty retained payload clears
a level (MQTT's way to delete a retained message), so a device goes back to following its
fleet's document. Example::

    {"schema": "edgekit.desired/2",
     "deployment": "d20260131T120000-3f2a1c",
     "issued": "2026-01-31T12:00:00Z",
     "expires": "2026-02-07T12:00:00Z",
     "fleet": "f1",
     "devices": null,
     "model": {"name": "digits", "version": "1.1.0", "sha256": "<64 hex>",
               "size": 48213, "key_id": "9f86d081884c7d65"},
     "sources": {"mqtt": {"request_topic": "edgekit/v1/f1/_artifacts/get/<sha256>"},
                 "url": null},
     "allow_breaking": false,
     "allow_downgrade": false,
     "allow_rename": false,
     "revert": false,
     "latency_budget_ms": null,
     "probation": {"requests": 20, "seconds": 30.0, "max_error_rate": 0.0,
                   "max_nonfinite_rate": 0.0, "max_latency_ms": null}}

The document travels signed by an operator (intent) key, in an
:mod:`edgekit.protocol.signed` envelope; :func:`seal_desired` makes one. The signature binds
everything here: the fleet and the devices it is for (null: every device of the fleet), the
deployment id, the model's name, version and sha256, the issue time (a device refuses a
document issued before the newest one it acted on: no replays) and the expiry (a device
refuses an expired document that would change its model).

``size`` is a hard cap: a device writes nothing past it. ``key_id`` is the release key that
must have signed the package (null: any key the device trusts for packages).
``allow_downgrade`` lets a device go to a version not newer than the highest it committed
(its floor), ``allow_rename`` lets it change to a model of another name; neither is ever
implied. ``model.sha256`` and ``size`` are null only in a downgrade to the copy the device
keeps on disk. ``revert: true`` (a rollout's way back) means: a device serving exactly
``model`` goes back to the model it ran before it (its own record, never a version someone
else names); a device not serving it does nothing. Unknown keys are ignored, so minor
additions stay readable by older devices.

Each object is a msgspec Struct (:class:`DesiredDocument` and the objects it holds); the
same classes encode the document on the host and decode it on the device. Every field is
encoded, null included, except ``sources.mqtt.chunk_size``, ``sources.deltas`` and
``transfer``, which are left out when unset: the bytes stay those of the documents written
before they existed, so signatures over them do not change.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from msgspec import UNSET, Meta, UnsetType

from edgekit.errors import ProtocolError
from edgekit.manifest import parse_version
from edgekit.protocol import encode, parse_topic
from edgekit.protocol.codec import Document, decode
from edgekit.protocol.ota._time import format_time, parse_time
from edgekit.protocol.ota.shadow import SHADOW_DESIRED_SCHEMA, ShadowSpec
from edgekit.protocol.ota.topics import ARTIFACTS_SCOPE
from edgekit.protocol.ota.transfer import Transfer, check_transfer
from edgekit.protocol.signed import seal
from edgekit.protocol.topics import ID_PATTERN

__all__ = [
    "DEFAULT_PROBATION",
    "DESIRED_SCHEMA",
    "DESIRED_TTL_S",
    "DESIRED_VARIANTS",
    "MAX_ARTIFACT_BYTES",
    "ROLLBACK_TTL_S",
    "SHA256_PATTERN",
    "DeltaSource",
    "DesiredDocument",
    "DesiredModel",
    "MqttSource",
    "Probation",
    "ShadowDesiredDocument",
    "Sources",
    "encode_desired",
    "make_desired",
    "new_deployment_id",
    "parse_desired",
    "seal_desired",
]

DESIRED_SCHEMA = "edgekit.desired/2"
MAX_ARTIFACT_BYTES = 4 * 1024**3
DESIRED_TTL_S = 30 * 86400.0  # default life of a deploy's document (devices that join later)
ROLLBACK_TTL_S = 86400.0  # default life of a document that allows a downgrade
SHA256_PATTERN = "^[0-9a-f]{64}$"
_MAX_TTL_S = 400 * 86400.0
_MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
_MAX_DEVICES = 10_000
_MAX_DELTAS = 32

_Sha256 = Annotated[str, Meta(pattern=SHA256_PATTERN)]
_Size = Annotated[int, Meta(ge=1, le=MAX_ARTIFACT_BYTES)]
_Id = Annotated[str, Meta(pattern=ID_PATTERN)]  # letters, digits, _ . -; at most 64
_Topic = Annotated[str, Meta(min_length=1, max_length=1024)]
_Url = Annotated[str, Meta(min_length=1, max_length=4096)]
_Time = Annotated[str, Meta(min_length=1, max_length=64)]
_Rate = Annotated[float, Meta(ge=0.0, le=1.0)]


class DesiredModel(msgspec.Struct, kw_only=True, frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    version: Annotated[str, Meta(min_length=1, max_length=64)]  # a dotted number
    sha256: _Sha256 | None  # of the .edgepkg file
    size: _Size | None  # bytes of the .edgepkg file; a hard cap on the download
    # the signer the package must have, or None
    key_id: Annotated[str, Meta(pattern="^[0-9a-f]{16}$")] | None = None


class MqttSource(msgspec.Struct, kw_only=True, frozen=True):
    request_topic: _Topic  # where chunk requests go (edgekit.protocol.ota.chunks)
    # a suggestion; servers cap it (left out of the document when unset)
    chunk_size: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] | UnsetType = UNSET


class DeltaSource(msgspec.Struct, kw_only=True, frozen=True):
    """A delta (:mod:`edgekit.protocol.ota.delta`) that rebuilds the model from a package a
    device may keep; fetched like the package, by its own sha256."""

    base_sha256: _Sha256  # the .edgepkg the delta starts from
    sha256: _Sha256  # of the delta file
    size: _Size  # bytes of the delta file; a hard cap on its download
    request_topic: _Topic | None = None  # where chunk requests for it go
    url: _Url | None = None  # http(s) URL of the delta file


class Sources(msgspec.Struct, kw_only=True, frozen=True):
    mqtt: MqttSource | None = None
    url: _Url | None = None  # http(s) URL of the .edgepkg, fetched with Range requests
    # smaller ways to the same file, by base (left out of the document when unset)
    deltas: Annotated[list[DeltaSource], Meta(max_length=_MAX_DELTAS)] | None | UnsetType = \
        UNSET


class Probation(msgspec.Struct, kw_only=True, frozen=True):
    """How a newly activated model is watched before it is committed.

    Probation passes after ``requests`` answered requests or ``seconds`` of serving, whichever
    comes first (0 turns either off; both 0: no probation). It fails, and the device rolls
    back, as soon as the share of failed requests exceeds ``max_error_rate``, the share of
    requests with NaN or infinite outputs exceeds ``max_nonfinite_rate``, or the 95th
    percentile latency exceeds ``max_latency_ms`` (null: not checked).
    """

    requests: Annotated[int, Meta(ge=0, le=10_000_000)] = 20
    seconds: Annotated[float, Meta(ge=0.0, le=30 * 86400.0)] = 30.0
    max_error_rate: _Rate = 0.0
    max_nonfinite_rate: _Rate = 0.0
    max_latency_ms: Annotated[float, Meta(ge=0.0)] | None = None


DEFAULT_PROBATION = Probation()


# msgspec lets a frozen Struct subclass the (unfrozen) Document base; mypy applies the
# dataclass rule that forbids it, hence the ignores on these class lines.
class DesiredDocument(Document, tag=DESIRED_SCHEMA,  # type: ignore[misc]
                      frozen=True, omit_defaults=False):
    """The desired document; :class:`ShadowDesiredDocument` is its shadow-evaluation form.

    Decoding (:func:`parse_desired`) also checks the rules across fields (times, the kept
    copy, sources, the window); every error names the field, e.g. ``desired.model.size``.
    """

    max_bytes: ClassVar[int] = _MAX_DOCUMENT_BYTES
    deployment: _Id  # an id, new for every deploy or rollback
    issued: _Time  # ISO 8601, UTC; devices refuse documents older than the last one acted on
    expires: _Time  # ISO 8601, UTC; devices refuse an expired document that changes the model
    fleet: _Id  # the fleet it is for
    # the devices it is for; None: every device of the fleet
    devices: Annotated[list[_Id], Meta(max_length=_MAX_DEVICES)] | None
    model: DesiredModel
    sources: Sources
    allow_breaking: bool = False  # accept changed inputs/outputs the manifest marks as such
    allow_downgrade: bool = False  # a version not newer than the device's floor may install
    allow_rename: bool = False  # a model of another name than the device's floor may install
    revert: bool = False  # devices serving ``model`` go back to their own previous model
    # staging: mean latency on the golden samples, or None
    latency_budget_ms: Annotated[float, Meta(ge=0.0)] | None = None
    probation: Probation = msgspec.field(default_factory=Probation)
    # thin links: rate cap and maintenance window (left out of the document when unset)
    transfer: Transfer | None | UnsetType = UNSET


class ShadowDesiredDocument(DesiredDocument,  # type: ignore[misc]
                            tag=SHADOW_DESIRED_SCHEMA, kw_only=True, frozen=True):
    """A desired document that asks for a shadow evaluation instead of an activation."""

    shadow: ShadowSpec


# Documents that arrive on the desired topics besides DesiredDocument (their schema picks).
DESIRED_VARIANTS: tuple[type[DesiredDocument], ...] = (ShadowDesiredDocument,)


def new_deployment_id(now: dt.datetime | None = None) -> str:
    """A fresh deployment id, e.g. ``d20260131T120000-3f2a1c`` (time first, so ids sort)."""
    moment = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return f"d{moment.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def make_desired(*, deployment: str, fleet: str, name: str, version: str, sha256: str | None,
                 size: int | None, devices: list[str] | None = None,
                 key_id: str | None = None, request_topic: str | None = None,
                 url: str | None = None, deltas: list[DeltaSource] | None = None,
                 allow_breaking: bool = False,
                 allow_downgrade: bool = False, allow_rename: bool = False,
                 revert: bool = False, probation: Probation | None = None,
                 latency_budget_ms: float | None = None, issued: dt.datetime | None = None,
                 ttl_s: float | None = None, transfer: Transfer | None = None,
                 shadow: ShadowSpec | None = None) -> DesiredDocument:
    """Build a desired document and validate it as a device would.

    ``ttl_s`` is how long it stays valid (default: :data:`ROLLBACK_TTL_S` for a document that
    allows a downgrade or reverts, else :data:`DESIRED_TTL_S`). ``transfer`` (thin links:
    :mod:`edgekit.protocol.ota.transfer`) is left out of the document when None; ``shadow``
    (:mod:`edgekit.protocol.ota.shadow`) makes it a :class:`ShadowDesiredDocument`, of schema
    :data:`~edgekit.protocol.ota.shadow.SHADOW_DESIRED_SCHEMA`.

    Raises:
        ProtocolError: a field is invalid; the message names it.
    """
    moment = (issued or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).replace(microsecond=0)
    if ttl_s is None:
        ttl_s = ROLLBACK_TTL_S if (allow_downgrade or revert) else DESIRED_TTL_S
    fields: dict[str, Any] = {
        "deployment": deployment,
        "issued": format_time(moment),
        "expires": format_time(moment + dt.timedelta(seconds=ttl_s)),
        "fleet": fleet,
        "devices": sorted(set(devices)) if devices is not None else None,
        "model": DesiredModel(name=name, version=version, sha256=sha256, size=size,
                              key_id=key_id),
        "sources": Sources(mqtt=MqttSource(request_topic=request_topic) if request_topic
                           else None, url=url, deltas=list(deltas) if deltas else UNSET),
        "allow_breaking": allow_breaking,
        "allow_downgrade": allow_downgrade,
        "allow_rename": allow_rename,
        "revert": revert,
        "latency_budget_ms": latency_budget_ms,
        "probation": probation or DEFAULT_PROBATION,
        "transfer": UNSET if transfer is None else transfer,
    }
    doc = DesiredDocument(**fields) if shadow is None else \
        ShadowDesiredDocument(**fields, shadow=shadow)
    return parse_desired(encode(doc))


def encode_desired(doc: DesiredDocument) -> bytes:
    """The JSON bytes of a desired document (what the envelope's signature covers)."""
    return encode(doc)


def seal_desired(doc: DesiredDocument, key: Ed25519PrivateKey) -> bytes:
    """The retained payload of a desired document: signed by ``key`` (an operator key the
    devices trust for intents) in an :mod:`edgekit.protocol.signed` envelope."""
    return seal(encode_desired(doc), key)


def parse_desired(data: bytes | str | Mapping[str, Any]) -> DesiredDocument:
    """Decode and check a desired document (or a shadow one); absent optional fields get
    their defaults (probation, the ``allow_*`` flags).

    This reads the inner document only: a device checks the envelope's signature first. A
    mapping (a document already parsed as JSON) is encoded and decoded like the bytes.

    Raises:
        ProtocolError: over 4 MiB, not JSON, another schema, or a field that is missing,
            of the wrong type, out of range or against the rules across fields; the message
            names the field, e.g. ``desired.model.size``.
    """
    if isinstance(data, Mapping):
        try:
            data = encode(data)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"desired: not a JSON document: {exc}") from None
    doc = decode(data, DesiredDocument, where="desired", variants=DESIRED_VARIANTS)
    _check_times(doc)
    _check_model(doc)
    _check_sources(doc.sources, need_one=doc.model.sha256 is not None and not doc.revert)
    if doc.transfer:
        check_transfer(doc.transfer)
    if isinstance(doc, ShadowDesiredDocument) and doc.revert:
        raise ProtocolError("desired.revert: a shadow evaluation never changes the model in"
                            " service, so it cannot revert one")
    return doc


def _check_times(doc: DesiredDocument) -> None:
    life = (parse_time(doc.expires, "desired.expires")
            - parse_time(doc.issued, "desired.issued")).total_seconds()
    if not 0 < life <= _MAX_TTL_S:
        raise ProtocolError(f"desired.expires: {doc.expires} must be after desired.issued and"
                            f" within {_MAX_TTL_S / 86400:g} days of it")


def _check_model(doc: DesiredDocument) -> None:
    where, model = "desired.model", doc.model
    try:
        parse_version(model.version)
    except Exception as exc:
        raise ProtocolError(f"{where}.version: {model.version!r} is not a dotted number"
                            ) from exc
    if model.sha256 is None and not (doc.allow_downgrade and not doc.revert):
        raise ProtocolError(f"{where}.sha256: null is allowed only in a downgrade to a kept"
                            " copy (allow_downgrade)", hint="name the package's sha256")
    if (model.sha256 is None) != (model.size is None):
        raise ProtocolError(f"{where}.size: must be null exactly when {where}.sha256 is null")
    if doc.revert and model.sha256 is None:
        raise ProtocolError(f"{where}.sha256: a revert names the package it leaves")


def _check_sources(sources: Sources, *, need_one: bool) -> None:
    where = "desired.sources"
    if sources.mqtt is not None:
        _check_topic(sources.mqtt.request_topic, f"{where}.mqtt.request_topic")
    if sources.url is not None:
        _check_url(sources.url, f"{where}.url")
    if need_one and sources.mqtt is None and sources.url is None:
        raise ProtocolError(f"{where}: names neither mqtt nor url, so the artifact cannot be had",
                            hint="give sources.mqtt.request_topic or sources.url")
    for i, delta in enumerate(sources.deltas or []):
        at = f"{where}.deltas[{i}]"
        if delta.request_topic is not None:
            _check_topic(delta.request_topic, f"{at}.request_topic")
        if delta.url is not None:
            _check_url(delta.url, f"{at}.url")
        if delta.request_topic is None and delta.url is None:
            raise ProtocolError(f"{at}: names neither request_topic nor url")


def _check_topic(topic: str, where: str) -> None:
    if any(c in topic for c in "+#\0") or topic.startswith("$"):
        raise ProtocolError(f"{where}: {topic!r} is not a topic one can publish to"
                            " (wildcards, NUL or a leading '$')")
    parts = parse_topic(topic)
    if parts is not None and parts.device != ARTIFACTS_SCOPE:
        # Inside the tree only artifact topics: a request must not land on a device's
        # status, predict or other topic.
        raise ProtocolError(f"{where}: {topic!r} is a device topic; requests go to"
                            f" edgekit/v1/<fleet>/{ARTIFACTS_SCOPE}/...")


def _check_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProtocolError(f"{where}: {url!r} is not an http:// or https:// URL")
