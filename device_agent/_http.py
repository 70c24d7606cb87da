"""The local HTTP API (stdlib ``http.server``; docs/agent-http.md describes it).

    POST /predict    JSON {"inputs": {...}}, or a raw .npy / .npz body
    POST /feedback   JSON {"prediction_id": ..., "label": ...}
    GET  /health     200 while a model serves, 503 otherwise
    GET  /metrics    Prometheus text

A refused request gets a JSON error body with the protocol's error code and a 4xx status;
an exception inside a handler becomes a 500 and the server goes on. Connections are served
by a fixed pool of ``http.workers`` threads, with deadlines on headers and bodies
(:mod:`._http_pool`).
"""

from __future__ import annotations

import io
import logging
import socket
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import numpy as np

from edgekit.errors import ProtocolError, UsageError
from edgekit.protocol import Document, ErrorCode, FeedbackMessage, PredictRequest, decode, encode

from ._http_pool import PooledHTTPServer
from ._http_request import FastHeadHandler
from ._inputs import inputs_from_npy, inputs_from_npz, inputs_from_request
from ._predict import Predictor
from ._replies import prediction_reply
from .config import HttpSection
from .errors import RequestError, describe

__all__ = ["HttpApi"]

log = logging.getLogger("device_agent.http")

D = TypeVar("D", bound=Document)

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


class _Server(PooledHTTPServer):
    allow_reuse_address = True
    predictor: Predictor
    cfg: HttpSection
    health: Callable[[], tuple[bool, dict[str, Any]]]
    metrics_text: Callable[[], str]


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(FastHeadHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "edgekit-agent"
    timeout = 30  # a client that stops sending does not hold a thread for ever
    # Small replies on a kept-alive connection would otherwise wait out Nagle's algorithm
    # against the client's delayed ACK (40 ms a request).
    disable_nagle_algorithm = True
    wbufsize = 1 << 16  # headers and body leave in one write (flushed after each request)

    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):  # formatted only when it is written
            log.debug("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------ routing

    def handle_one_request(self) -> None:
        deadlines = self.server.deadlines
        # keep: the first request of a connection keeps the deadline set at the accept.
        deadlines.arm(self.connection, self.server.header_timeout_s, keep=True)
        try:
            super().handle_one_request()
        finally:
            deadlines.disarm(self.connection)

    def do_GET(self) -> None:
        self.server.deadlines.disarm(self.connection)  # the headers are in
        path = _split_target(self.path)[0]
        if path == "/health":
            self._health()
        elif path == "/metrics":
            self._metrics()
        elif path in ("/predict", "/feedback"):
            self._error(ErrorCode.BAD_REQUEST, f"{path} takes POST", HTTPStatus.METHOD_NOT_ALLOWED)
        else:
            self._error(ErrorCode.BAD_REQUEST, f"no such endpoint {path}", HTTPStatus.NOT_FOUND)

    def do_POST(self) -> None:
        self.server.deadlines.disarm(self.connection)  # the headers are in
        path = _split_target(self.path)[0]
        if path not in ("/predict", "/feedback"):
            status = HTTPStatus.METHOD_NOT_ALLOWED if path in ("/health", "/metrics") else \
                HTTPStatus.NOT_FOUND
            self._drain()
            self._error(ErrorCode.BAD_REQUEST, f"no POST endpoint {path}", status)
            return
        body = self._body()
        if body is None:
            return
        try:
            if path == "/predict":
                self._predict(body)
            else:
                self._feedback(body)
        except Exception as exc:
            code, status_code, message = describe(exc)
            if code == ErrorCode.INTERNAL and not isinstance(exc, RequestError):
                log.exception("HTTP %s failed", path)
            if path == "/predict" and code in (ErrorCode.BAD_REQUEST, ErrorCode.INTERNAL):
                # InputError and no_model are counted by Agent.predict itself.
                self.server.predictor.refused("http", code.value)
            self._error(code, message, HTTPStatus(status_code))

    # ------------------------------------------------------------------ endpoints

    def _predict(self, body: bytes) -> None:
        predictor = self.server.predictor
        model = predictor.model
        query = _split_target(self.path)[1]
        mode = parse_qs(query).get("outputs", ["lists"])[0] if query else "lists"
        kind = self._content_kind(body)
        if kind == "npy":
            if model is None:
                raise RequestError(ErrorCode.NO_MODEL, "no model is active on this device")
            feeds = inputs_from_npy(body, model.manifest.inputs)
        elif kind == "npz":
            feeds = inputs_from_npz(body, self.server.cfg.max_body_bytes * 8)
        else:
            doc = self._decode(body, PredictRequest)
            mode = doc.outputs or mode
            feeds = inputs_from_request(doc)
        if mode not in ("lists", "encoded", "none"):
            raise ProtocolError(f"outputs={mode!r}: use lists, encoded or none")
        prediction = predictor.predict(feeds, "http")
        if "application/x-npz" in self.fields.get("accept", ""):
            buf = io.BytesIO()
            np.savez(buf, **prediction.outputs)  # type: ignore[arg-type]
            self._send(HTTPStatus.OK, buf.getvalue(), "application/x-npz",
                       {"X-Prediction-Id": prediction.id,
                        "X-Model": f"{prediction.model.name} {prediction.model.version}"})
            return
        reply = prediction_reply(prediction, self.fields.get("x-request-id", ""), mode)
        self._send(HTTPStatus.OK, encode(reply), "application/json")

    def _feedback(self, body: bytes) -> None:
        doc = self._decode(body, FeedbackMessage)
        count = self.server.predictor.feedback(doc.prediction_id, doc.label, doc.labels)
        self._send(HTTPStatus.OK, encode({"ok": True, "labelled": count}), "application/json")

    def _health(self) -> None:
        serving, doc = self.server.health()
        status = HTTPStatus.OK if serving else HTTPStatus.SERVICE_UNAVAILABLE
        self._send(status, encode(doc), "application/json")

    def _metrics(self) -> None:
        text = self.server.metrics_text()
        self._send(HTTPStatus.OK, text.encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ plumbing

    def _decode(self, body: bytes, cls: type[D]) -> D:
        """A JSON body as a ``cls`` document (the URL says what it is: ``schema`` optional).

        Raises:
            ProtocolError: not JSON, or it does not fit ``cls``.
        """
        return decode(body, cls, max_bytes=self.server.cfg.max_body_bytes,
                      require_schema=False)

    def _content_kind(self, body: bytes) -> str:
        ctype = self.fields.get("content-type", "").split(";")[0].strip().lower()
        if ctype in ("application/x-npy", "application/npy") or (
                ctype in ("", "application/octet-stream") and body.startswith(_NPY_MAGIC)):
            return "npy"
        if ctype in ("application/x-npz", "application/npz", "application/zip") or (
                ctype in ("", "application/octet-stream") and body.startswith(_ZIP_MAGIC)):
            return "npz"
        return "json"

    def _body(self) -> bytes | None:
        if "chunked" in self.fields.get("transfer-encoding", "").lower():
            self.close_connection = True
            self._error(ErrorCode.BAD_REQUEST, "chunked bodies are not accepted; send"
                        " Content-Length", HTTPStatus.LENGTH_REQUIRED)
            return None
        raw = self.fields.get("content-length")
        try:
            length = int(raw) if raw is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._error(ErrorCode.BAD_REQUEST, "Content-Length is missing or invalid",
                        HTTPStatus.LENGTH_REQUIRED)
            return None
        limit = self.server.cfg.max_body_bytes
        if length > limit:
            self.close_connection = True  # the body is not read, so the connection is done
            self._error(ErrorCode.BAD_REQUEST, f"the body is {length} bytes, over the limit of"
                        f" {limit} (http.max_body_bytes)", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return None
        deadlines = self.server.deadlines
        deadlines.arm(self.connection, self.server.body_timeout_s)
        try:
            body = self.rfile.read(length)
        finally:
            deadlines.disarm(self.connection)
        if len(body) != length:
            self.close_connection = True
            return None
        return body

    def _drain(self) -> None:
        try:
            length = int(self.fields.get("content-length") or 0)
        except ValueError:
            length = 0
        if 0 < length <= self.server.cfg.max_body_bytes:
            self.server.deadlines.arm(self.connection, self.server.body_timeout_s)
            self.rfile.read(length)
        elif length:
            self.close_connection = True

    def _error(self, code: ErrorCode, message: str, status: HTTPStatus) -> None:
        body = encode({"ok": False, "error": {"code": code.value, "message": message}})
        self._send(status, body, "application/json")

    def _send(self, status: HTTPStatus, body: bytes, ctype: str,
              headers: dict[str, str] | None = None) -> None:
        # The head as the stdlib's send_response and send_header write it, in one string.
        self.log_request(status)
        head = ""
        if self.request_version != "HTTP/0.9":
            head = (f"{self.protocol_version} {status.value} {status.phrase}\r\n"
                    f"Server: {self.version_string()}\r\nDate: {_http_date()}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n")
            for key, value in (headers or {}).items():
                head += f"{key}: {value}\r\n"
            if self.close_connection:
                head += "Connection: close\r\n"
            head += "\r\n"
        try:
            self.wfile.write(head.encode("latin-1", "strict") + body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _split_target(target: str) -> tuple[str, str]:
    """The path and the query of a request target; ``urlsplit`` only where the target is
    more than ``/path?query`` (an absolute URL, a fragment)."""
    if target.startswith("/") and "#" not in target:
        path, _, query = target.partition("?")
        return path, query
    parts = urlsplit(target)
    return parts.path, parts.query


_date: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date field's value, formatted once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True))
    return _date[1]


class HttpApi:
    """The server bound to ``listen``; :meth:`serve` runs it (in a thread). Requests go to
    ``predictor``; ``health`` returns (whether a model serves, the /health document) and
    ``metrics_text`` the Prometheus text."""

    def __init__(self, predictor: Predictor, cfg: HttpSection, listen: tuple[str, int],
                 health: Callable[[], tuple[bool, dict[str, Any]]],
                 metrics_text: Callable[[], str]) -> None:
        """Raises: UsageError: the address cannot be bound (in use, no permission)."""
        host, port = listen
        server_cls = _Server6 if ":" in host else _Server
        try:
            self._server = server_cls((host, port), _Handler, workers=cfg.workers,
                                      header_timeout_s=cfg.header_timeout_s,
                                      body_timeout_s=cfg.body_timeout_s)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}",
                             hint="choose another http.listen address") from exc
        self._server.predictor = predictor
        self._server.cfg = cfg
        self._server.health = health
        self._server.metrics_text = metrics_text
        bound_host, bound_port = self._server.server_address[:2]
        host_text = bound_host.decode() if isinstance(bound_host, bytes) else str(bound_host)
        shown = f"[{host_text}]" if ":" in host_text else host_text
        self.address = f"{shown}:{bound_port}"

    def serve(self) -> None:
        self._server.serve_forever(poll_interval=0.5)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
