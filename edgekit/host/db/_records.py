"""Plain records the :class:`~edgekit.host.db.Store` returns and takes.

They hold no database session, so they can be kept, compared and sent anywhere. Each
``to_dict`` gives the stable JSON form the CLI prints with ``--json`` (times as ISO 8601 UTC).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from edgekit.host.db._timeutil import iso


def _json_form(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = iso(value) if isinstance(value, dt.datetime) else value
    return out


@dataclass(frozen=True)
class MetricsSummary:
    """The latest figures of one device, as ``fleet status`` shows them."""

    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    accuracy: float | None = None
    f1: float | None = None
    label_count: int | None = None
    estimated_accuracy: float | None = None  # without labels, over the last interval
    estimated_count: int | None = None  # predictions the estimate covers

    def to_dict(self) -> dict[str, Any]:
        # Flat fields: a shallow copy, not dataclasses.asdict's deep one (ingest calls this
        # once per metrics message).
        return dict(vars(self))


@dataclass(frozen=True)
class DeviceRecord:
    """One device as the controller last saw it."""

    fleet: str
    device: str
    online: bool
    session: int
    agent_version: str | None
    model_name: str | None
    model_version: str | None
    model_sha256: str | None
    first_seen: dt.datetime
    last_seen: dt.datetime | None
    status: dict[str, Any] | None
    metrics: MetricsSummary
    metrics_at: dt.datetime | None

    def to_dict(self) -> dict[str, Any]:
        out = _json_form(self)
        out["metrics"] = self.metrics.to_dict()
        return out


@dataclass(frozen=True)
class MetricRecord:
    """One metrics message from the history."""

    id: int
    fleet: str
    device: str
    session: int
    seq: int
    ts: dt.datetime
    received: dt.datetime
    payload: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return _json_form(self)


@dataclass(frozen=True)
class EventRecord:
    """One event; ``id`` grows with every event and serves as a follow cursor."""

    id: int
    fleet: str
    device: str | None
    seq: int | None
    kind: str
    level: str
    reason: str | None
    message: str
    data: dict[str, Any] | None
    ts: dt.datetime
    rollout_id: int | None
    session: int = 0  # the device session the seq belongs to (0 for the controller's own)

    def to_dict(self) -> dict[str, Any]:
        return _json_form(self)


@dataclass
class SampleIn:
    """One labelled (or not yet labelled) sample from a device.

    ``inputs`` holds one array per model input for ONE sample, without the batch axis;
    :meth:`Store.export_samples` stacks them along a new axis 0. A prediction over a batch
    gives one sample per ``row`` of that batch, all with the same ``prediction_id``.
    """

    prediction_id: str
    inputs: dict[str, np.ndarray]
    row: int = 0
    label: Any = None
    prediction: Any = None
    model_name: str | None = None
    model_version: str | None = None
    ts: dt.datetime | None = None


@dataclass(frozen=True)
class ModelRecord:
    """A registered model: where its package lies, what it scored, where it came from."""

    name: str
    version: str
    sha256: str
    size: int
    format: str
    task: str
    path: str
    manifest: dict[str, Any]
    evaluation: dict[str, Any]
    signed: bool
    signature_verified: bool
    key_id: str | None
    parent: str | None
    recipe: dict[str, Any]
    data: str | None
    created: dt.datetime
    channels: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self, *, with_manifest: bool = True) -> dict[str, Any]:
        out = _json_form(self)
        if not with_manifest:
            out.pop("manifest")
        return out


@dataclass(frozen=True)
class RolloutRecord:
    """A rollout and who owns it now."""

    id: int
    fleet: str
    model_name: str
    model_version: str
    state: str
    plan: dict[str, Any]
    current_wave: int
    owner: str | None
    lease_expires: dt.datetime | None
    reason: str | None
    created: dt.datetime
    updated: dt.datetime
    finished: dt.datetime | None

    def to_dict(self) -> dict[str, Any]:
        return _json_form(self)


@dataclass(frozen=True)
class TargetRecord:
    """One device of a rollout."""

    rollout_id: int
    device: str
    wave: int | None
    state: str
    reason: str | None
    previous_version: str | None
    assigned_at: dt.datetime | None
    updated: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return _json_form(self)
