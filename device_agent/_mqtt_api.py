"""MQTT request/response: ``predict`` and ``feedback`` topics of the device.

A request names its reply topic and carries its request id in the payload (no MQTT 5
properties needed, so MQTT 3.1.1 brokers work). Requests are answered by a small thread
pool; past ``requests.max_pending`` waiting requests the agent answers ``busy`` at once.
Whatever arrives, the agent logs it (at most once a second per topic, with a count of the
ones not logged), counts it, answers when it can, and goes on.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from edgekit.errors import InputError, ProtocolError
from edgekit.protocol import (
    ErrorCode,
    FeedbackReply,
    Kind,
    Schema,
    encode,
    parse_topic,
)

from ._inputs import inputs_from_json
from ._limits import scan_envelope
from ._mqtt import ThrottledLog
from ._replies import error_reply, prediction_reply
from .errors import RequestError, describe

if TYPE_CHECKING:
    from ._agent import Agent
    from ._mqtt import MqttLink

__all__ = ["MqttApi", "check_reply_topic"]

log = logging.getLogger("device_agent.mqtt")

_MAX_ID = 128
_MAX_TOPIC = 512
# Kinds a reply may never be published to: it would forge telemetry or loop into requests.
_FORBIDDEN_REPLY_KINDS = {k.value for k in Kind} - {Kind.REPLY.value}


def check_reply_topic(value: Any) -> str:
    """A usable reply topic.

    Raises:
        ProtocolError: not a string, empty, too long, a wildcard, a ``$`` system topic, or a
            topic of the edgekit tree other than a ``reply`` one.
    """
    if not isinstance(value, str) or not value or len(value) > _MAX_TOPIC:
        raise ProtocolError("reply_to must be a topic name of 1 to 512 characters")
    if "+" in value or "#" in value or "\x00" in value or value.startswith("$"):
        raise ProtocolError(f"reply_to {value!r} is a wildcard or a system topic")
    parts = parse_topic(value)
    if parts is not None and parts.kind in _FORBIDDEN_REPLY_KINDS:
        raise ProtocolError(f"reply_to {value!r} is a {parts.kind} topic; replies go elsewhere,"
                            " e.g. edgekit/v1/<fleet>/<device>/reply/<client>")
    return value


class MqttApi:
    def __init__(self, agent: Agent, link: MqttLink) -> None:
        self.agent = agent
        self.link = link
        cfg = agent.config.requests
        self._max_pending = cfg.max_pending
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="mqtt-req")
        self._log = ThrottledLog(log)
        link.subscribe(agent.topic(Kind.PREDICT), self._on_predict,
                       max_bytes=cfg.max_request_bytes, on_oversize=self._on_oversize)
        link.subscribe(agent.topic(Kind.FEEDBACK), self._on_feedback)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ paho thread

    def _on_predict(self, topic: str, payload: bytes) -> None:
        self._dispatch(topic, payload, self._serve_predict)

    def _on_oversize(self, topic: str, payload: bytes) -> None:
        # Answered from a scan of the bytes: a document this large is never parsed.
        self.agent.stats.error("mqtt", ErrorCode.BAD_REQUEST.value)
        found = scan_envelope(payload)
        if found is None:
            return
        request_id, reply_to = found
        try:
            reply_to = check_reply_topic(reply_to)
        except ProtocolError:
            return
        limit = self.agent.config.requests.max_request_bytes
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
            self.agent.stats.error("mqtt", ErrorCode.BUSY.value)
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
        doc, request_id, reply_to = self._envelope(topic, payload, Schema.PREDICT_REQUEST)
        if reply_to is None:
            self.agent.stats.error("mqtt", ErrorCode.BAD_REQUEST.value)
            return
        try:
            if isinstance(doc, Exception):
                raise doc
            mode = doc.get("outputs", "lists")
            if mode not in ("lists", "encoded", "none"):
                raise ProtocolError(f"outputs={mode!r}: use lists, encoded or none")
            prediction = self.agent.predict(inputs_from_json(doc), channel="mqtt")
            reply = prediction_reply(prediction, request_id, mode)
        except Exception as exc:
            code, _status, message = describe(exc)
            if not isinstance(exc, InputError | RequestError):
                # Agent.predict counts refusals it makes; the rest are counted here.
                self.agent.stats.error("mqtt", code.value)
            if code == ErrorCode.INTERNAL and not isinstance(exc, RequestError):
                log.exception("request %s failed", request_id)
            else:
                self._log.warn(topic, "refused request %r on %s: %s", request_id, topic, message)
            reply = error_reply(request_id, exc)
        self.link.publish(reply_to, encode(reply))

    def _serve_feedback(self, topic: str, payload: bytes) -> None:
        doc, request_id, reply_to = self._envelope(topic, payload, Schema.FEEDBACK,
                                                   reply_required=False)
        if isinstance(doc, Exception) and reply_to is None:
            self.agent.window.rejected()
            self._log.warn(topic + "#feedback", "refused feedback on %s: %s", topic, doc)
            return
        reply = FeedbackReply(schema=Schema.FEEDBACK_REPLY.value, request_id=request_id, ok=True)
        try:
            if isinstance(doc, Exception):
                raise doc
            self.agent.feedback(doc.get("prediction_id"),  # type: ignore[arg-type]
                                label=doc.get("label"), labels=doc.get("labels"))
        except Exception as exc:
            if not isinstance(exc, RequestError):
                self.agent.window.rejected()
            code, _status, message = describe(exc)
            self._log.warn(topic, "refused feedback on %s: %s", topic, message)
            reply["ok"] = False
            reply["error"] = {"code": code.value, "message": message}
        if reply_to is not None:
            self.link.publish(reply_to, encode(reply))

    def _envelope(self, topic: str, payload: bytes, schema: Schema, *,
                  reply_required: bool = True) -> tuple[Any, str, str | None]:
        """Parse a request far enough to know whom to answer.

        Returns (document or the ProtocolError that refuses it, request id, reply topic);
        the reply topic is None when the request names no usable one (it is logged).
        """
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return self._unanswerable(topic, f"not valid JSON ({str(exc)[:200]})"), "", None
        if not isinstance(doc, dict):
            return self._unanswerable(topic, f"a JSON {type(doc).__name__}, not an object"), "", None
        request_id = doc.get("request_id", "")
        if not isinstance(request_id, str) or len(request_id) > _MAX_ID:
            request_id = ""
        reply_to: str | None = None
        if "reply_to" in doc or reply_required:
            try:
                reply_to = check_reply_topic(doc.get("reply_to"))
            except ProtocolError as exc:
                return self._unanswerable(topic, exc.message), request_id, None
        if doc.get("schema") != schema.value:
            return ProtocolError(f"schema {doc.get('schema')!r} is not {schema.value!r}",
                                 hint="see docs/protocol.md"), request_id, reply_to
        if schema == Schema.PREDICT_REQUEST and not request_id:
            return ProtocolError("request_id must be a string of 1 to 128 characters"), \
                request_id, reply_to
        return doc, request_id, reply_to

    def _unanswerable(self, topic: str, why: str) -> ProtocolError:
        self._log.warn(topic, "ignored a message on %s that cannot be answered: %s", topic, why)
        return ProtocolError(why)

    def _answer_error(self, topic: str, payload: bytes, exc: Exception) -> None:
        try:
            doc = json.loads(payload)
            reply_to = check_reply_topic(doc.get("reply_to"))
            request_id = doc.get("request_id") if isinstance(doc.get("request_id"), str) else ""
        except (ValueError, UnicodeDecodeError, RecursionError, AttributeError, ProtocolError):
            self._log.warn(topic, "dropped a message on %s while busy", topic)
            return
        self.link.publish(reply_to, encode(error_reply(str(request_id)[:_MAX_ID], exc)))
