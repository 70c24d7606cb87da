"""The controller's database tables, as SQLAlchemy 2.x declarative models.

docs/database.md describes every table and column. Times are stored in UTC; SQLite keeps them
as naive text, so :class:`UTCDateTime` attaches the zone again on the way out.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

#: The schema version in ``schema_info``: the number of the newest migration
#: (``migrations/versions/NNNN_*.py``). A change to the models below needs a migration.
SCHEMA_VERSION = 3


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every backend (naive values are refused)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware (UTC) datetime")
        value = value.astimezone(dt.UTC)
        # SQLite compares times as text, so every stored value must have the same form.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None,
                             dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


# JSONB on PostgreSQL (indexable, compact); JSON text elsewhere. None is stored as SQL NULL.
JSONDoc = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY, so big ids are plain integers there.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class RolloutState(StrEnum):
    """Where a rollout stands. Terminal states: succeeded, aborted, failed, cancelled."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    ABORTING = "aborting"
    SUCCEEDED = "succeeded"
    ABORTED = "aborted"
    FAILED = "failed"
    CANCELLED = "cancelled"


ROLLOUT_TRANSITIONS: dict[RolloutState, frozenset[RolloutState]] = {
    RolloutState.PENDING: frozenset(
        {RolloutState.RUNNING, RolloutState.CANCELLED, RolloutState.FAILED}),
    RolloutState.RUNNING: frozenset(
        {RolloutState.PAUSED, RolloutState.ABORTING, RolloutState.SUCCEEDED, RolloutState.FAILED}),
    RolloutState.PAUSED: frozenset(
        {RolloutState.RUNNING, RolloutState.ABORTING, RolloutState.CANCELLED}),
    RolloutState.ABORTING: frozenset({RolloutState.ABORTED, RolloutState.FAILED}),
    RolloutState.SUCCEEDED: frozenset(),
    RolloutState.ABORTED: frozenset(),
    RolloutState.FAILED: frozenset(),
    RolloutState.CANCELLED: frozenset(),
}
ACTIVE_ROLLOUT_STATES = frozenset(s for s, nxt in ROLLOUT_TRANSITIONS.items() if nxt)


class TargetState(StrEnum):
    """Where one device of a rollout stands."""

    PENDING = "pending"          # not yet in a wave
    ASSIGNED = "assigned"        # desired state published, waiting for the device
    SUCCEEDED = "succeeded"      # running the new model, probation passed
    FAILED = "failed"            # the device reported a failure (or rolled back by itself)
    TIMED_OUT = "timed_out"      # no answer within the per-device timeout
    ROLLING_BACK = "rolling_back"  # told to go back to its previous model
    ROLLED_BACK = "rolled_back"  # back on its previous model
    SKIPPED = "skipped"          # never updated (the rollout ended first)


class Base(DeclarativeBase):
    pass


class SchemaInfo(Base):
    __tablename__ = "schema_info"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class ModelRow(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_models_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(16))
    task: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)
    signed: Mapped[bool] = mapped_column(Boolean, default=False)
    signature_verified: Mapped[bool] = mapped_column(Boolean, default=False)
    key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    parent: Mapped[str | None] = mapped_column(String(200), nullable=True)
    recipe: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)
    data: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class ChannelRow(Base):
    """The version of a model that a channel (stable, canary, ...) points at."""

    __tablename__ = "model_channels"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    channel: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(64))
    promoted: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class DeviceRow(Base):
    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("fleet", "device_id", name="uq_devices_fleet_device"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(String(128))
    device_id: Mapped[str] = mapped_column(String(128))
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    session_seq: Mapped[int] = mapped_column(BigInteger, default=-1)
    agent_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    first_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    status: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_p99_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    f1: Mapped[float | None] = mapped_column(Float, nullable=True)
    label_count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Accuracy estimated without labels, and the predictions it covers (last interval).
    estimated_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    estimated_count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    metrics_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # (session, seq) of the metrics message the summary came from: an older one never
    # overwrites a newer one when messages arrive out of order.
    metrics_session: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    metrics_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class MetricRow(Base):
    __tablename__ = "metrics"
    __table_args__ = (
        UniqueConstraint("fleet", "device_id", "session", "seq", name="uq_metrics_message"),
        Index("ix_metrics_fleet_ts", "fleet", "ts"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(String(128))
    device_id: Mapped[str] = mapped_column(String(128))
    session: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    received: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    payload: Mapped[dict[str, Any]] = mapped_column(JSONDoc)


class EventRow(Base):
    __tablename__ = "events"
    __table_args__ = (
        # Device events carry a seq per device session; a second delivery of one is dropped.
        # The controller's own events have no seq (NULLs never collide).
        UniqueConstraint("fleet", "device_id", "session", "seq",
                         name="uq_events_device_session_seq"),
        Index("ix_events_fleet_id", "fleet", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(String(128))
    device_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    session: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    kind: Mapped[str] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(16), default="info")
    reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)
    ts: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    rollout_id: Mapped[int | None] = mapped_column(
        Integer, ForeignKey("rollouts.id", ondelete="SET NULL"), nullable=True)


class SampleRow(Base):
    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("fleet", "device_id", "prediction_id", "row",
                         name="uq_samples_prediction_row"),
        Index("ix_samples_ts", "ts"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(String(128))
    device_id: Mapped[str] = mapped_column(String(128))
    prediction_id: Mapped[str] = mapped_column(String(128))
    row: Mapped[int] = mapped_column(Integer, default=0)
    model_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ts: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    inputs: Mapped[bytes] = mapped_column(LargeBinary)
    label: Mapped[Any] = mapped_column(JSONDoc, nullable=True)
    prediction: Mapped[Any] = mapped_column(JSONDoc, nullable=True)


class RolloutRow(Base):
    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(String(128))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    plan: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    finished: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


_ACTIVE_STATES = sorted(s.value for s in ACTIVE_ROLLOUT_STATES)
# At most one active rollout per fleet, enforced by the database itself so that two
# controllers creating one at the same moment cannot both succeed.
Index(
    "uq_rollouts_active_fleet", RolloutRow.fleet, unique=True,
    postgresql_where=RolloutRow.state.in_(_ACTIVE_STATES),
    sqlite_where=RolloutRow.state.in_(_ACTIVE_STATES),
)


class RolloutTargetRow(Base):
    __tablename__ = "rollout_targets"

    rollout_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    wave: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    previous_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    assigned_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    updated: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class LeaseRow(Base):
    """A named lease: one owner at a time until ``expires``."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    expires: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    acquired: Mapped[dt.datetime] = mapped_column(UTCDateTime())
