"""An embedded MQTT broker (amqtt) in a child process, for the demo and for trying things.

amqtt speaks MQTT 3.1.1 and has no shared subscriptions; the project's protocol works on it
unchanged (replies are named in payloads, the artifact server falls back to a plain
subscription).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from edgekit.errors import EdgekitError

__all__ = ["EmbeddedBroker", "free_port"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """``with EmbeddedBroker(folder) as broker: broker.url``"""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        """Start amqtt and wait until it accepts connections.

        Raises:
            EdgekitError: amqtt is not installed, exits, or does not open its port in time.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "amqtt.yaml"
        conf.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        with open(self.folder / "amqtt.log", "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EdgekitError(
                    f"the embedded broker exited with code {self._proc.returncode}"
                    f" (log: {self.folder / 'amqtt.log'})",
                    hint="install the host extra (pip install 'edgekit-fleet[host]'), or pass"
                    " --broker mqtt://HOST:PORT")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise EdgekitError(f"the embedded broker did not open port {self.port} in {timeout:.0f} s")

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
