"""The MQTT protocol between devices and the host: topic tree and payload schemas.

Every topic lives under one versioned root::

    edgekit/v1/<fleet>/<device>/<kind>[/<rest>]

``<fleet>`` and ``<device>`` are ids (letters, digits, ``_ . -``; no leading ``_``, so the
reserved level ``_fleet`` can carry documents meant for a whole fleet). Every payload is a
JSON object with a ``schema`` field (``edgekit.<name>/<major>``); a reader refuses a payload
whose schema it does not know. docs/protocol.md is the prose form of this module.

The TypedDicts below are the payloads; the agent builds them and the host reads them.
Arrays travel as nested JSON lists or as :class:`EncodedArray` (base64 of the raw
little-endian bytes), see :func:`encode_array` and :func:`decode_array`.
"""

from __future__ import annotations

import base64
import json
import math
import re
from enum import StrEnum
from typing import Any, NamedTuple, NotRequired, TypedDict

import numpy as np

from edgekit.errors import ProtocolError, UsageError

__all__ = [
    "FLEET_SCOPE",
    "MAX_ARRAY_BYTES",
    "ROOT",
    "DeviceState",
    "EncodedArray",
    "ErrorCode",
    "ErrorInfo",
    "EventKind",
    "EventLevel",
    "EventPayload",
    "FeedbackMessage",
    "FeedbackReply",
    "HardwareInfo",
    "Kind",
    "LatencySection",
    "MetricsPayload",
    "ModelRef",
    "PredictReply",
    "PredictRequest",
    "PredictionsSection",
    "QualitySection",
    "RequestsSection",
    "RuntimeInfo",
    "SamplePayload",
    "Schema",
    "StatusPayload",
    "SystemSection",
    "TelemetrySection",
    "TopicParts",
    "check_id",
    "decode",
    "decode_array",
    "encode",
    "encode_array",
    "fleet_topic",
    "is_valid_id",
    "parse_topic",
    "subscription",
    "topic",
]

ROOT = "edgekit/v1"
FLEET_SCOPE = "_fleet"
MAX_ARRAY_BYTES = 64 * 1024 * 1024
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ARRAY_DTYPES = {"float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64",
                 "bool"}


class Kind(StrEnum):
    """The last fixed level of a topic: what the message is."""

    STATUS = "status"  # device -> host, retained: birth, last will, clean stop
    METRICS = "metrics"  # device -> host, every telemetry interval
    EVENTS = "events"  # device -> host, things that happened (model activated, ...)
    SAMPLES = "samples"  # device -> host, labelled samples (input, label, prediction)
    PREDICT = "predict"  # anyone -> device, an inference request
    FEEDBACK = "feedback"  # anyone -> device, labels for earlier predictions
    REPLY = "reply"  # device -> requester, the suggested home of reply topics
    DESIRED = "desired"  # host -> device (or fleet), retained desired-model document


class Schema(StrEnum):
    """The ``schema`` field of every payload. The number is the major version."""

    STATUS = "edgekit.status/1"
    METRICS = "edgekit.metrics/1"
    EVENT = "edgekit.event/1"
    SAMPLE = "edgekit.sample/1"
    PREDICT_REQUEST = "edgekit.predict-request/1"
    PREDICT_REPLY = "edgekit.predict-reply/1"
    FEEDBACK = "edgekit.feedback/1"
    FEEDBACK_REPLY = "edgekit.feedback-reply/1"


class DeviceState(StrEnum):
    ONLINE = "online"  # birth: published on every connect
    OFFLINE = "offline"  # last will: the connection died without a goodbye
    STOPPED = "stopped"  # clean shutdown


class ErrorCode(StrEnum):
    """Why a request failed; HTTP replies carry the same codes."""

    BAD_REQUEST = "bad_request"  # not JSON, wrong schema, a field missing or of the wrong type
    INVALID_INPUT = "invalid_input"  # inputs do not match the model's manifest
    NO_MODEL = "no_model"  # no model is active yet
    BUSY = "busy"  # too many requests waiting
    UNKNOWN_PREDICTION = "unknown_prediction"  # feedback for an id the agent does not hold
    ALREADY_LABELLED = "already_labelled"  # feedback for a prediction that has a label
    UNSUPPORTED = "unsupported"  # e.g. feedback for a model that is not a classifier
    INTERNAL = "internal"  # the runtime failed; the agent keeps serving


class EventLevel(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class EventKind(StrEnum):
    """Kinds of ``events`` payloads the agent sends."""

    AGENT_STARTED = "agent.started"
    MODEL_ACTIVATED = "model.activated"
    MODEL_LOAD_FAILED = "model.load_failed"
    MODEL_MISSING = "model.missing"


class TopicParts(NamedTuple):
    fleet: str
    device: str
    kind: str
    rest: str


def is_valid_id(text: object) -> bool:
    """Whether ``text`` may be a fleet or device id (no MQTT wildcards, no ``/``)."""
    return isinstance(text, str) and bool(_ID_RE.match(text))


def check_id(text: object, what: str) -> str:
    """Return ``text`` if it is a valid id.

    Raises:
        UsageError: it is empty, too long, or holds a character outside ``A-Z a-z 0-9 _ . -``.
    """
    if not is_valid_id(text):
        raise UsageError(
            f"{what} {text!r} is not a valid id",
            hint="use 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return str(text)


def topic(fleet: str, device: str, kind: Kind | str, *rest: str) -> str:
    """The topic of one device's ``kind`` (``rest`` adds levels, e.g. a reply channel)."""
    kind_value = kind.value if isinstance(kind, Kind) else kind
    return "/".join([ROOT, fleet, device, kind_value, *rest])


def fleet_topic(fleet: str, kind: Kind | str) -> str:
    """A fleet-wide topic (the reserved ``_fleet`` device level), e.g. the fleet's desired model."""
    return topic(fleet, FLEET_SCOPE, kind)


def subscription(fleet: str = "+", device: str = "+", kind: Kind | str = "#") -> str:
    """A subscription filter, e.g. ``subscription("f1", kind=Kind.STATUS)`` for a fleet's status."""
    return topic(fleet, device, kind)


def parse_topic(text: str) -> TopicParts | None:
    """Split a topic of the tree; None when it is not one."""
    prefix = ROOT + "/"
    if not text.startswith(prefix):
        return None
    parts = text[len(prefix):].split("/", 3)
    if len(parts) < 3 or not all(parts[:3]):
        return None
    return TopicParts(parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else "")


# --------------------------------------------------------------------------- payloads


class ModelRef(TypedDict):
    name: str
    version: str
    sha256: str  # of the .edgepkg file
    format: str  # onnx | tflite
    runtime: str  # the backend that runs it (onnxruntime | litert)


class RuntimeInfo(TypedDict):
    key: str
    format: str
    available: bool
    version: str | None
    providers: list[str]


class HardwareInfo(TypedDict):
    hostname: str
    system: str
    machine: str  # aarch64, x86_64, ...
    release: str
    os: str  # PRETTY_NAME from /etc/os-release
    board: str | None  # /proc/device-tree/model on a Pi or a Jetson
    cpu_count: int
    memory_total_bytes: int
    python: str


class StatusPayload(TypedDict):
    """Retained on ``status``. ``session`` grows with every connection the device makes, so a
    reader keeps the payload with the highest session and ignores a late last will."""

    schema: str
    state: str  # DeviceState
    device: str
    fleet: str
    session: int
    ts: float
    agent_version: str
    runtimes: list[RuntimeInfo]
    hardware: HardwareInfo
    model: ModelRef | None  # serving now; null in the last will (nothing serves then)
    http: str | None  # HOST:PORT of the local HTTP API, when it runs
    started: float  # when the agent process started
    reason: NotRequired[str]  # why it went offline or stopped
    # The update in progress, else the last one: deployment, step, model, reason, message
    # (edgekit.protocol.ota.events.UpdateStatus; docs/ota.md).
    update: NotRequired[dict[str, Any]]
    # Key ids the agent accepts packages from, and whether it accepts unsigned ones, so a
    # deploy can say before publishing that no device would accept its package.
    trusted_keys: NotRequired[list[str]]
    allow_unsigned: NotRequired[bool]


class RequestsSection(TypedDict):
    total: int  # since the agent started
    interval: int
    errors_total: int
    errors_interval: int
    by_channel: dict[str, int]  # python | http | mqtt, this interval
    errors_by_code: dict[str, int]  # ErrorCode -> count, this interval


class LatencySection(TypedDict):
    count: int
    mean_ms: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class SystemSection(TypedDict):
    cpu_percent: float | None  # this process, over the interval (100 = one core)
    rss_bytes: int | None
    memory_percent: float | None  # of the whole machine
    temperature_c: float | None  # hottest thermal zone, when the board has one
    load1: float | None


class PredictionsSection(TypedDict):
    count: int  # samples (a batch counts each of its rows)
    histogram: dict[str, int]  # label (or class index) -> count, this interval
    mean_confidence: float | None


class QualitySection(TypedDict):
    """Labelled-feedback window of the active model (edgekit.metrics on the window)."""

    window: int  # the window's capacity, in labels
    labels: int  # labels in the window now
    accuracy: float | None
    f1_macro: float | None
    confusion: list[list[int]] | None
    feedback_total: int
    feedback_rejected: int


class TelemetrySection(TypedDict):
    queue_depth: int  # messages waiting in the store-and-forward queue
    dropped_total: int  # messages dropped at the queue's bound since the queue was created


class MetricsPayload(TypedDict):
    schema: str
    device: str
    fleet: str
    seq: int  # contiguous per device, across restarts; duplicates may arrive (QoS 1)
    ts: float
    interval_s: float
    model: ModelRef | None
    requests: RequestsSection
    latency: LatencySection
    throughput_rps: float
    system: SystemSection
    predictions: PredictionsSection
    quality: QualitySection
    telemetry: TelemetrySection


class EventPayload(TypedDict):
    schema: str
    device: str
    fleet: str
    seq: int
    ts: float
    kind: str  # EventKind, or a kind a later part of edgekit adds
    level: str  # EventLevel
    message: str
    reason: NotRequired[str]
    data: NotRequired[dict[str, Any]]


class EncodedArray(TypedDict):
    dtype: str
    shape: list[int]
    data: str  # base64 of the little-endian bytes, C order


class SamplePayload(TypedDict):
    schema: str
    device: str
    fleet: str
    seq: int
    ts: float
    prediction_id: str
    model: ModelRef
    inputs: dict[str, EncodedArray]
    label: list[int]  # one true class per row
    prediction: list[int]  # the model's class per row


class PredictRequest(TypedDict):
    schema: str
    request_id: str
    reply_to: str
    inputs: dict[str, Any]  # nested lists or EncodedArray, by input name
    outputs: NotRequired[str]  # "lists" (default) | "encoded" | "none"


class ErrorInfo(TypedDict):
    code: str  # ErrorCode
    message: str


class PredictReply(TypedDict):
    schema: str
    request_id: str
    ok: bool
    prediction_id: NotRequired[str]
    model: NotRequired[ModelRef]
    outputs: NotRequired[dict[str, Any]]
    classes: NotRequired[list[int]]
    labels: NotRequired[list[str]]
    confidence: NotRequired[list[float]]
    error: NotRequired[ErrorInfo]


class FeedbackMessage(TypedDict):
    schema: str
    prediction_id: str
    label: NotRequired[int | str]  # for a prediction of one row
    labels: NotRequired[list[int | str]]  # one per row of the prediction's batch
    request_id: NotRequired[str]
    reply_to: NotRequired[str]  # ask for a FeedbackReply


class FeedbackReply(TypedDict):
    schema: str
    request_id: str
    ok: bool
    error: NotRequired[ErrorInfo]


# --------------------------------------------------------------------------- encoding


def encode(payload: Any) -> bytes:
    """JSON bytes of a payload; NaN and infinities become null (JSON has no such numbers)."""
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except ValueError:
        return json.dumps(_finite(payload), separators=(",", ":")).encode("utf-8")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def decode(data: bytes | str, schema: Schema) -> dict[str, Any]:
    """Parse a payload and check its ``schema`` field.

    Raises:
        ProtocolError: not UTF-8 JSON, not an object, or a ``schema`` other than ``schema``
            (a newer major version included).
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"payload is not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(doc, dict):
        raise ProtocolError(f"payload is a JSON {type(doc).__name__}, expected an object")
    found = doc.get("schema")
    if found != schema.value:
        raise ProtocolError(
            f"payload schema is {found!r}, expected {schema.value!r}",
            hint="every payload needs a 'schema' field; see docs/protocol.md",
        )
    return doc


def encode_array(arr: np.ndarray) -> EncodedArray:
    """An array as dtype, shape and base64 of its little-endian bytes."""
    a = np.asarray(arr)
    if a.dtype.name not in _ARRAY_DTYPES:
        raise ProtocolError(f"arrays of dtype {a.dtype} cannot be sent")
    a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
    return {"dtype": a.dtype.name, "shape": list(a.shape),
            "data": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(doc: Any, what: str = "array") -> np.ndarray:
    """Inverse of :func:`encode_array`.

    Raises:
        ProtocolError: a field is missing or of the wrong type, the dtype is not allowed,
            the data is not base64, or its length does not match the shape.
    """
    if not isinstance(doc, dict):
        raise ProtocolError(f"{what}: expected an object with dtype, shape and data")
    dtype, shape, data = doc.get("dtype"), doc.get("shape"), doc.get("data")
    if dtype not in _ARRAY_DTYPES:
        raise ProtocolError(f"{what}: dtype {dtype!r} is not one of {sorted(_ARRAY_DTYPES)}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(f"{what}: shape must be a list of non-negative integers")
    if not isinstance(data, str):
        raise ProtocolError(f"{what}: data must be a base64 string")
    np_dtype = np.dtype(dtype).newbyteorder("<")
    expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if expected > MAX_ARRAY_BYTES or len(data) > (MAX_ARRAY_BYTES * 4) // 3 + 4:
        raise ProtocolError(f"{what}: larger than the limit of {MAX_ARRAY_BYTES} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as exc:
        raise ProtocolError(f"{what}: data is not valid base64") from exc
    if len(raw) != expected:
        raise ProtocolError(
            f"{what}: {len(raw)} bytes of data, shape {shape} of {dtype} needs {expected}"
        )
    return np.frombuffer(raw, dtype=np_dtype).reshape(shape).astype(np_dtype.newbyteorder("="))
