"""MQTT request/response: ``predict`` and ``feedback`` topics of the device.

A request names its reply topic and carries its request id in the payload (no MQTT 5
properties needed, so MQTT 3.1.1 brokers work). Requests are answered by a small thread
pool; past ``requests.max_pending`` waiting requests the agent answers ``busy`` at once.
Whatever arrives, the agent logs it (at most once a second per topic, with a count of the
ones not logged), counts it, answers when it can, and goes on.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec

from edgekit.errors import InputError, ProtocolError
from edgekit.protocol import (
    MAX_REQUEST_ID,
    MAX_TOPIC,
    Document,
    ErrorCode,
    FeedbackMessage,
    FeedbackReply,
    Kind,
    PredictRequest,
    decode,
    encode,
    parse_topic,
)

from ._inputs import inputs_from_request
from ._limits import scan_envelope
from ._mqtt import MqttLink, ThrottledLog
from ._predict import Predictor
from ._replies import error_info, error_reply, prediction_reply
from .config import RequestsSection
from .errors import RequestError, describe

__all__ = ["MqttApi", "check_reply_topic"]

log = logging.getLogger("device_agent.mqtt")

R = TypeVar("R", PredictRequest, FeedbackMessage)


class _ReturnAddress(msgspec.Struct):
    """The two fields a refused request is answered with; anything else is ignored."""

    request_id: Any = None
    reply_to: Any = None


_address_decoder = msgspec.json.Decoder(_ReturnAddress)
# Kinds a reply may never be published to: it would forge telemetry or loop into requests.
_FORBIDDEN_REPLY_KINDS = {k.value for k in Kind} - {Kind.REPLY.value}


def check_reply_topic(value: Any) -> str:
    """A usable reply topic.

    Raises:
        ProtocolError: not a string, empty, too long, a wildcard, a ``$`` system topic, or a
            topic of the edgekit tree other than a ``reply`` one.
    """
    if not isinstance(value, str) or not value or len(value) > MAX_TOPIC:
        raise ProtocolError("reply_to must be a topic name of 1 to 512 characters")
    if "+" in value or "#" in value or "\x00" in value or value.startswith("$"):
        raise ProtocolError(f"reply_to {value!r} is a wildcard or a system topic")
    parts = parse_topic(value)
    if parts is not None and parts.kind in _FORBIDDEN_REPLY_KINDS:
        raise ProtocolError(f"reply_to {value!r} is a {parts.kind} topic; replies go elsewhere,"
                            " e.g. edgekit/v1/<fleet>/<device>/reply/<client>")
    return value


class MqttApi:
    """Answers the device's ``predict`` and ``feedback`` topics (named by ``topics``, as
    (predict, feedback)) with ``predictor``, through ``link``."""

    def __init__(self, predictor: Predictor, link: MqttLink, cfg: RequestsSection,
                 topics: tuple[str, str]) -> None:
        self.predictor = predictor
        self.link = link
        self._max_request_bytes = cfg.max_request_bytes
        self._max_pending = cfg.max_pending
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="mqtt-req")
        self._log = ThrottledLog(log)
        link.subscribe(topics[0], self._on_predict, max_bytes=cfg.max_request_bytes,
                       on_oversize=self._on_oversize)
        link.subscribe(topics[1], self._on_feedback)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ paho thread

    def _on_predict(self, topic: str, payload: bytes) -> None:
        self._dispatch(topic, payload, self._serve_predict)

    def _on_oversize(self, topic: str, payload: bytes) -> None:
        # Answered from a scan of the bytes: a document this large is never parsed.
        self.predictor.refused("mqtt", ErrorCode.BAD_REQUEST.value)
        found = scan_envelope(payload)
        if found is None:
            return
        request_id, reply_to = found
        try:
            reply_to = check_reply_topic(reply_to)
        except ProtocolError:
            return
        limit = self._max_request_bytes
        self.link.publish(reply_to, encode(error_reply(request_id, RequestError(
            ErrorCode.BAD_REQUEST, f"the request is {len(payload)} bytes, over this device's"
            f" limit of {limit} (requests.max_request_bytes)",
            hint="send fewer rows per request, or use the HTTP API"))))

    def _on_feedback(self, topic: str, payload: bytes) -> None:
        self._dispatch(topic, payload, self._serve_feedback)

    def _dispatch(self, topic: str, payload: bytes, serve: Any) -> None:
        with self._pending_lock:
            busy = self._pending >= self._max_pending
            if not busy:
                self._pending += 1
        if busy:
            self.predictor.refused("mqtt", ErrorCode.BUSY.value)
            self._answer_error(topic, payload, RequestError(
                ErrorCode.BUSY, f"{self._max_pending} requests are waiting; try again later"))
            return
        try:
            self._pool.submit(self._run, serve, topic, payload)
        except RuntimeError:  # the pool is shut down: the agent is stopping
            self._done()

    def _run(self, serve: Any, topic: str, payload: bytes) -> None:
        try:
            serve(topic, payload)
        except Exception:
            log.exception("request on %s failed", topic)
        finally:
            self._done()

    def _done(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    # ------------------------------------------------------------------ workers

    def _serve_predict(self, topic: str, payload: bytes) -> None:
        doc, request_id, reply_to = self._envelope(topic, payload, PredictRequest)
        if reply_to is None:
            self.predictor.refused("mqtt", ErrorCode.BAD_REQUEST.value)
            return
        try:
            if isinstance(doc, Exception):
                raise doc
            prediction = self.predictor.predict(inputs_from_request(doc), "mqtt")
            reply = prediction_reply(prediction, request_id, doc.outputs or "lists")
        except Exception as exc:
            code, _status, message = describe(exc)
            if not isinstance(exc, InputError | RequestError):
                # Predictor.predict counts refusals it makes; the rest are counted here.
                self.predictor.refused("mqtt", code.value)
            if code == ErrorCode.INTERNAL and not isinstance(exc, RequestError):
                log.exception("request %s failed", request_id)
            else:
                self._log.warn(topic, "refused request %r on %s: %s", request_id, topic, message)
            reply = error_reply(request_id, exc)
        self.link.publish(reply_to, encode(reply))

    def _serve_feedback(self, topic: str, payload: bytes) -> None:
        doc, request_id, reply_to = self._envelope(topic, payload, FeedbackMessage,
                                                   reply_required=False)
        if isinstance(doc, Exception) and reply_to is None:
            self.predictor.feedback_refused()
            self._log.warn(topic + "#feedback", "refused feedback on %s: %s", topic, doc)
            return
        reply = FeedbackReply(request_id=request_id, ok=True)
        try:
            if isinstance(doc, Exception):
                raise doc
            self.predictor.feedback(doc.prediction_id, doc.label, doc.labels)
        except Exception as exc:
            if not isinstance(exc, RequestError):
                self.predictor.feedback_refused()
            reply.ok = False
            reply.error = error_info(exc)
            self._log.warn(topic, "refused feedback on %s: %s", topic, reply.error.message)
        if reply_to is not None:
            self.link.publish(reply_to, encode(reply))

    def _envelope(self, topic: str, payload: bytes, cls: type[R], *,
                  reply_required: bool = True) -> tuple[R | ProtocolError, str, str | None]:
        """Decode a request, and know whom to answer even when it does not decode.

        Returns (document or the ProtocolError that refuses it, request id, reply topic);
        the reply topic is None when the request names no usable one (it is logged).
        """
        try:
            doc = decode(payload, cls)
        except ProtocolError as exc:
            request_id, reply_to = self._return_address(topic, payload, cls, reply_required)
            return exc, request_id, reply_to
        if doc.reply_to is None and not reply_required:
            return doc, doc.request_id, None
        try:
            reply_to = check_reply_topic(doc.reply_to)
        except ProtocolError as exc:
            return self._unanswerable(topic, exc.message), doc.request_id, None
        if cls is PredictRequest and not doc.request_id:
            return ProtocolError("request_id must be a string of 1 to 128 characters"), "", \
                reply_to
        return doc, doc.request_id, reply_to

    def _return_address(self, topic: str, payload: bytes, cls: type[Document],
                        reply_required: bool) -> tuple[str, str | None]:
        """The request id and reply topic of a request that does not fit its schema, read
        leniently so that the sender hears why; ("", None) when there is none to read."""
        if len(payload) > cls.max_bytes:
            self._unanswerable(topic, f"{len(payload)} bytes, over the {cls.max_bytes}-byte"
                               " limit")
            return "", None
        try:
            found = _address_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._unanswerable(topic, f"not a JSON object ({str(exc)[:200]})")
            return "", None
        request_id = found.request_id if isinstance(found.request_id, str) and \
            len(found.request_id) <= MAX_REQUEST_ID else ""
        if found.reply_to is None and not reply_required:
            return request_id, None
        try:
            return request_id, check_reply_topic(found.reply_to)
        except ProtocolError as exc:
            self._unanswerable(topic, exc.message)
            return request_id, None

    def _unanswerable(self, topic: str, why: str) -> ProtocolError:
        self._log.warn(topic, "ignored a message on %s that cannot be answered: %s", topic, why)
        return ProtocolError(why)

    def _answer_error(self, topic: str, payload: bytes, exc: Exception) -> None:
        request_id, reply_to = self._return_address(topic, payload, PredictRequest, True)
        if reply_to is None:
            self._log.warn(topic, "dropped a message on %s while busy", topic)
            return
        self.link.publish(reply_to, encode(error_reply(request_id, exc)))
