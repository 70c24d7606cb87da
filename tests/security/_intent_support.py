"""Helpers of the signed-intent attack tests: real packages, real agents, a host view and an
attacker's anonymous MQTT client. Fixtures that use them are in conftest.py.

Packages hold a real ONNX linear classifier (``x [batch, 8]`` -> ``probs [batch, 3]``) with
golden samples computed by onnxruntime, signed with the release key. Agents are real
``python -m device_agent run`` processes that trust the release key for packages and the
operator key for intents; nothing here is mocked.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mqtt_broker import MqttBroker, free_port, wait_until
from paho.mqtt.enums import CallbackAPIVersion

import edgekit.protocol.ota as ota
from edgekit.artifact import golden_to_npz, write_package
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.deploy import desired_for_package
from edgekit.host.ota.server import ArtifactServer
from edgekit.host.ota.store import ArtifactInfo, ArtifactStore
from edgekit.manifest import Manifest, TensorSpec
from edgekit.protocol import Kind, subscription

REPO = Path(__file__).resolve().parents[2]
FAST_OTA_ENV = {"EDGEKIT_OTA_REQUEST_TIMEOUT_S": "2", "EDGEKIT_OTA_STALL_TIMEOUT_S": "20",
                "EDGEKIT_OTA_MIN_FREE_BYTES": "0"}
QUICK = ota.Probation(requests=0, seconds=0.5, max_error_rate=0.0, max_nonfinite_rate=0.0,
                      max_latency_ms=None)


def build_package(path: Path, *, name: str, version: str, seed: int,
                  sign_key: Ed25519PrivateKey | None) -> Path:
    """A signed package of a small real ONNX classifier."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    golden_x = rng.uniform(-1, 1, size=(4, 8)).astype(np.float32)
    golden_y = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(
        ["probs"], {"x": golden_x})[0]
    manifest = Manifest(
        name=name, version=version, created="2026-01-01T00:00:00+00:00",
        task="classification", source={"framework": "onnx", "sha256": None},
        target={"format": "onnx", "model_file": "model.onnx", "runtime": "onnxruntime"},
        inputs=[TensorSpec("x", "float32", ["batch", 8])],
        outputs=[TensorSpec("probs", "float32", ["batch", 3])],
        recipe={"quantize": "none"}, tools={"edgekit": "test"},
        golden={"atol": 1e-4, "rtol": 1e-3, "samples": 4}, labels=["a", "b", "c"])
    write_package(path, manifest, {"model.onnx": data,
                                   "golden.npz": golden_to_npz({"x": golden_x},
                                                               {"probs": golden_y})},
                  sign_key=sign_key)
    return path


@dataclass(frozen=True)
class Packages:
    """digits 1.0.0 / 2.0.0 / 3.0.0 and ``other`` 0.0.1, all signed by the release key."""

    digits1: Path
    digits2: Path
    digits3: Path
    other: Path


@dataclass(frozen=True)
class Keys:
    """The two roles: release (packages) and operator (intents), and a stranger's key."""

    release: Ed25519PrivateKey
    release_pub: Path
    operator: Ed25519PrivateKey
    operator_key: Path
    operator_pub: Path
    stranger: Ed25519PrivateKey


class Host:
    """The host's side of one fleet: an artifact server, signed desired documents, and every
    event and status the devices send."""

    def __init__(self, broker: MqttBroker, fleet: str, keys: Keys) -> None:
        self.fleet = fleet
        self.keys = keys
        self.client = HostClient(broker.url).connect()
        self.server = ArtifactServer(self.client, ArtifactStore(), fleets=[fleet])
        self.events: list[dict[str, Any]] = []
        self.status: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.client.subscribe(subscription(fleet, "+", Kind.EVENTS), self._on_event)
        self.client.subscribe(subscription(fleet, "+", Kind.STATUS), self._on_status)

    def _on_event(self, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.events.append(json.loads(msg.payload))

    def _on_status(self, msg: mqtt.MQTTMessage) -> None:
        if msg.payload:
            doc = json.loads(msg.payload)
            with self._lock:
                self.status[str(doc.get("device"))] = doc

    def serve(self, path: Path) -> ArtifactInfo:
        info = self.server.serve(path)
        self.server.ensure_reachable()
        return info

    def document(self, path: Path, devices: list[str] | None, **kw: Any) -> ota.DesiredDocument:
        kw.setdefault("probation", QUICK)
        return desired_for_package(self.serve(path), self.fleet, devices=devices, **kw)

    def publish(self, device: str | None, payload: bytes) -> None:
        self.client.publish(ota.desired_topic(self.fleet, device), payload, retain=True,
                            wait=10)

    def sign(self, doc: ota.DesiredDocument, key: Ed25519PrivateKey | None = None) -> bytes:
        return ota.seal_desired(doc, key or self.keys.operator)

    def refusals(self, device: str, reason: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("device") == device
                    and e.get("kind") == "update.failed" and e.get("reason") == reason]

    def outcome(self, device: str, deployment: str, timeout: float = 90.0) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            with self._lock:
                for e in self.events:
                    if e.get("device") == device and (e.get("data") or {}).get(
                            "deployment") == deployment and \
                            ota.step_of(e.get("kind")) in ota.FINAL_STEPS:
                        return e
            return None
        return wait_until(final, timeout, f"the outcome of {deployment} on {device}")

    def serving(self, device: str) -> dict[str, Any] | None:
        with self._lock:
            status = self.status.get(device)
        return status.get("model") if status and status.get("state") == "online" else None

    def wait_serving(self, device: str, name: str, version: str,
                     timeout: float = 90.0) -> None:
        wait_until(lambda: (m := self.serving(device)) is not None
                   and (m["name"], m["version"]) == (name, version), timeout,
                   f"{device} to serve {name} {version}")

    def close(self) -> None:
        self.client.close()


class Agent:
    """A real agent process that trusts the release key for packages and the operator key
    for desired documents."""

    def __init__(self, workdir: Path, broker: MqttBroker, fleet: str, device: str,
                 keys: Keys, model: Path, extra: list[str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.device = workdir, device
        self.args = ["--device-id", device, "--fleet", fleet, "--broker", broker.url,
                     "--model", str(model), "--model-dir", str(workdir / "models"),
                     "--trusted-key", str(keys.release_pub),
                     "--intent-key", str(keys.operator_pub),
                     "--http", f"127.0.0.1:{free_port()}", "--telemetry-interval", "0",
                     *(extra or [])]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
        self.env.update(FAST_OTA_ENV, PYTHONUNBUFFERED="1")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.workdir / "agent.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "device_agent", "run",
                                          *self.args], stdout=log, stderr=subprocess.STDOUT,
                                         cwd=REPO, env=self.env)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        path = self.workdir / "agent.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""


class Attacker:
    """An anonymous MQTT client with no key: it can publish anything anywhere the broker
    lets it, and read every retained document."""

    def __init__(self, broker: MqttBroker) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="attacker",
                                  protocol=mqtt.MQTTv311)
        self.received: dict[str, list[bytes]] = {}
        self._lock = threading.Lock()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, 30)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.setdefault(msg.topic, []).append(bytes(msg.payload))

    def listen(self, topic_filter: str, marker: str) -> None:
        """Subscribe to ``topic_filter``, and return once ``marker`` (a topic it matches)
        came back: the subscription is in place."""
        self.client.subscribe(topic_filter, qos=1)
        wait_until(lambda: self.publish(marker, b"") or self.messages(marker), 20,
                   "the attacker's subscription")

    def publish(self, topic: str, payload: bytes | dict[str, Any], retain: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(topic, data, qos=1, retain=retain).wait_for_publish(10)

    def messages(self, topic: str) -> list[bytes]:
        with self._lock:
            return list(self.received.get(topic, []))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def inner(payload: bytes) -> dict[str, Any]:
    """The inner document of a signed envelope, read without checking (anyone can)."""
    envelope = json.loads(payload)
    return dict(json.loads(base64.b64decode(envelope["payload"])))
