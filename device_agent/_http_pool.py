"""A bounded HTTP server: a fixed pool of worker threads and deadlines on slow clients.

``ThreadingHTTPServer`` starts one thread per connection, so a few hundred idle or half-open
connections make a few hundred threads. :class:`PooledHTTPServer` accepts on one thread and
hands each connection to one of ``workers`` threads through a queue of ``4 * workers``; when
the queue is full a new connection is closed at once (and counted). A :class:`Deadlines`
reaper shuts down the socket of a connection that has not sent its request line and headers
within ``header_timeout_s`` of being accepted or of its previous request (so an idle
keep-alive connection also frees its worker), or its body within ``body_timeout_s``: a slow
client can hold a worker only for that long, whatever pace it sends at.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from http.server import HTTPServer
from typing import Any

__all__ = ["Deadlines", "PooledHTTPServer"]

log = logging.getLogger("device_agent.http")

_QUEUE_PER_WORKER = 4
_REAP_EVERY_S = 0.25


class Deadlines:
    """Sockets with a time by which their current read must be done; a reaper thread shuts
    down the ones past it, which ends the blocked read in the worker (it sees EOF)."""

    def __init__(self) -> None:
        self._due: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.expired = 0
        self._thread = threading.Thread(target=self._reap, name="http-deadlines", daemon=True)
        self._thread.start()

    def arm(self, sock: socket.socket, seconds: float, *, keep: bool = False) -> None:
        """Give ``sock`` until ``seconds`` from now; with ``keep``, an earlier deadline
        already set stays."""
        due = time.monotonic() + seconds
        with self._lock:
            if keep and sock in self._due:
                return
            self._due[sock] = due

    def disarm(self, sock: socket.socket) -> None:
        with self._lock:
            self._due.pop(sock, None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _reap(self) -> None:
        while not self._stop.wait(_REAP_EVERY_S):
            now = time.monotonic()
            with self._lock:
                late = [s for s, due in self._due.items() if due <= now]
                for sock in late:
                    del self._due[sock]
            for sock in late:
                self.expired += 1
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by its worker


class PooledHTTPServer(HTTPServer):
    """``HTTPServer`` with a fixed worker pool and header/body deadlines (see the module)."""

    def __init__(self, address: tuple[str, int], handler: Any, *, workers: int,
                 header_timeout_s: float, body_timeout_s: float) -> None:
        # Everything server_close() needs exists before the bind: socketserver calls it when
        # the bind fails (an address in use), and the caller then gets the OSError.
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.deadlines = Deadlines()
        self.refused = 0
        self._queue: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue(
            maxsize=_QUEUE_PER_WORKER * workers)
        self._workers = [threading.Thread(target=self._work, name=f"http-{i}", daemon=True)
                         for i in range(workers)]
        super().__init__(address, handler)
        for thread in self._workers:
            thread.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        # The header deadline runs from the accept, so waiting in the queue counts too.
        self.deadlines.arm(request, self.header_timeout_s)
        try:
            self._queue.put_nowait((request, client_address))
        except queue.Full:
            self.deadlines.disarm(request)
            self.refused += 1
            if self.refused == 1 or self.refused % 100 == 0:
                log.warning("HTTP: every worker is busy and %d connections wait; closed a new"
                            " one (%d so far; http.workers)", self._queue.maxsize, self.refused)
            self.shutdown_request(request)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.deadlines.disarm(request)
                self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("HTTP connection from %s ended with an error", client_address, exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        while True:  # connections still waiting are closed unanswered
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
        for _ in self._workers:
            self._queue.put_nowait(None)
        self.deadlines.close()
