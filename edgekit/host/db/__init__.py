"""The fleet database: devices, metrics, events, samples, models, rollouts and leases.

Importing this package needs the ``host`` extra (SQLAlchemy, psycopg). Records are plain
dataclasses (:mod:`edgekit.host.db._records`), never live database objects.
"""

from __future__ import annotations

from edgekit.host.db._records import (
    DeviceRecord,
    EventRecord,
    MetricRecord,
    MetricsSummary,
    ModelRecord,
    RolloutRecord,
    SampleIn,
    TargetRecord,
)
from edgekit.host.db._schema import (
    ACTIVE_ROLLOUT_STATES,
    ROLLOUT_TRANSITIONS,
    RolloutState,
    TargetState,
)
from edgekit.host.db._timeutil import parse_since, utcnow
from edgekit.host.db.store import SCHEMA_VERSION, Store, default_db_url

__all__ = [
    "ACTIVE_ROLLOUT_STATES",
    "ROLLOUT_TRANSITIONS",
    "SCHEMA_VERSION",
    "DeviceRecord",
    "EventRecord",
    "MetricRecord",
    "MetricsSummary",
    "ModelRecord",
    "RolloutRecord",
    "RolloutState",
    "SampleIn",
    "Store",
    "TargetRecord",
    "TargetState",
    "default_db_url",
    "parse_since",
    "utcnow",
]
