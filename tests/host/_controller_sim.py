"""Helpers of the controller tests: simulated devices, a broker fixture, configs, waits.

:class:`SimDevice` stands in for a device agent to keep these tests fast (a real agent is a
process that loads a runtime): a small paho client that follows its retained desired
documents (the device's own wins over the fleet's) the way ``device_agent`` does, fetches
the artifact in chunks from the controller's artifact server and checks its sha256, follows
only desired documents signed by a key of ``trusted`` and bound to it (a revert goes back to
the model it ran before, allow_downgrade/allow_rename as the agent's floor), and reports status (retained, with a last will), ``update.*``
events and metrics with the same payloads an agent sends. How it answers an update is set
per version (``ok``, ``fail``, ``silent``, ``rollback``), and the field accuracy it reports
per version, so each test decides what the fleet does.
"""

from __future__ import annotations

import hashlib
import json
import queue
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from mqtt_broker import MqttBroker, broker, wait_until  # noqa: F401  (re-exported for the controller tests)
from paho.mqtt.enums import CallbackAPIVersion

from edgekit.errors import EdgekitError
from edgekit.manifest import compare_versions
from edgekit.protocol import Kind, Schema, encode, topic
from edgekit.protocol.ota.chunks import decode_chunk, encode_request, make_request
from edgekit.protocol.ota.desired import parse_desired
from edgekit.protocol.ota.topics import desired_topic, ota_reply_topic
from edgekit.protocol.signed import open_sealed

__all__ = ["HARDWARE", "SimDevice", "broker", "controller_config", "metrics_payload",
           "wait_until"]

CHUNK = 64 * 1024
# The hardware section of a status (edgekit.protocol.HardwareInfo) of a simulated device.
HARDWARE = {"hostname": "sim", "system": "Linux", "machine": "x86_64", "release": "6.1",
            "os": "Debian GNU/Linux 12", "board": None, "cpu_count": 2,
            "memory_total_bytes": 1 << 30, "python": "3.11.7"}




def register(db_url: str, store: Path, *packages: Path) -> None:
    """Push ``packages`` into the registry at ``store`` of the database at ``db_url``."""
    from edgekit.host.db import Store
    from edgekit.host.registry import Registry

    with Store(db_url) as db:
        registry = Registry(db, store)
        for package in packages:
            registry.push(package)


def controller_config(*, broker_url: str, db_url: str, store: Path, **overrides: Any) -> Any:
    """A validated controller config with short intervals; ``overrides`` use
    ``section__key`` names (``rollout__canary="2"``)."""
    from edgekit.host.controller import load_config

    values: dict[str, Any] = {
        "mqtt.broker": broker_url, "database.url": db_url, "registry.store": str(store),
        "controller.tick_s": 0.1, "controller.lease_s": 5.0,
        "rollout.device_timeout_s": 20.0, "rollout.rollback_timeout_s": 20.0,
        "rollout.labels_timeout_s": 20.0, "rollout.probation_requests": 0,
        "rollout.probation_seconds": 0.0, "ingest.workers": 1,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(overrides=values)


def metrics_payload(fleet: str, device: str, seq: int, *, model: dict[str, Any] | None,
                    accuracy: float | None = None, labels: int = 0, feedback_total: int = 0,
                    histogram: dict[str, int] | None = None, confidence: float | None = None,
                    ts: float | None = None) -> dict[str, Any]:
    """A metrics payload as the agent builds it (edgekit.protocol.MetricsPayload)."""
    count = sum((histogram or {}).values())
    return {
        "schema": Schema.METRICS.value, "device": device, "fleet": fleet, "seq": seq,
        "ts": ts if ts is not None else time.time(), "interval_s": 1.0, "model": model,
        "requests": {"total": count, "interval": count, "errors_total": 0,
                     "errors_interval": 0, "by_channel": {"python": count},
                     "errors_by_code": {}},
        "latency": {"count": count, "mean_ms": 0.5, "p50_ms": 0.4, "p95_ms": 0.9,
                    "p99_ms": 1.2},
        "throughput_rps": float(count),
        "system": {"cpu_percent": 1.0, "rss_bytes": 1, "memory_percent": 1.0,
                   "temperature_c": None, "load1": 0.1},
        "predictions": {"count": count, "histogram": histogram or {},
                        "mean_confidence": confidence},
        "quality": {"window": 500, "labels": labels if accuracy is not None else 0,
                    "accuracy": accuracy, "f1_macro": None if accuracy is None else accuracy,
                    "confusion": None, "feedback_total": feedback_total,
                    "feedback_rejected": 0},
        "telemetry": {"queue_depth": 0, "dropped_total": 0},
    }


class SimDevice:
    """A simulated device; see the module docstring.

    ``serving`` is the model it starts with (``{"name", "version", "sha256"}``).
    ``behavior`` maps a version to how the update to it goes (default ``ok``);
    ``accuracy`` maps a version to the field accuracy the device reports with it (absent:
    no labels). Each telemetry tick adds ``labels_per_tick`` labels, up to a window of 500.
    """

    def __init__(self, url: str, fleet: str, device: str, *, serving: dict[str, Any] | None,
                 behavior: dict[str, str] | None = None,
                 accuracy: dict[str, float] | None = None, labels_per_tick: int = 20,
                 interval: float = 0.2, trusted: list[Any] | None = None,
                 session: int = 1) -> None:
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.fleet, self.device = fleet, device
        self.serving = dict(serving) if serving else None
        self.kept: dict[str, dict[str, Any]] = {}  # version -> model, what it keeps on disk
        self.before: list[dict[str, Any]] = []  # models it ran before, newest last
        if self.serving:
            self.kept[self.serving["version"]] = dict(self.serving)
        self.behavior = behavior or {}
        self.accuracy = accuracy or {}
        self.labels_per_tick = labels_per_tick
        self.interval = interval
        self.trusted = trusted or []
        self.session = session
        self.docs: dict[str, dict[str, Any] | None] = {"device": None, "fleet": None}
        self.handled: set[str] = set()
        self.outcomes: list[tuple[str, str]] = []  # (deployment, step) of final events
        self.downloads = 0
        self._seq = {"metrics": 0, "events": 0}
        self._labels = 0
        self._feedback = 0
        self._work: queue.Queue[str | None] = queue.Queue()
        self._chunks: queue.Queue[bytes] = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"sim-{fleet}-{device}-{secrets.token_hex(3)}",
                                  protocol=mqtt.MQTTv311)
        self.client.will_set(self.topic(Kind.STATUS), encode(self._status("offline")), qos=1,
                             retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(host, int(port), 30)
        self._threads = [threading.Thread(target=self._reconcile_loop, daemon=True),
                         threading.Thread(target=self._telemetry_loop, daemon=True)]

    def topic(self, kind: Kind) -> str:
        return topic(self.fleet, self.device, kind)

    def start(self) -> SimDevice:
        self.client.loop_start()
        wait_until(self._connected.is_set, 20, f"{self.device} to connect")
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._work.put(None)
        if self._connected.is_set():
            self.client.publish(self.topic(Kind.STATUS), encode(self._status("stopped")),
                                qos=1, retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def version(self) -> str | None:
        with self._lock:
            return self.serving["version"] if self.serving else None

    # ---------------------------------------------------------------- MQTT

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            return
        client.subscribe(desired_topic(self.fleet, self.device), qos=1)
        client.subscribe(desired_topic(self.fleet), qos=1)
        client.subscribe(ota_reply_topic(self.fleet, self.device), qos=1)
        client.publish(self.topic(Kind.STATUS), encode(self._status("online")), qos=1,
                       retain=True)
        self._connected.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == ota_reply_topic(self.fleet, self.device):
            self._chunks.put(bytes(msg.payload))
            return
        level = "fleet" if msg.topic == desired_topic(self.fleet) else "device"
        doc = None
        if msg.payload:
            try:
                # The simulator keeps the checked document as plain JSON values.
                doc = msgspec.to_builtins(
                    parse_desired(open_sealed(bytes(msg.payload), self.trusted).payload))
            except EdgekitError as exc:
                self._event("update.failed", "", {}, reason="untrusted_intent",
                            message=exc.message)
            if doc is not None and (doc["fleet"] != self.fleet or doc["devices"] is not None
                                    and self.device not in doc["devices"]):
                self._event("update.failed", doc["deployment"], doc["model"],
                            reason="not_for_device")
                doc = None
        with self._lock:
            self.docs[level] = doc
        self._work.put(level)

    def _status(self, state: str) -> dict[str, Any]:
        model = None
        if self.serving:
            model = {**self.serving, "format": "onnx", "runtime": "onnxruntime"}
        return {"schema": Schema.STATUS.value, "state": state, "device": self.device,
                "fleet": self.fleet, "session": self.session, "ts": time.time(),
                "agent_version": "sim", "runtimes": [], "hardware": HARDWARE, "model": model,
                "http": None, "started": time.time()}

    def _event(self, kind: str, deployment: str, model: dict[str, Any], *,
               reason: str | None = None, message: str = "") -> None:
        self._seq["events"] += 1
        step = kind.removeprefix("update.")
        payload: dict[str, Any] = {
            "schema": Schema.EVENT.value, "device": self.device, "fleet": self.fleet,
            "seq": self._seq["events"], "ts": time.time(), "kind": kind,
            "level": "error" if step in ("failed", "rolled_back") else "info",
            "message": message or step,
            "data": {"deployment": deployment, "step": step,
                     "model": {k: model.get(k) for k in ("name", "version", "sha256")},
                     "serving": dict(self.serving) if self.serving else None}}
        if reason:
            payload["reason"] = reason
        if step in ("succeeded", "failed", "rolled_back"):
            self.outcomes.append((deployment, step))
        self.client.publish(self.topic(Kind.EVENTS), encode(payload), qos=1)

    # ---------------------------------------------------------------- updates

    def _reconcile_loop(self) -> None:
        while not self._stop.is_set():
            if self._work.get() is None:
                return
            with self._lock:
                doc = self.docs["device"] or self.docs["fleet"]
            if doc is None or doc["deployment"] in self.handled:
                continue
            self.handled.add(doc["deployment"])
            self._apply(doc)

    def _apply(self, doc: dict[str, Any]) -> None:
        dep, model = doc["deployment"], doc["model"]
        current = self.serving or {}
        if doc["revert"]:
            if current.get("sha256") != model["sha256"] or not self.before:
                self._event("update.succeeded", dep, model, message="nothing to revert")
                return
            model = {**self.before[-1], "size": None}
        if model["version"] == current.get("version") and model["sha256"] in (
                None, current.get("sha256")):
            self._event("update.succeeded", dep, model, message="already served")
            return
        if current and model["name"] != current["name"] and not doc["allow_rename"]:
            self._event("update.failed", dep, model, reason="renamed")
            return
        if current and compare_versions(model["version"], current["version"]) <= 0 and \
                not doc["allow_downgrade"]:
            self._event("update.failed", dep, model, reason="older_version")
            return
        how = self.behavior.get(model["version"], "ok")
        if how == "silent":
            return
        self._event("update.queued", dep, model)
        target = self.kept.get(model["version"]) if model["sha256"] is None or \
            doc["revert"] else None
        if target is None:
            try:
                self._download(doc)
            except AssertionError as exc:
                self._event("update.failed", dep, model, reason="download_failed",
                            message=str(exc))
                return
            target = {k: model[k] for k in ("name", "version", "sha256")}
        if how == "fail":
            self._event("update.failed", dep, model, reason="load_failed")
            return
        self._event("update.activating", dep, model)
        if how == "rollback":
            self._event("update.rolled_back", dep, model, reason="probation_errors")
            return
        with self._lock:
            if self.serving:
                self.before.append(dict(self.serving))
            self.serving = dict(target)
            self.kept[target["version"]] = dict(target)
            self._labels = 0
        self.client.publish(self.topic(Kind.STATUS), encode(self._status("online")), qos=1,
                            retain=True)
        self._event("update.succeeded", dep, model)

    def _download(self, doc: dict[str, Any]) -> None:
        source = (doc["sources"] or {}).get("mqtt")
        assert source, "the desired document names no MQTT source"
        sha, size = doc["model"]["sha256"], doc["model"]["size"]
        data = b""
        deadline = time.monotonic() + 30.0
        while len(data) < size:
            # Ask again each second, as an agent resumes when a server goes away and another
            # one (a restarted controller) comes.
            rid = secrets.token_hex(6)
            request = make_request(rid, sha, len(data), CHUNK,
                                   ota_reply_topic(self.fleet, self.device))
            self.client.publish(source["request_topic"], encode_request(request), qos=1)
            try:
                chunk = decode_chunk(self._chunks.get(timeout=1.0))
            except queue.Empty:
                assert time.monotonic() < deadline, "no artifact server answered"
                continue
            assert chunk.error is None, f"chunk error {chunk.error}"
            if chunk.header.request_id == rid:
                data += chunk.data
        assert hashlib.sha256(data).hexdigest() == sha, "the artifact's sha256 differs"
        self.downloads += 1

    # ---------------------------------------------------------------- telemetry

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.publish_metrics()

    def publish_metrics(self) -> None:
        with self._lock:
            serving = dict(self.serving) if self.serving else None
            accuracy = self.accuracy.get(serving["version"]) if serving else None
            if accuracy is not None:
                self._labels = min(500, self._labels + self.labels_per_tick)
                self._feedback += self.labels_per_tick
            self._seq["metrics"] += 1
            seq = self._seq["metrics"]
        model = {**serving, "format": "onnx", "runtime": "onnxruntime"} if serving else None
        payload = metrics_payload(self.fleet, self.device, seq, model=model,
                                  accuracy=accuracy, labels=self._labels,
                                  feedback_total=self._feedback,
                                  histogram={"a": 5, "b": 5}, confidence=0.9)
        self.client.publish(self.topic(Kind.METRICS), json.dumps(payload), qos=1)
