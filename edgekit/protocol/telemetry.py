"""What a device reports: status (birth, last will, stop), metrics, events and samples.

Each payload is a :class:`~edgekit.protocol.codec.Document`: the agent builds and encodes
it, the controller decodes it with :func:`~edgekit.protocol.codec.decode`, which enforces
the bounds declared here (``msgspec.Meta``) before any of it is used.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import Meta

from edgekit.protocol.arrays import EncodedArray
from edgekit.protocol.codec import Document
from edgekit.protocol.topics import ID_PATTERN, Schema

__all__ = [
    "MAX_EVENT_MESSAGE",
    "MAX_UPDATE_MESSAGE",
    "DeviceState",
    "EstimateSection",
    "EventKind",
    "EventLevel",
    "EventPayload",
    "HardwareInfo",
    "LatencySection",
    "MetricsPayload",
    "ModelRef",
    "PredictionsSection",
    "QualitySection",
    "RequestsSection",
    "RuntimeInfo",
    "SamplePayload",
    "StatusPayload",
    "SystemSection",
    "TelemetrySection",
    "UpdateModel",
    "UpdateStatus",
    "VariantCandidate",
    "VariantSection",
]

MAX_EVENT_MESSAGE = 2000
MAX_UPDATE_MESSAGE = 16 * 1024

Id = Annotated[str, Meta(pattern=ID_PATTERN)]
Count = Annotated[int, Meta(ge=0)]
Text64 = Annotated[str, Meta(max_length=64)]
Text256 = Annotated[str, Meta(max_length=256)]
Seconds = Annotated[float, Meta(ge=0)]


class DeviceState(StrEnum):
    ONLINE = "online"  # birth: published on every connect
    OFFLINE = "offline"  # last will: the connection died without a goodbye
    STOPPED = "stopped"  # clean shutdown


class EventLevel(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class EventKind(StrEnum):
    """Kinds of ``events`` payloads the agent sends (OTA adds ``update.<step>`` kinds)."""

    AGENT_STARTED = "agent.started"
    MODEL_ACTIVATED = "model.activated"
    MODEL_LOAD_FAILED = "model.load_failed"
    MODEL_MISSING = "model.missing"


class ModelRef(msgspec.Struct, kw_only=True, frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    version: Annotated[str, Meta(min_length=1, max_length=64)]
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]  # of the .edgepkg file
    format: Annotated[str, Meta(max_length=16)] = ""  # onnx | tflite
    runtime: Annotated[str, Meta(max_length=32)] = ""  # the backend that runs it

    def as_dict(self) -> dict[str, str]:
        """The reference as a plain dict (for event data and other free-form JSON)."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "format": self.format, "runtime": self.runtime}


class RuntimeInfo(msgspec.Struct, kw_only=True):
    key: Text64
    format: Text64
    available: bool
    version: Text64 | None
    providers: Annotated[list[Text64], Meta(max_length=32)]


class HardwareInfo(msgspec.Struct, kw_only=True):
    hostname: Text256
    system: Text64
    machine: Text64  # aarch64, x86_64, ...
    release: Text256
    os: Text256  # PRETTY_NAME from /etc/os-release
    board: Text256 | None  # /proc/device-tree/model on a Pi or a Jetson
    cpu_count: Count
    memory_total_bytes: Count
    python: Text64


class VariantCandidate(msgspec.Struct, kw_only=True, frozen=True):
    """One (variant, runtime, provider) the device tried, what it measured and why it was
    or was not picked."""

    variant: Text64
    runtime: Text64
    provider: Text64 | None = None  # the onnxruntime execution provider
    p50_ms: Annotated[float, Meta(ge=0)] | None = None  # median of batch-1 runs; null: not run
    eligible: bool = False
    reason: Text256 = ""


class VariantSection(msgspec.Struct, kw_only=True, frozen=True):
    """Which variant of a package of several serves, and why (docs/devices.md)."""

    id: Text64
    runtime: Text64
    provider: Text64 | None = None
    p50_ms: Annotated[float, Meta(ge=0)]
    runs: Count  # timed runs per candidate
    reason: Text256
    candidates: Annotated[list[VariantCandidate], Meta(max_length=32)]


class UpdateModel(msgspec.Struct, kw_only=True, frozen=True):
    """A model an update is about, or the one in service (no field is required: the model
    of a desired document too broken to name one has none)."""

    name: Annotated[str, Meta(max_length=128)] | None = None
    version: Text64 | None = None
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")] | None = None


class UpdateStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The ``update`` field of the retained status: the update in progress (``step`` is the
    journal's: queued ... probation, rolling_back), else the outcome of the last one
    (docs/ota.md). The agent builds it, the reader decodes it with the status."""

    deployment: Annotated[str, Meta(max_length=128)]
    step: Annotated[str, Meta(min_length=1, max_length=32)]
    model: UpdateModel | None = None
    reason: Text64 | None = None
    message: Annotated[str, Meta(max_length=MAX_UPDATE_MESSAGE)] | None = None


class StatusPayload(Document, tag=Schema.STATUS.value):
    """Retained on ``status``. ``session`` grows with every connection the device makes, so a
    reader keeps the payload with the highest session and ignores a late last will."""

    max_bytes: ClassVar[int] = 64 * 1024
    state: DeviceState
    device: Id
    fleet: Id
    session: Count
    ts: Seconds
    agent_version: Text64
    runtimes: Annotated[list[RuntimeInfo], Meta(max_length=16)]
    hardware: HardwareInfo
    model: ModelRef | None  # serving now; null in the last will (nothing serves then)
    http: Text256 | None  # HOST:PORT of the local HTTP API, when it runs
    started: Seconds  # when the agent process started
    reason: Text256 | None = None  # why it went offline or stopped
    # The update in progress, else the last one (absent before the device's first update).
    update: UpdateStatus | None = None
    # Ids of the release keys whose packages the device accepts (null: not reported), and
    # whether it takes unsigned ones: what `edgekit deploy` checks before it publishes.
    trusted_keys: Annotated[list[Text64], Meta(max_length=64)] | None = None
    allow_unsigned: bool = False
    # The variant serving, when the model's package holds several (null otherwise, and from
    # agents that predate variants).
    variant: VariantSection | None = None


class RequestsSection(msgspec.Struct, kw_only=True):
    total: Count  # since the agent started
    interval: Count
    errors_total: Count
    errors_interval: Count
    by_channel: Annotated[dict[Text64, Count], Meta(max_length=16)]  # python | http | mqtt
    errors_by_code: Annotated[dict[Text64, Count], Meta(max_length=64)]  # ErrorCode -> count


class LatencySection(msgspec.Struct, kw_only=True):
    count: Count
    mean_ms: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class SystemSection(msgspec.Struct, kw_only=True):
    cpu_percent: float | None  # this process, over the interval (100 = one core)
    rss_bytes: Count | None
    memory_percent: float | None  # of the whole machine
    temperature_c: float | None  # hottest thermal zone, when the board has one
    load1: float | None


class PredictionsSection(msgspec.Struct, kw_only=True):
    count: Count  # samples (a batch counts each of its rows)
    histogram: Annotated[dict[Text256, Count], Meta(max_length=4096)]  # label -> count
    mean_confidence: float | None


class QualitySection(msgspec.Struct, kw_only=True):
    """Labelled-feedback window of the active model (edgekit.metrics on the window)."""

    window: Count  # the window's capacity, in labels
    labels: Count  # labels in the window now
    accuracy: Annotated[float, Meta(ge=0, le=1)] | None
    f1_macro: Annotated[float, Meta(ge=0, le=1)] | None
    confusion: Annotated[list[Annotated[list[Count], Meta(max_length=32)]],
                         Meta(max_length=32)] | None
    feedback_total: Count
    feedback_rejected: Count


class EstimateSection(msgspec.Struct, kw_only=True):
    """Accuracy estimated without labels (from the accuracy estimate in the
    package's manifest; edgekit.calibration) over the interval's classifier predictions."""

    method: Text64 = "cbpe"
    accuracy: Annotated[float, Meta(ge=0, le=1)]
    count: Count  # predictions (rows) the estimate covers


class TelemetrySection(msgspec.Struct, kw_only=True):
    queue_depth: Count  # messages waiting in the store-and-forward queue
    dropped_total: Count  # messages dropped at the queue's bound since the queue was created
    queue_bytes: Count = 0  # bytes of the queued messages (the queue's byte bound counts them)


class MetricsPayload(Document, tag=Schema.METRICS.value):
    max_bytes: ClassVar[int] = 256 * 1024
    device: Id
    fleet: Id
    seq: Count  # contiguous per device, across restarts; duplicates may arrive (QoS 1)
    ts: Seconds
    interval_s: Seconds
    model: ModelRef | None
    requests: RequestsSection
    latency: LatencySection
    throughput_rps: Annotated[float, Meta(ge=0)]
    system: SystemSection
    predictions: PredictionsSection
    quality: QualitySection
    telemetry: TelemetrySection
    # Added within edgekit.metrics/1: absent from older agents and from packages without a
    # an accuracy estimate; older hosts ignore it.
    estimate: EstimateSection | None = None


class EventPayload(Document, tag=Schema.EVENT.value):
    """Something that happened. ``(session, seq)`` identifies it: ``session`` is the
    connection session of the status (0 from agents that do not send it)."""

    max_bytes: ClassVar[int] = 64 * 1024
    device: Id
    fleet: Id
    seq: Count
    ts: Seconds
    kind: Annotated[str, Meta(min_length=1, max_length=64)]  # EventKind, update.<step>, ...
    level: EventLevel = EventLevel.INFO
    message: Annotated[str, Meta(max_length=MAX_EVENT_MESSAGE)] = ""
    session: Count = 0
    reason: Text64 | None = None
    data: dict[str, Any] | None = None


class SamplePayload(Document, tag=Schema.SAMPLE.value):
    max_bytes: ClassVar[int] = 16 * 1024 * 1024
    device: Id
    fleet: Id
    seq: Count
    ts: Seconds
    prediction_id: Annotated[str, Meta(min_length=1, max_length=128)]
    model: ModelRef
    inputs: Annotated[dict[Text256, EncodedArray], Meta(min_length=1, max_length=64)]
    label: Annotated[list[int], Meta(max_length=4096)]  # one true class per row
    prediction: Annotated[list[int], Meta(max_length=4096)]  # the model's class per row
