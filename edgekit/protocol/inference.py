"""What anyone asks a device, and its answers: predict and feedback requests and replies.

A request names its reply topic and carries its request id in the payload, so the protocol
needs no MQTT 5 properties. The HTTP API takes the same documents (``schema`` optional there).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from edgekit.protocol.arrays import EncodedArray
from edgekit.protocol.codec import Document
from edgekit.protocol.telemetry import ModelRef
from edgekit.protocol.topics import Schema

__all__ = [
    "MAX_REQUEST_ID",
    "MAX_TOPIC",
    "ErrorCode",
    "ErrorInfo",
    "FeedbackMessage",
    "FeedbackReply",
    "OutputMode",
    "PredictReply",
    "PredictRequest",
]

MAX_REQUEST_ID = 128
MAX_TOPIC = 512

RequestId = Annotated[str, Meta(max_length=MAX_REQUEST_ID)]
ReplyTopic = Annotated[str, Meta(min_length=1, max_length=MAX_TOPIC)]
PredictionId = Annotated[str, Meta(min_length=1, max_length=128)]
Label = int | Annotated[str, Meta(max_length=256)]
OutputMode = Literal["lists", "encoded", "none"]
# An input: nested lists of numbers, one number, or an encoded array.
InputValue = EncodedArray | list[Any] | float


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


class ErrorInfo(msgspec.Struct, kw_only=True):
    code: ErrorCode
    message: Annotated[str, Meta(max_length=4096)]


class PredictRequest(Document, tag=Schema.PREDICT_REQUEST.value):
    max_bytes: ClassVar[int] = 16 * 1024 * 1024
    inputs: Annotated[dict[Annotated[str, Meta(max_length=256)], InputValue],
                      Meta(max_length=64)]
    request_id: RequestId = ""  # required (non-empty) over MQTT
    reply_to: ReplyTopic | None = None  # required over MQTT
    outputs: OutputMode | None = None  # lists (the default), encoded or none


class PredictReply(Document, tag=Schema.PREDICT_REPLY.value):
    max_bytes: ClassVar[int] = 64 * 1024 * 1024
    ok: bool
    request_id: RequestId = ""  # MQTT replies echo the request's; HTTP ones have none
    prediction_id: PredictionId | None = None
    model: ModelRef | None = None
    outputs: dict[str, Any] | None = None  # nested lists or EncodedArray, by output name
    classes: list[int] | None = None
    labels: list[str] | None = None
    confidence: list[float] | None = None
    error: ErrorInfo | None = None


class FeedbackMessage(Document, tag=Schema.FEEDBACK.value):
    max_bytes: ClassVar[int] = 1024 * 1024
    prediction_id: PredictionId
    label: Label | None = None  # for a prediction of one row
    labels: Annotated[list[Label], Meta(max_length=4096)] | None = None  # one per row
    request_id: RequestId = ""
    reply_to: ReplyTopic | None = None  # ask for a FeedbackReply


class FeedbackReply(Document, tag=Schema.FEEDBACK_REPLY.value):
    request_id: RequestId
    ok: bool
    error: ErrorInfo | None = None
