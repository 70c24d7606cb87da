"""The host side: the controller's database and the model registry.

Importing this package needs the ``host`` extra (SQLAlchemy, psycopg); the light core of
``edgekit`` never imports it.
"""

from __future__ import annotations

from ._records import (
    DeviceRecord,
    EventRecord,
    MetricRecord,
    MetricsSummary,
    ModelRecord,
    RolloutRecord,
    SampleIn,
    TargetRecord,
)
from ._schema import ACTIVE_ROLLOUT_STATES, ROLLOUT_TRANSITIONS, RolloutState, TargetState
from ._timeutil import parse_since, utcnow
from .db import SCHEMA_VERSION, Store, default_db_url
from .errors import LeaseLostError, StoreError
from .registry import PushResult, Registry, default_store_dir, evaluation_summary, parse_ref

__all__ = [
    "ACTIVE_ROLLOUT_STATES",
    "ROLLOUT_TRANSITIONS",
    "SCHEMA_VERSION",
    "DeviceRecord",
    "EventRecord",
    "LeaseLostError",
    "MetricRecord",
    "MetricsSummary",
    "ModelRecord",
    "PushResult",
    "Registry",
    "RolloutRecord",
    "RolloutState",
    "SampleIn",
    "Store",
    "StoreError",
    "TargetRecord",
    "TargetState",
    "default_db_url",
    "default_store_dir",
    "evaluation_summary",
    "parse_ref",
    "parse_since",
    "utcnow",
]
