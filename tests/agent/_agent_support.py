"""Fixtures for the agent tests: digits packages, a real broker, agent processes, a watcher.

Agents run as real subprocesses (``python -m device_agent run ...``); the broker is a real
mosquitto (or amqtt) process; the watcher is a plain paho client. Waits poll with generous
timeouts and never assert on wall-clock time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the broker helper
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _digits import digits_data, write_digits_package  # noqa: E402
from mqtt_broker import MqttBroker, broker, wait_until  # noqa: E402,F401  (fixtures and helpers for the agent tests)

from edgekit.signing import generate_keypair, load_private_key  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Models:
    data: tuple[np.ndarray, np.ndarray]
    unsigned_v1: Path
    signed_v1: Path
    signed_v2: Path
    int8_v1: Path
    public_key: Path
    other_public_key: Path


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("models")
    data = digits_data()
    keys = generate_keypair(root / "signing")
    other = generate_keypair(root / "other")
    key = load_private_key(keys.private_path)
    return Models(
        data=data,
        unsigned_v1=write_digits_package(root / "digits-1.0.0.edgepkg", version="1.0.0", data=data),
        signed_v1=write_digits_package(root / "digits-1.0.0-signed.edgepkg", version="1.0.0",
                                       sign_key=key, data=data),
        signed_v2=write_digits_package(root / "digits-2.0.0-signed.edgepkg", version="2.0.0",
                                       alpha=300.0, sign_key=key, data=data),
        int8_v1=write_digits_package(root / "digits-int8-1.0.0.edgepkg", version="1.0.0",
                                     int8=True, name="digits-int8", data=data),
        public_key=keys.public_path,
        other_public_key=other.public_path,
    )




class Watcher:
    """A plain paho client that records every message on the filters it subscribes to."""

    def __init__(self, url: str, filters: list[str], client_id: str = "",
                 persistent: bool = False) -> None:
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()  # connected and every filter acknowledged
        self._pending: set[int] = set()
        self._filters = filters
        # A persistent session (fixed id, clean_session off) keeps the subscriptions and the
        # messages queued for it across a restart of a broker that persists sessions.
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311, clean_session=not persistent)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        self.client.connect_async(host, int(port), 30)
        self.client.loop_start()
        wait_until(self._connected.is_set, 20, "the watcher to connect")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any) -> None:
        if rc.is_failure:
            return
        with self._lock:
            self._connected.clear()
            self._pending = {client.subscribe(f, qos=1)[1] for f in self._filters}
            if not self._pending:
                self._connected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                      props: Any) -> None:
        # Messages published before the broker acknowledged a filter may never arrive.
        with self._lock:
            self._pending.discard(mid)
            if not self._pending:
                self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def docs(self, topic: str) -> list[dict[str, Any]]:
        with self._lock:
            items = [p for t, p, _ in self.messages if t == topic]
        out = []
        for payload in items:
            try:
                doc = json.loads(payload)
            except (ValueError, RecursionError):
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out

    def last(self, topic: str) -> dict[str, Any] | None:
        docs = self.docs(topic)
        return docs[-1] if docs else None

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def watcher_factory() -> Iterator[Callable[..., Watcher]]:
    made: list[Watcher] = []

    def make(url: str, filters: list[str], client_id: str = "",
             persistent: bool = False) -> Watcher:
        w = Watcher(url, filters, client_id, persistent)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


class AgentProcess:
    """``python -m device_agent run ARGS`` with its stderr in a file."""

    def __init__(self, args: list[str], workdir: Path, env: dict[str, str] | None = None,
                 name: str = "agent") -> None:
        self.log_path = workdir / f"{name}.log"
        self.args = args
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
        full_env.update(env or {})
        full_env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "device_agent", "run", *args],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                         env=full_env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(20)

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture
def agents() -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(args: list[str], workdir: Path, env: dict[str, str] | None = None,
              name: str = "agent") -> AgentProcess:
        proc = AgentProcess(args, workdir, env, name)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.alive():
            proc.proc.kill()
            proc.proc.wait(20)


def run_agent_cli(args: list[str], env: dict[str, str] | None = None,
                  timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "device_agent", *args], capture_output=True,
                          text=True, cwd=REPO, env=full_env, timeout=timeout)
