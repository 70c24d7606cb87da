"""The fleet controller: ingest the fleet's telemetry, drive rollouts, keep models good.

:class:`Controller` (``edgekit controller run``) runs the parts on one MQTT connection and one
database: :class:`~.ingest.Ingest` (status, metrics, events and samples into the database),
:class:`~.rollout.RolloutEngine` (canary and waves, abort and rollback),
:class:`~.policy.MaintenancePolicy` (a field quality drop triggers an update) and the OTA
artifact server. docs/controller.md describes the configuration and the semantics.
"""

from __future__ import annotations

from edgekit.host.controller._back import model_before
from edgekit.host.controller.config import (
    ConfigKey,
    ControllerConfig,
    config_keys,
    load_config,
    to_toml,
)
from edgekit.host.controller.ingest import Ingest, IngestStats
from edgekit.host.controller.policy import MaintenancePolicy, Window
from edgekit.host.controller.rollout import RolloutEngine
from edgekit.host.controller.service import Controller
from edgekit.protocol.controller import (
    PresencePayload,
    RolloutReply,
    RolloutRequest,
    RolloutStatePayload,
    presence_topic,
    rollout_request_topic,
    rollout_state_topic,
)

__all__ = [
    "ConfigKey",
    "Controller",
    "ControllerConfig",
    "Ingest",
    "IngestStats",
    "MaintenancePolicy",
    "PresencePayload",
    "RolloutEngine",
    "RolloutReply",
    "RolloutRequest",
    "RolloutStatePayload",
    "Window",
    "config_keys",
    "load_config",
    "model_before",
    "presence_topic",
    "rollout_request_topic",
    "rollout_state_topic",
    "to_toml",
]
