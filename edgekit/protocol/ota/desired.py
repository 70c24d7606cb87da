"""The desired-model document: what the host wants a fleet, or one device, to run.

Published retained on :func:`edgekit.protocol.ota.topics.desired_topic`, once per fleet and optionally
per device; the device's own document wins over the fleet's. An empty retained payload clears
a level (MQTT's way to delete a retained message), so a device goes back to following its
fleet's document. Example::

    {"schema": "edgekit.desired/1",
     "deployment": "d20260131T120000-3f2a1c",
     "issued": "2026-01-31T12:00:00Z",
     "model": {"name": "digits", "version": "1.1.0", "sha256": "<64 hex>",
               "size": 48213, "key_id": "9f86d081884c7d65"},
     "sources": {"mqtt": {"request_topic": "edgekit/v1/f1/_artifacts/get/<sha256>"},
                 "url": null},
     "allow_breaking": false,
     "rollback": null,
     "latency_budget_ms": null,
     "probation": {"requests": 20, "seconds": 30.0, "max_error_rate": 0.0,
                   "max_nonfinite_rate": 0.0, "max_latency_ms": null}}

``size`` is a hard cap: a device writes nothing past it. ``key_id`` is the key that must
have signed the package (null: any key the device trusts, or unsigned where the device
allows it). ``model.sha256`` and ``size`` are null only in a rollback to the copy the device
keeps on disk. Unknown keys are ignored, so minor additions stay readable by older devices.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
from typing import Any, NotRequired, TypedDict
from urllib.parse import urlsplit

from edgekit.errors import ProtocolError
from edgekit.manifest import parse_version
from edgekit.protocol import encode, is_valid_id, parse_topic
from edgekit.protocol.ota import _validate as v
from edgekit.protocol.ota._time import format_time, parse_time
from edgekit.protocol.ota.rollback import RollbackInstruction, parse_rollback
from edgekit.protocol.ota.topics import ARTIFACTS_SCOPE

__all__ = [
    "DEFAULT_PROBATION",
    "DESIRED_SCHEMA",
    "MAX_ARTIFACT_BYTES",
    "DesiredDocument",
    "DesiredModel",
    "MqttSource",
    "Probation",
    "Sources",
    "encode_desired",
    "make_desired",
    "new_deployment_id",
    "parse_desired",
]

DESIRED_SCHEMA = "edgekit.desired/1"
MAX_ARTIFACT_BYTES = 4 * 1024**3
_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


class DesiredModel(TypedDict):
    name: str
    version: str
    sha256: str | None  # of the .edgepkg file
    size: int | None  # bytes of the .edgepkg file; a hard cap on the download
    key_id: str | None  # the signer the package must have, or None


class MqttSource(TypedDict):
    request_topic: str  # where chunk requests go (edgekit.protocol.ota.chunks)
    chunk_size: NotRequired[int]  # a suggestion; servers cap it


class Sources(TypedDict):
    mqtt: MqttSource | None
    url: str | None  # http(s) URL of the .edgepkg, fetched with Range requests


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
    issued: str  # ISO 8601, UTC
    model: DesiredModel
    sources: Sources
    allow_breaking: bool  # accept changed inputs/outputs when the manifest marks the change
    rollback: RollbackInstruction | None  # required to go to an older version
    latency_budget_ms: float | None  # staging: mean latency on the golden samples, or None
    probation: Probation


def new_deployment_id(now: dt.datetime | None = None) -> str:
    """A fresh deployment id, e.g. ``d20260131T120000-3f2a1c`` (time first, so ids sort)."""
    moment = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return f"d{moment.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def make_desired(*, deployment: str, name: str, version: str, sha256: str | None,
                 size: int | None, key_id: str | None = None, request_topic: str | None = None,
                 url: str | None = None, allow_breaking: bool = False,
                 rollback: RollbackInstruction | None = None,
                 probation: Probation | None = None, latency_budget_ms: float | None = None,
                 issued: dt.datetime | None = None) -> DesiredDocument:
    """Build a desired document and validate it as a device would.

    Raises:
        ProtocolError: a field is invalid; the message names it.
    """
    doc = {
        "schema": DESIRED_SCHEMA,
        "deployment": deployment,
        "issued": format_time(issued),
        "model": {"name": name, "version": version, "sha256": sha256, "size": size,
                  "key_id": key_id},
        "sources": {"mqtt": {"request_topic": request_topic} if request_topic else None,
                    "url": url},
        "allow_breaking": allow_breaking,
        "rollback": rollback,
        "latency_budget_ms": latency_budget_ms,
        "probation": dict(probation or DEFAULT_PROBATION),
    }
    return parse_desired(doc)


def encode_desired(doc: DesiredDocument) -> bytes:
    """The retained payload of a desired document."""
    return encode(doc)


def parse_desired(data: bytes | str | dict[str, Any]) -> DesiredDocument:
    """Parse and validate a desired document; fill defaults (probation, optional keys).

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
                            hint="this device understands edgekit.desired/1 documents")
    deployment = v.text(doc, "deployment", "desired", max_len=64)
    if not is_valid_id(deployment):
        raise ProtocolError(f"desired.deployment: {deployment!r} is not a valid id",
                            hint="use letters, digits, '_', '.' or '-'")
    issued = v.text(doc, "issued", "desired", max_len=64)
    parse_time(issued, "desired.issued")
    rollback = doc.get("rollback")
    instruction = parse_rollback(rollback, "desired.rollback") if rollback is not None else None
    model = _model(v.obj(v.field(doc, "model", "desired"), "desired.model"), instruction)
    sources = _sources(v.obj(v.field(doc, "sources", "desired"), "desired.sources"),
                       need_one=model["sha256"] is not None)
    if instruction is not None:
        pairs = (("name", model["name"], "name", instruction["name"]),
                 ("version", model["version"], "to_version", instruction["to_version"]),
                 ("sha256", model["sha256"], "sha256", instruction["sha256"]))
        for ours, mine, theirs, signed in pairs:
            if mine != signed:
                raise ProtocolError(f"desired.rollback.{theirs}: {signed!r} does not match"
                                    f" desired.model.{ours} {mine!r}")
    return DesiredDocument(
        schema=DESIRED_SCHEMA,
        deployment=deployment,
        issued=issued,
        model=model,
        sources=sources,
        allow_breaking=v.boolean(doc, "allow_breaking", "desired", default=False),
        rollback=instruction,
        latency_budget_ms=v.number(doc, "latency_budget_ms", "desired", default=None,
                                   nullable=True, low=0.0),
        probation=_probation(doc.get("probation")),
    )


def _model(doc: dict[str, Any], instruction: RollbackInstruction | None) -> DesiredModel:
    where = "desired.model"
    name = v.text(doc, "name", where, max_len=256)
    version = v.text(doc, "version", where, max_len=64)
    try:
        parse_version(version)
    except Exception as exc:
        raise ProtocolError(f"{where}.version: {version!r} is not a dotted number") from exc
    sha = v.sha256(doc, "sha256", where, nullable=True)
    size = v.integer(doc, "size", where, low=1, high=MAX_ARTIFACT_BYTES, nullable=True)
    if sha is None and instruction is None:
        raise ProtocolError(f"{where}.sha256: null is allowed only in a rollback to a kept copy",
                            hint="name the package's sha256")
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
        request_topic = v.text(m, "request_topic", f"{where}.mqtt", max_len=1024)
        if any(c in request_topic for c in "+#\0") or request_topic.startswith("$"):
            raise ProtocolError(f"{where}.mqtt.request_topic: {request_topic!r} is not a topic"
                                " one can publish to (wildcards, NUL or a leading '$')")
        parts = parse_topic(request_topic)
        if parts is not None and parts.device != ARTIFACTS_SCOPE:
            # Inside the tree only artifact topics: a request must not land on a device's
            # status, predict or other topic.
            raise ProtocolError(f"{where}.mqtt.request_topic: {request_topic!r} is a device"
                                f" topic; requests go to edgekit/v1/<fleet>/{ARTIFACTS_SCOPE}/...")
        mqtt = MqttSource(request_topic=request_topic)
        chunk = v.integer(m, "chunk_size", f"{where}.mqtt", low=1024, high=16 * 1024 * 1024,
                          default=None)
        if chunk is not None:
            mqtt["chunk_size"] = chunk
    url = v.text(doc, "url", where, default=None, nullable=True, max_len=4096)
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ProtocolError(f"{where}.url: {url!r} is not an http:// or https:// URL")
    if need_one and mqtt is None and url is None:
        raise ProtocolError(f"{where}: names neither mqtt nor url, so the artifact cannot be had",
                            hint="give sources.mqtt.request_topic or sources.url")
    return Sources(mqtt=mqtt, url=url)


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
