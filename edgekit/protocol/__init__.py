"""Every document that crosses the wire, typed, in one package.

- :mod:`edgekit.protocol.codec`: the :class:`Document` base (a msgspec Struct whose
  ``schema`` field is its tag, ``edgekit.<name>/<major>``), :func:`encode`, and the
  size-capped :func:`decode` that raises :class:`~edgekit.errors.ProtocolError`.
- :mod:`edgekit.protocol.topics`: the topic tree, ids, and the schema of each payload.
- :mod:`edgekit.protocol.telemetry`: what a device reports (status, metrics, events, samples).
- :mod:`edgekit.protocol.inference`: predict and feedback requests and their replies.
- :mod:`edgekit.protocol.arrays`: arrays as nested lists or base64 (:class:`EncodedArray`).
- :mod:`edgekit.protocol.ota`: over-the-air update documents (desired state, chunks,
  update events).
- :mod:`edgekit.protocol.controller`: requests to the fleet controller and its replies.
- :mod:`edgekit.protocol.signed`: the envelope of signed documents (desired documents,
  rollout requests): the exact signed bytes, the key id and the signature.

docs/protocol.md is the prose form. The device documents' names are re-exported here.
"""

from __future__ import annotations

from edgekit.protocol.arrays import MAX_ARRAY_BYTES, EncodedArray, decode_array, encode_array
from edgekit.protocol.codec import Document, decode, encode, prepare, schema_of
from edgekit.protocol.inference import (
    MAX_REQUEST_ID,
    MAX_TOPIC,
    ErrorCode,
    ErrorInfo,
    FeedbackMessage,
    FeedbackReply,
    PredictReply,
    PredictRequest,
)
from edgekit.protocol.telemetry import (
    MAX_EVENT_MESSAGE,
    MAX_UPDATE_MESSAGE,
    DeviceState,
    EstimateSection,
    EventKind,
    EventLevel,
    EventPayload,
    HardwareInfo,
    LatencySection,
    MetricsPayload,
    ModelRef,
    PredictionsSection,
    QualitySection,
    RequestsSection,
    RuntimeInfo,
    SamplePayload,
    StatusPayload,
    SystemSection,
    TelemetrySection,
    VariantCandidate,
    VariantSection,
)
from edgekit.protocol.topics import (
    FLEET_SCOPE,
    ROOT,
    Kind,
    Schema,
    TopicParts,
    check_id,
    fleet_topic,
    is_valid_id,
    parse_topic,
    subscription,
    topic,
)

__all__ = [
    "FLEET_SCOPE",
    "MAX_ARRAY_BYTES",
    "MAX_EVENT_MESSAGE",
    "MAX_REQUEST_ID",
    "MAX_TOPIC",
    "MAX_UPDATE_MESSAGE",
    "ROOT",
    "DeviceState",
    "Document",
    "EncodedArray",
    "ErrorCode",
    "ErrorInfo",
    "EstimateSection",
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
    "VariantCandidate",
    "VariantSection",
    "TopicParts",
    "check_id",
    "decode",
    "decode_array",
    "encode",
    "encode_array",
    "fleet_topic",
    "is_valid_id",
    "parse_topic",
    "prepare",
    "schema_of",
    "subscription",
    "topic",
]
