"""The HTTP(S) artifact server: ``GET``/``HEAD /artifacts/<sha256>`` with single Range requests."""

from __future__ import annotations

import logging
import re
import ssl
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edgekit.errors import ArtifactError, UsageError
from edgekit.host.ota.store import ArtifactStore

__all__ = ["ArtifactHttpServer", "parse_range"]

log = logging.getLogger("edgekit.protocol.ota.http")

_PATH_RE = re.compile(r"^/artifacts/([0-9a-f]{64})$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_BLOCK = 256 * 1024


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """The byte range ``[start, end)`` a ``Range`` header asks for.

    Returns None to serve the whole file (no header, a header this server ignores as RFC 9110
    allows: another unit, several ranges, bad syntax), or False when the range cannot be
    satisfied (416).
    """
    if not header:
        return None
    match = _RANGE_RE.match(header.strip())
    if not match or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":
        suffix = int(last)
        return (max(0, size - suffix), size) if suffix > 0 and size > 0 else False
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or end <= start:
        return False
    return start, end


class ArtifactHttpServer:
    """Serves an :class:`ArtifactStore` over HTTP, or HTTPS with ``certfile``/``keyfile``.

    ``public_url`` is the base URL devices use (default: the bound address), which matters
    when the server listens on 0.0.0.0 or sits behind a proxy.
    """

    def __init__(self, store: ArtifactStore, host: str = "127.0.0.1", port: int = 0, *,
                 certfile: str | None = None, keyfile: str | None = None,
                 public_url: str | None = None) -> None:
        handler = type("_Handler", (_Handler,), {"store": store})
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}",
                             hint="choose another --http address or port") from exc
        self._server.daemon_threads = True
        scheme = "http"
        if certfile:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile, keyfile)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            scheme = "https"
        bound_host, bound_port = str(self._server.server_address[0]), self.port
        self.base_url = (public_url or f"{scheme}://{bound_host}:{bound_port}").rstrip("/")
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url_for(self, sha256: str) -> str:
        return f"{self.base_url}/artifacts/{sha256}"

    def start(self) -> ArtifactHttpServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="artifact-http",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    store: ArtifactStore
    protocol_version = "HTTP/1.1"

    def do_HEAD(self) -> None:  # noqa: N802  (the name http.server calls)
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        match = _PATH_RE.match(self.path.split("?", 1)[0])
        info = self.store.get(match.group(1)) if match else None
        if info is None:
            self._plain(HTTPStatus.NOT_FOUND, "no such artifact\n")
            return
        wanted = parse_range(self.headers.get("Range"), info.size)
        if wanted is False:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{info.size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = wanted if isinstance(wanted, tuple) else (0, info.size)
        status = HTTPStatus.PARTIAL_CONTENT if isinstance(wanted, tuple) else HTTPStatus.OK
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{info.sha256}"')
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{info.size}")
        self.end_headers()
        if not body:
            return
        offset = start
        try:
            while offset < end:
                _, data = self.store.read(info.sha256, offset, min(_BLOCK, end - offset))
                if not data:
                    break
                self.wfile.write(data)
                offset += len(data)
        except (ArtifactError, KeyError, OSError) as exc:
            # Headers are out; closing short is how HTTP says the body is incomplete.
            log.warning("stopped sending %s: %s", info.sha256[:12], exc)
            self.close_connection = True

    def _plain(self, status: HTTPStatus, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)
