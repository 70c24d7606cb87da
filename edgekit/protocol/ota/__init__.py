"""Over-the-air model updates: the wire documents both sides share.

The host states the model it wants in a retained *desired document* (:mod:`.desired`),
signed by an operator key in an :mod:`edgekit.protocol.signed` envelope and bound to its
fleet, devices, expiry and issue time; only such a document can allow an older version or
another model (``allow_downgrade``, ``allow_rename``, ``revert``). An artifact server hands
the package out in checked chunks (:mod:`.chunks`), or a site bundle carries it with its
signed intent to a device no broker reaches (:mod:`.bundle`), and every step of an update is an event with a reason code (:mod:`.events`). Topics are in
:mod:`.topics`; docs/ota.md is the prose form.

This package imports nothing heavier than :mod:`edgekit.protocol`. The host's half (the
artifact server, deployer and tracker) is :mod:`edgekit.host.ota`.
"""

from __future__ import annotations

from edgekit.protocol.ota._time import format_time, parse_time
from edgekit.protocol.ota.bundle import (
    BUNDLE_MAGIC,
    BundleHeader,
    BundleParts,
    read_bundle,
    write_bundle,
)
from edgekit.protocol.ota.chunks import (
    CHUNK_REQUEST_SCHEMA,
    CHUNK_SCHEMA,
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    Chunk,
    ChunkErrorCode,
    ChunkErrorInfo,
    ChunkHeader,
    ChunkRequest,
    decode_chunk,
    encode_chunk,
    encode_chunk_error,
    encode_request,
    make_request,
    parse_request,
    peek_request_id,
)
from edgekit.protocol.ota.desired import (
    DEFAULT_PROBATION,
    DESIRED_SCHEMA,
    DESIRED_TTL_S,
    MAX_ARTIFACT_BYTES,
    ROLLBACK_TTL_S,
    DeltaSource,
    DesiredDocument,
    DesiredModel,
    MqttSource,
    Probation,
    Sources,
    encode_desired,
    make_desired,
    new_deployment_id,
    parse_desired,
    seal_desired,
)
from edgekit.protocol.ota.events import (
    EVENT_PREFIX,
    FINAL_STEPS,
    UpdateEventData,
    UpdateModel,
    UpdateProgress,
    UpdateReason,
    UpdateStatus,
    UpdateStep,
    event_kind,
    step_of,
)
from edgekit.protocol.ota.topics import (
    ARTIFACTS_SCOPE,
    DEFAULT_SHARE_GROUP,
    artifact_request_topic,
    artifact_subscription,
    desired_topic,
    ota_reply_topic,
    shared,
)
from edgekit.protocol.ota.transfer import (
    MAX_KBPS,
    Transfer,
    make_transfer,
    parse_transfer,
    parse_window,
)

__all__ = [
    "ARTIFACTS_SCOPE",
    "BUNDLE_MAGIC",
    "CHUNK_REQUEST_SCHEMA",
    "CHUNK_SCHEMA",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_PROBATION",
    "DEFAULT_SHARE_GROUP",
    "DESIRED_SCHEMA",
    "DESIRED_TTL_S",
    "EVENT_PREFIX",
    "FINAL_STEPS",
    "MAX_ARTIFACT_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_KBPS",
    "ROLLBACK_TTL_S",
    "BundleHeader",
    "BundleParts",
    "Chunk",
    "ChunkErrorCode",
    "ChunkErrorInfo",
    "ChunkHeader",
    "ChunkRequest",
    "DeltaSource",
    "DesiredDocument",
    "DesiredModel",
    "MqttSource",
    "Probation",
    "Sources",
    "Transfer",
    "UpdateEventData",
    "UpdateModel",
    "UpdateProgress",
    "UpdateReason",
    "UpdateStatus",
    "UpdateStep",
    "artifact_request_topic",
    "artifact_subscription",
    "decode_chunk",
    "desired_topic",
    "encode_chunk",
    "encode_chunk_error",
    "encode_desired",
    "encode_request",
    "event_kind",
    "format_time",
    "make_desired",
    "make_request",
    "make_transfer",
    "new_deployment_id",
    "ota_reply_topic",
    "parse_desired",
    "parse_request",
    "parse_time",
    "parse_transfer",
    "parse_window",
    "peek_request_id",
    "read_bundle",
    "seal_desired",
    "shared",
    "step_of",
    "write_bundle",
]
