"""The schema as it was before migrations existed (schema_info version 1).

Revision ID: 0001
Revises: -
Create Date: 2026-12-02

Types are spelled out here rather than imported from the models, so that this migration
keeps creating the same tables whatever the models become.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None

_TIME = sa.DateTime(timezone=True)
# JSONB on PostgreSQL, JSON text elsewhere.
_JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY.
_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_ACTIVE = sa.text("state IN ('aborting', 'paused', 'pending', 'running')")


def upgrade() -> None:
    _create_fleet_tables()
    _create_registry_tables()
    _create_rollout_tables()
    op.create_table("schema_info",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id")
    )
    schema_info = sa.table("schema_info", sa.column("id", sa.Integer),
                           sa.column("version", sa.Integer), sa.column("created", _TIME))
    op.bulk_insert(schema_info, [{"id": 1, "version": 1, "created": _now()}])


def _create_fleet_tables() -> None:
    """Devices, metric history, labelled samples and leases."""
    op.create_table("devices",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("fleet", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("session_seq", sa.BigInteger(), nullable=False),
        sa.Column("agent_version", sa.String(length=64), nullable=True),
        sa.Column("model_name", sa.String(length=128), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("model_sha256", sa.String(length=64), nullable=True),
        sa.Column("first_seen", _TIME, nullable=False),
        sa.Column("last_seen", _TIME, nullable=True),
        sa.Column("status", _JSON, nullable=True),
        sa.Column("latency_p50_ms", sa.Float(), nullable=True),
        sa.Column("latency_p95_ms", sa.Float(), nullable=True),
        sa.Column("latency_p99_ms", sa.Float(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("f1", sa.Float(), nullable=True),
        sa.Column("label_count", sa.BigInteger(), nullable=True),
        sa.Column("metrics_at", _TIME, nullable=True),
        sa.Column("metrics_session", sa.BigInteger(), nullable=True),
        sa.Column("metrics_seq", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("fleet", "device_id", name="uq_devices_fleet_device")
    )
    op.create_table("metrics",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("fleet", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("session", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", _TIME, nullable=False),
        sa.Column("received", _TIME, nullable=False),
        sa.Column("payload", _JSON, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("fleet", "device_id", "session", "seq", name="uq_metrics_message")
    )
    op.create_index("ix_metrics_fleet_ts", "metrics", ["fleet", "ts"], unique=False)
    op.create_table("samples",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("fleet", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("prediction_id", sa.String(length=128), nullable=False),
        sa.Column("row", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("ts", _TIME, nullable=False),
        sa.Column("inputs", sa.LargeBinary(), nullable=False),
        sa.Column("label", _JSON, nullable=True),
        sa.Column("prediction", _JSON, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("fleet", "device_id", "prediction_id", "row", name="uq_samples_prediction_row")
    )
    op.create_index("ix_samples_ts", "samples", ["ts"], unique=False)
    op.create_table("leases",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("expires", _TIME, nullable=False),
        sa.Column("acquired", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("name")
    )


def _create_registry_tables() -> None:
    """The model registry and its channels."""
    op.create_table("models",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("task", sa.String(length=32), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("manifest", _JSON, nullable=False),
        sa.Column("evaluation", _JSON, nullable=True),
        sa.Column("signed", sa.Boolean(), nullable=False),
        sa.Column("signature_verified", sa.Boolean(), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=True),
        sa.Column("parent", sa.String(length=200), nullable=True),
        sa.Column("recipe", _JSON, nullable=True),
        sa.Column("data", sa.Text(), nullable=True),
        sa.Column("created", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "version", name="uq_models_name_version")
    )
    op.create_table("model_channels",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("channel", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("promoted", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("name", "channel")
    )


def _create_rollout_tables() -> None:
    """Rollouts, their targets, and the event log (which names rollouts)."""
    op.create_table("rollouts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("fleet", sa.String(length=128), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("plan", _JSON, nullable=False),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires", _TIME, nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created", _TIME, nullable=False),
        sa.Column("updated", _TIME, nullable=False),
        sa.Column("finished", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("id")
    )
    # At most one active rollout per fleet.
    op.create_index("uq_rollouts_active_fleet", "rollouts", ["fleet"], unique=True,
                    postgresql_where=_ACTIVE, sqlite_where=_ACTIVE)
    op.create_table("rollout_targets",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("previous_version", sa.String(length=64), nullable=True),
        sa.Column("assigned_at", _TIME, nullable=True),
        sa.Column("updated", _TIME, nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("rollout_id", "device_id")
    )
    op.create_table("events",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("fleet", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=True),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", _JSON, nullable=True),
        sa.Column("ts", _TIME, nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("fleet", "device_id", "seq", name="uq_events_device_seq")
    )
    op.create_index("ix_events_fleet_id", "events", ["fleet", "id"], unique=False)


def downgrade() -> None:
    for table in ("rollout_targets", "events", "schema_info", "samples", "rollouts", "models",
                  "model_channels", "metrics", "leases", "devices"):
        op.drop_table(table)


def _now() -> dt.datetime:
    # SQLite keeps times as naive UTC text (see UTCDateTime in the models).
    now = dt.datetime.now(dt.UTC)
    return now.replace(tzinfo=None) if op.get_bind().dialect.name == "sqlite" else now
