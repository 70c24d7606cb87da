"""Reply payloads shared by the HTTP and MQTT front ends."""

from __future__ import annotations

from edgekit.protocol import ErrorInfo, PredictReply, encode_array

from ._model import Prediction
from .errors import describe

__all__ = ["error_info", "error_reply", "prediction_reply"]


def prediction_reply(prediction: Prediction, request_id: str, mode: str) -> PredictReply:
    """A successful reply; ``mode`` is lists (nested JSON lists), encoded (base64) or none."""
    reply = PredictReply(request_id=request_id, ok=True, prediction_id=prediction.id,
                         model=prediction.model.ref)
    if mode == "lists":
        reply.outputs = {k: v.tolist() for k, v in prediction.outputs.items()}
    elif mode == "encoded":
        reply.outputs = {k: encode_array(v) for k, v in prediction.outputs.items()}
    classes = prediction.classes
    confidence = prediction.confidence
    labels = prediction.labels
    if classes is not None and confidence is not None and labels is not None:
        reply.classes = [int(c) for c in classes]
        reply.labels = labels
        reply.confidence = [float(c) for c in confidence]
    return reply


def error_info(exc: BaseException) -> ErrorInfo:
    """The protocol's code and message for ``exc``."""
    code, _status, message = describe(exc)
    return ErrorInfo(code=code, message=message[:4096])


def error_reply(request_id: str, exc: BaseException) -> PredictReply:
    return PredictReply(request_id=request_id, ok=False, error=error_info(exc))
