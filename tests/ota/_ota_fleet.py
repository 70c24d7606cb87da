"""Helpers for the OTA tests with real agents: the packages, a host's view of a fleet (artifact
server, desired documents, events and status), agent processes and a client that sends
requests the whole time. Fixtures that use them are in conftest.py.

Agents are real ``python -m device_agent run`` processes; the artifact server is
:class:`edgekit.host.ota.server.ArtifactServer` on a real connection. Waits poll with generous
timeouts and never assert on wall-clock time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from _ota_models import build_package, client_batch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mqtt_broker import MqttBroker, free_port, wait_until

import edgekit.protocol.ota as ota
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.deploy import desired_for_package
from edgekit.host.ota.server import ArtifactServer
from edgekit.host.ota.store import ArtifactInfo, ArtifactStore
from edgekit.protocol import Kind, subscription

REPO = Path(__file__).resolve().parents[2]
# The operator key of the OTA tests: Fleet signs desired documents with it, agents trust its
# public half (written by the pkgs fixture) as ota.intent_keys.
OPERATOR_KEY = Ed25519PrivateKey.generate()


def write_operator_key(root: Path) -> tuple[Path, Path]:
    """Write :data:`OPERATOR_KEY` as ``root/operator.pub`` and ``root/operator.key`` (PEM);
    return (public, private)."""
    from cryptography.hazmat.primitives import serialization

    public, private = root / "operator.pub", root / "operator.key"
    public.write_bytes(OPERATOR_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    private.write_bytes(OPERATOR_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return public, private


PADDING = 2_500_000  # bytes of incompressible padding: the download spans several journal records
FAST_OTA_ENV = {
    "EDGEKIT_OTA_REQUEST_TIMEOUT_S": "2",
    "EDGEKIT_OTA_STALL_TIMEOUT_S": "20",
    "EDGEKIT_OTA_CHUNK_BYTES": "131072",
    "EDGEKIT_OTA_MIN_FREE_BYTES": "0",
}



@dataclass(frozen=True)
class Packages:
    public_key: Path  # the release key's public half (packages)
    operator_key: Any  # the operator key: signs desired documents
    operator_public: Path
    operator_private: Path
    other_key: Any
    key: Any
    v1: Path
    v2: Path
    v3: Path
    older: Path
    unsigned: Path
    bad_signature: Path
    nan: Path
    slow: Path
    wide: Path
    broken: Path

    def make(self, path: Path, **kw: Any) -> Path:
        return build_package(path, sign_key=kw.pop("sign_key", self.key), **kw)


class Fleet:
    """A host's view of one fleet: an artifact server, desired documents (signed with the
    operator key), and every event and status the devices send."""

    def __init__(self, broker: MqttBroker, name: str, client: HostClient | None = None, *,
                 key: Any = None) -> None:
        self.name = name
        self.key = key if key is not None else OPERATOR_KEY
        self.host = client or HostClient(broker.url).connect()
        self.server = ArtifactServer(self.host, ArtifactStore(), fleets=[name])
        self.events: list[dict[str, Any]] = []
        self.status: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.host.subscribe(subscription(name, "+", Kind.EVENTS), self._on_event)
        self.host.subscribe(subscription(name, "+", Kind.STATUS), self._on_status)

    def _on_event(self, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        with self._lock:
            self.events.append(doc)

    def _on_status(self, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        with self._lock:
            self.status[doc.get("device", "?")] = doc

    def serve(self, path: Path) -> ArtifactInfo:
        info = self.server.serve(path)
        self.server.ensure_reachable()
        return info

    def desire(self, device: str | None, doc: ota.DesiredDocument | bytes) -> None:
        """Publish ``doc`` signed with this fleet's key (bytes: exactly as given)."""
        payload = doc if isinstance(doc, bytes) else ota.seal_desired(doc, self.key)
        self.host.publish(ota.desired_topic(self.name, device), payload, retain=True, wait=10)

    def deploy(self, device: str | None, path: Path, **kw: Any) -> ota.DesiredDocument:
        info = self.serve(path)
        kw.setdefault("probation", ota.Probation(requests=5, seconds=2.0, max_error_rate=0.0,
                                                  max_nonfinite_rate=0.0, max_latency_ms=None))
        doc = desired_for_package(info, self.name, devices=[device] if device else None, **kw)
        self.desire(device, doc)
        return doc

    def update_events(self, device: str, deployment: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("device") == device
                    and (e.get("data") or {}).get("deployment") == deployment]

    def outcome(self, device: str, deployment: str, timeout: float = 90.0) -> dict[str, Any]:
        """The final ``update.*`` event of a deployment on a device."""
        def final() -> dict[str, Any] | None:
            for e in self.update_events(device, deployment):
                if ota.step_of(e.get("kind")) in ota.FINAL_STEPS:
                    return e
            return None
        return wait_until(final, timeout, f"the outcome of {deployment} on {device}")

    def serving(self, device: str) -> dict[str, Any] | None:
        with self._lock:
            status = self.status.get(device)
        return status.get("model") if status and status.get("state") == "online" else None

    def wait_serving(self, device: str, version: str, timeout: float = 60.0) -> dict[str, Any]:
        return wait_until(lambda: (m := self.serving(device)) and m["version"] == version
                          and m, timeout, f"{device} to report serving {version}")

    def close(self) -> None:
        self.host.close()


class Agent:
    """``python -m device_agent run`` with the OTA settings of the tests."""

    def __init__(self, workdir: Path, broker: MqttBroker, fleet: str, device: str,
                 pkgs: Packages, env: dict[str, str] | None = None,
                 model: Path | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.http_port = free_port()
        self.args = ["--device-id", device, "--fleet", fleet, "--broker", broker.url,
                     "--model", str(model or pkgs.v1), "--model-dir", str(workdir / "models"),
                     "--trusted-key", str(pkgs.public_key),
                     "--intent-key", str(pkgs.operator_public),
                     "--http", f"127.0.0.1:{self.http_port}", "--telemetry-interval", "0"]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
        self.env.update(FAST_OTA_ENV)
        self.env.update(env or {})
        self.env["PYTHONUNBUFFERED"] = "1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self, env: dict[str, str] | None = None) -> None:
        full = dict(self.env)
        for key, value in (env or {}).items():
            full[key] = value
        with open(self.workdir / f"{self.device}.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "device_agent", "run", *self.args],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                         env=full)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def journal(self) -> dict[str, Any]:
        path = self.workdir / "models" / "state" / "ota" / "journal.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def predict_version(self) -> str:
        """The version of the model that answers a request now."""
        body = json.dumps({"inputs": {"x": [[0.5] * 64]}}).encode()
        req = urllib.request.Request(self.url + "/predict", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return str(json.loads(resp.read())["model"]["version"])

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout: float = 60.0) -> None:
        wait_until(lambda: self.healthy() or not self.alive(), timeout, f"{self.device} health")
        assert self.alive(), self.log()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float = 120.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        path = self.workdir / f"{self.device}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""


class LoadClient:
    """Sends predictions to an agent over HTTP the whole time; any non-200 answer or broken
    connection is a failure."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.ok = 0
        self.failures: list[str] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._rng = np.random.default_rng(0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            body = json.dumps({"inputs": {"x": client_batch(self._rng)}}).encode()
            req = urllib.request.Request(self.agent.url + "/predict", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    reply = json.loads(resp.read())
                self.ok += 1
                model = reply.get("model") or {}
                self.versions.add(str(model.get("version")))
                if any(v is None for row in reply.get("outputs", {}).get("probs", [])
                       for v in row):
                    self.failures.append(f"non-finite output from {model.get('version')}")
            except (urllib.error.URLError, OSError, ValueError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}"[:300])
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


