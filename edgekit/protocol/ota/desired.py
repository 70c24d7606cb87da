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
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
from typing import Any, NotRequired, TypedDict
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import ProtocolError
from edgekit.manifest import parse_version
from edgekit.protocol import encode, is_valid_id, parse_topic
from edgekit.protocol.ota import _validate as v
from edgekit.protocol.ota._time import format_time, parse_time
from edgekit.protocol.ota.topics import ARTIFACTS_SCOPE
from edgekit.protocol.ota.transfer import Transfer, parse_transfer
from edgekit.protocol.signed import seal

__all__ = [
    "DEFAULT_PROBATION",
    "DESIRED_SCHEMA",
    "DESIRED_TTL_S",
    "MAX_ARTIFACT_BYTES",
    "ROLLBACK_TTL_S",
    "DesiredDocument",
    "DeltaSource",
    "DesiredModel",
    "MqttSource",
    "Probation",
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
_MAX_TTL_S = 400 * 86400.0
_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
_MAX_DEVICES = 10_000
_MAX_DELTAS = 32


class DesiredModel(TypedDict):
    name: str
    version: str
    sha256: str | None  # of the .edgepkg file
    size: int | None  # bytes of the .edgepkg file; a hard cap on the download
    key_id: str | None  # the signer the package must have, or None


class MqttSource(TypedDict):
    request_topic: str  # where chunk requests go (edgekit.protocol.ota.chunks)
    chunk_size: NotRequired[int]  # a suggestion; servers cap it


class DeltaSource(TypedDict):
    """A delta (:mod:`edgekit.protocol.ota.delta`) that rebuilds the model from a package a
    device may keep; fetched like the package, by its own sha256."""

    base_sha256: str  # the .edgepkg the delta starts from
    sha256: str  # of the delta file
    size: int  # bytes of the delta file; a hard cap on its download
    request_topic: str | None  # where chunk requests for it go
    url: str | None  # http(s) URL of the delta file


class Sources(TypedDict):
    mqtt: MqttSource | None
    url: str | None  # http(s) URL of the .edgepkg, fetched with Range requests
    deltas: NotRequired[list[DeltaSource]]  # smaller ways to the same file, by base


class Probation(TypedDict):
    """How a newly activated model is watched before it is committed.

    Probation passes after ``requests`` answered requests or ``seconds`` of serving, whichever
    comes first (0 turns either off; both 0: no probation). It fails, and the device rolls
    back, as soon as the share of failed requests exceeds ``max_error_rate``, the share of
    requests with NaN or infinite outputs exceeds ``max_nonfinite_rate``, or the 95th
    percentile latency exceeds ``max_latency_ms`` (null: not checked).
    """

    requests: int
    seconds: float
    max_error_rate: float
    max_nonfinite_rate: float
    max_latency_ms: float | None


DEFAULT_PROBATION = Probation(requests=20, seconds=30.0, max_error_rate=0.0,
                              max_nonfinite_rate=0.0, max_latency_ms=None)


class DesiredDocument(TypedDict):
    schema: str
    deployment: str  # an id, new for every deploy or rollback
    issued: str  # ISO 8601, UTC; devices refuse documents older than the last one acted on
    expires: str  # ISO 8601, UTC; devices refuse an expired document that changes the model
    fleet: str  # the fleet it is for
    devices: list[str] | None  # the devices it is for; None: every device of the fleet
    model: DesiredModel
    sources: Sources
    allow_breaking: bool  # accept changed inputs/outputs when the manifest marks the change
    allow_downgrade: bool  # a version not newer than the device's floor may install
    allow_rename: bool  # a model of another name than the device's floor may install
    revert: bool  # devices serving ``model`` go back to their own previous model
    latency_budget_ms: float | None  # staging: mean latency on the golden samples, or None
    probation: Probation
    transfer: NotRequired[Transfer]  # thin links: rate cap and maintenance window


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
                 ttl_s: float | None = None, transfer: Transfer | None = None
                 ) -> DesiredDocument:
    """Build a desired document and validate it as a device would.

    ``ttl_s`` is how long it stays valid (default: :data:`ROLLBACK_TTL_S` for a document that
    allows a downgrade or reverts, else :data:`DESIRED_TTL_S`). ``transfer`` (thin links:
    :mod:`edgekit.protocol.ota.transfer`) is left out of the document when None.

    Raises:
        ProtocolError: a field is invalid; the message names it.
    """
    moment = (issued or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).replace(microsecond=0)
    if ttl_s is None:
        ttl_s = ROLLBACK_TTL_S if (allow_downgrade or revert) else DESIRED_TTL_S
    doc = {
        "schema": DESIRED_SCHEMA,
        "deployment": deployment,
        "issued": format_time(moment),
        "expires": format_time(moment + dt.timedelta(seconds=ttl_s)),
        "fleet": fleet,
        "devices": sorted(set(devices)) if devices is not None else None,
        "model": {"name": name, "version": version, "sha256": sha256, "size": size,
                  "key_id": key_id},
        "sources": {"mqtt": {"request_topic": request_topic} if request_topic else None,
                    "url": url, **({"deltas": list(deltas)} if deltas else {})},
        "allow_breaking": allow_breaking,
        "allow_downgrade": allow_downgrade,
        "allow_rename": allow_rename,
        "revert": revert,
        "latency_budget_ms": latency_budget_ms,
        "probation": dict(probation or DEFAULT_PROBATION),
    }
    if transfer is not None:
        doc["transfer"] = dict(transfer)
    return parse_desired(doc)


def encode_desired(doc: DesiredDocument) -> bytes:
    """The JSON bytes of a desired document (what the envelope's signature covers)."""
    return encode(doc)


def seal_desired(doc: DesiredDocument, key: Ed25519PrivateKey) -> bytes:
    """The retained payload of a desired document: signed by ``key`` (an operator key the
    devices trust for intents) in an :mod:`edgekit.protocol.signed` envelope."""
    return seal(encode_desired(doc), key)


def parse_desired(data: bytes | str | dict[str, Any]) -> DesiredDocument:
    """Parse and validate a desired document; fill defaults (probation, optional keys).

    This reads the inner document only: a device checks the envelope's signature first.

    Raises:
        ProtocolError: not JSON, not an object, another schema, or a field that is missing or
            wrong; the message names the key, e.g. ``desired.model.size``.
    """
    if isinstance(data, dict):
        raw: Any = data
    else:
        if len(data) > _MAX_DOCUMENT_BYTES:
            raise ProtocolError(f"desired document is {len(data)} bytes, over the limit of"
                                f" {_MAX_DOCUMENT_BYTES}")
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"desired document is not valid JSON: {exc}",
                                hint="publish the output of `edgekit deploy`") from exc
    doc = v.obj(raw, "desired")
    if doc.get("schema") != DESIRED_SCHEMA:
        raise ProtocolError(f"desired.schema: expected {DESIRED_SCHEMA!r},"
                            f" found {doc.get('schema')!r}",
                            hint=f"this device understands {DESIRED_SCHEMA} documents")
    deployment = _id(doc, "deployment")
    fleet = _id(doc, "fleet")
    devices = v.strings(doc, "devices", "desired", nullable=True, max_items=_MAX_DEVICES)
    if devices is not None and not all(is_valid_id(d) for d in devices):
        raise ProtocolError("desired.devices: every entry must be a valid device id")
    issued = v.text(doc, "issued", "desired", max_len=64)
    expires = v.text(doc, "expires", "desired", max_len=64)
    life = (parse_time(expires, "desired.expires")
            - parse_time(issued, "desired.issued")).total_seconds()
    if not 0 < life <= _MAX_TTL_S:
        raise ProtocolError(f"desired.expires: {expires} must be after desired.issued and"
                            f" within {_MAX_TTL_S / 86400:g} days of it")
    allow_downgrade = v.boolean(doc, "allow_downgrade", "desired", default=False)
    revert = v.boolean(doc, "revert", "desired", default=False)
    model = _model(v.obj(v.field(doc, "model", "desired"), "desired.model"),
                   kept_ok=allow_downgrade and not revert)
    if revert and model["sha256"] is None:
        raise ProtocolError("desired.model.sha256: a revert names the package it leaves")
    sources = _sources(v.obj(v.field(doc, "sources", "desired"), "desired.sources"),
                       need_one=model["sha256"] is not None and not revert)
    parsed = DesiredDocument(
        schema=DESIRED_SCHEMA,
        deployment=deployment,
        issued=issued,
        expires=expires,
        fleet=fleet,
        devices=devices,
        model=model,
        sources=sources,
        allow_breaking=v.boolean(doc, "allow_breaking", "desired", default=False),
        allow_downgrade=allow_downgrade,
        allow_rename=v.boolean(doc, "allow_rename", "desired", default=False),
        revert=revert,
        latency_budget_ms=v.number(doc, "latency_budget_ms", "desired", default=None,
                                   nullable=True, low=0.0),
        probation=_probation(doc.get("probation")),
    )
    transfer = parse_transfer(doc.get("transfer"))
    if transfer is not None:
        parsed["transfer"] = transfer
    return parsed


def _id(doc: dict[str, Any], key: str) -> str:
    value: str = v.text(doc, key, "desired", max_len=64)
    if not is_valid_id(value):
        raise ProtocolError(f"desired.{key}: {value!r} is not a valid id",
                            hint="use letters, digits, '_', '.' or '-'")
    return value


def _model(doc: dict[str, Any], *, kept_ok: bool) -> DesiredModel:
    where = "desired.model"
    name = v.text(doc, "name", where, max_len=256)
    version = v.text(doc, "version", where, max_len=64)
    try:
        parse_version(version)
    except Exception as exc:
        raise ProtocolError(f"{where}.version: {version!r} is not a dotted number") from exc
    sha = v.sha256(doc, "sha256", where, nullable=True)
    size = v.integer(doc, "size", where, low=1, high=MAX_ARTIFACT_BYTES, nullable=True)
    if sha is None and not kept_ok:
        raise ProtocolError(f"{where}.sha256: null is allowed only in a downgrade to a kept"
                            " copy (allow_downgrade)", hint="name the package's sha256")
    if (sha is None) != (size is None):
        raise ProtocolError(f"{where}.size: must be null exactly when {where}.sha256 is null")
    key_id = v.text(doc, "key_id", where, default=None, nullable=True, max_len=16)
    if key_id is not None and not _KEY_ID_RE.match(key_id):
        raise ProtocolError(f"{where}.key_id: expected 16 lowercase hex digits, found {key_id!r}")
    return DesiredModel(name=name, version=version, sha256=sha, size=size, key_id=key_id)


def _sources(doc: dict[str, Any], *, need_one: bool) -> Sources:
    where = "desired.sources"
    mqtt_doc = doc.get("mqtt")
    mqtt: MqttSource | None = None
    if mqtt_doc is not None:
        m = v.obj(mqtt_doc, f"{where}.mqtt")
        mqtt = MqttSource(request_topic=_request_topic(m, f"{where}.mqtt"))
        chunk = v.integer(m, "chunk_size", f"{where}.mqtt", low=1024, high=16 * 1024 * 1024,
                          default=None)
        if chunk is not None:
            mqtt["chunk_size"] = chunk
    url = _url(doc, where)
    if need_one and mqtt is None and url is None:
        raise ProtocolError(f"{where}: names neither mqtt nor url, so the artifact cannot be had",
                            hint="give sources.mqtt.request_topic or sources.url")
    sources = Sources(mqtt=mqtt, url=url)
    if doc.get("deltas") is not None:
        sources["deltas"] = _deltas(doc["deltas"], f"{where}.deltas")
    return sources


def _request_topic(doc: dict[str, Any], where: str) -> str:
    request_topic: str = v.text(doc, "request_topic", where, max_len=1024)
    if any(c in request_topic for c in "+#\0") or request_topic.startswith("$"):
        raise ProtocolError(f"{where}.request_topic: {request_topic!r} is not a topic"
                            " one can publish to (wildcards, NUL or a leading '$')")
    parts = parse_topic(request_topic)
    if parts is not None and parts.device != ARTIFACTS_SCOPE:
        # Inside the tree only artifact topics: a request must not land on a device's
        # status, predict or other topic.
        raise ProtocolError(f"{where}.request_topic: {request_topic!r} is a device"
                            f" topic; requests go to edgekit/v1/<fleet>/{ARTIFACTS_SCOPE}/...")
    return request_topic


def _url(doc: dict[str, Any], where: str) -> str | None:
    url: str | None = v.text(doc, "url", where, default=None, nullable=True, max_len=4096)
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ProtocolError(f"{where}.url: {url!r} is not an http:// or https:// URL")
    return url


def _deltas(value: Any, where: str) -> list[DeltaSource]:
    if not isinstance(value, list) or len(value) > _MAX_DELTAS:
        raise ProtocolError(f"{where}: expected a list of at most {_MAX_DELTAS} deltas")
    out: list[DeltaSource] = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        d = v.obj(item, at)
        topic = _request_topic(d, at) if d.get("request_topic") is not None else None
        url = _url(d, at)
        if topic is None and url is None:
            raise ProtocolError(f"{at}: names neither request_topic nor url")
        out.append(DeltaSource(base_sha256=v.sha256(d, "base_sha256", at),
                               sha256=v.sha256(d, "sha256", at),
                               size=v.integer(d, "size", at, low=1, high=MAX_ARTIFACT_BYTES),
                               request_topic=topic, url=url))
    return out


def _probation(value: Any) -> Probation:
    if value is None:
        return Probation(**DEFAULT_PROBATION)
    where = "desired.probation"
    doc = v.obj(value, where)
    d = DEFAULT_PROBATION
    return Probation(
        requests=v.integer(doc, "requests", where, high=10_000_000, default=d["requests"]),
        seconds=v.number(doc, "seconds", where, high=30 * 86400.0, default=d["seconds"]),
        max_error_rate=v.number(doc, "max_error_rate", where, high=1.0,
                                default=d["max_error_rate"]),
        max_nonfinite_rate=v.number(doc, "max_nonfinite_rate", where, high=1.0,
                                    default=d["max_nonfinite_rate"]),
        max_latency_ms=v.number(doc, "max_latency_ms", where, default=d["max_latency_ms"],
                                nullable=True),
    )
