"""Run the console: uvicorn in a thread of the process that owns it, stopped cleanly."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import uvicorn

from edgekit.errors import EdgekitError, UsageError
from edgekit.host.console._actions import Submitter
from edgekit.host.console._app import ConsoleContext, create_app
from edgekit.host.console._auth import check_hash, hash_password
from edgekit.host.console._live import ChangeFeed
from edgekit.host.db import Store
from edgekit.host.mqtt_client import HostClient
from edgekit.signing import load_private_key

__all__ = ["PASSWORD_ENV", "ConsoleServer", "parse_listen"]

log = logging.getLogger("edgekit.console")

PASSWORD_ENV = "EDGEKIT_CONSOLE_PASSWORD"
_START_TIMEOUT_S = 15.0


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as a pair.

    Raises:
        UsageError: not HOST:PORT with a port in 0..65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"{text!r} is not HOST:PORT", hint="for example 127.0.0.1:8600")
    return host.strip("[]"), int(port)


class ConsoleServer:
    """The fleet console on ``listen``, over ``store``; with ``client`` and ``operator_key``
    (the path of the operator's private key, which signs every request) it takes actions.

    The operator's password is ``password_hash`` (scrypt, see
    :func:`~edgekit.host.console._auth.hash_password`), else ``$EDGEKIT_CONSOLE_PASSWORD``;
    with neither the console is read-only. ``with ConsoleServer(...) as console:`` starts it
    and stops it; :attr:`url` is where it listens.
    """

    def __init__(self, store: Store, listen: str, *, client: HostClient | None = None,
                 password_hash: str | None = None, operator_key: str | None = None,
                 poll_s: float = 0.5) -> None:
        """Raises: UsageError: ``listen`` is not HOST:PORT, or ``operator_key`` is not an
        Ed25519 private key. ConfigError: ``password_hash`` is not an scrypt hash."""
        self.host, self.port = parse_listen(listen)
        if password_hash:
            check_hash(password_hash)
        elif os.environ.get(PASSWORD_ENV):
            password_hash = hash_password(os.environ[PASSWORD_ENV])
        # Actions need both a way to the controller and the key that signs the requests.
        submitter = Submitter(client, load_private_key(operator_key)) \
            if client is not None and operator_key else None
        self.context = ConsoleContext(store=store, feed=ChangeFeed(store, interval=poll_s),
                                      password_hash=password_hash or None,
                                      submitter=submitter)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> ConsoleServer:
        """Start serving; return once the socket listens.

        Raises:
            EdgekitError: the address cannot be bound (in use, not this machine's).
        """
        self.context.feed.start()
        config = uvicorn.Config(create_app(self.context), host=self.host, port=self.port,
                                log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        server = uvicorn.Server(config)
        self._server = server
        failed: list[BaseException] = []

        def run() -> None:
            try:
                server.run()
            except BaseException as exc:  # SystemExit from uvicorn when it cannot bind
                failed.append(exc)

        self._thread = threading.Thread(target=run, name="edgekit-console", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not server.started:
            if failed or not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise EdgekitError(f"the console could not listen on {self.host}:{self.port}",
                                   hint="pick another --console address (port 0: any free"
                                        " port)")
            time.sleep(0.05)
        sockets = [s for srv in server.servers for s in srv.sockets]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("console on %s", self.url)
        return self

    def stop(self) -> None:
        """Close the live streams, stop uvicorn and the polling thread."""
        self.context.closing.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10.0)
        self.context.feed.stop()

    def __enter__(self) -> ConsoleServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
