"""Traffic for the demo: each device gets predictions over its local HTTP API, and the true
label follows as feedback, the way an application with delayed ground truth would send it.

The data a device sees depends on the phase: clean digits first, then rotated and noisy ones
(drift). Every answer is recorded (time, device, model version, correct or not, latency), so
the report can plot accuracy per device over time without trusting the system under test.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.errors import ProtocolError
from edgekit.protocol import PredictReply, decode

__all__ = ["Phase", "Record", "TrafficGenerator"]


@dataclass
class Phase:
    name: str
    x: np.ndarray
    y: np.ndarray


@dataclass
class Record:
    t: float
    device: str
    phase: str
    version: str
    correct: bool
    latency_ms: float


@dataclass
class _Device:
    name: str
    host: str
    port: int
    conn: http.client.HTTPConnection | None = None
    errors: int = 0
    last_error: str = ""


@dataclass
class TrafficGenerator:
    """Send ``rate`` requests per second to each device, one thread per device."""

    devices: dict[str, tuple[str, int]]
    rate: float = 20.0
    seed: int = 0
    records: list[Record] = field(default_factory=list)
    _phase: Phase | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _state: dict[str, _Device] = field(default_factory=dict)

    def set_phase(self, phase: Phase) -> None:
        self._phase = phase

    def start(self) -> None:
        for i, (name, (host, port)) in enumerate(sorted(self.devices.items())):
            dev = _Device(name, host, port)
            self._state[name] = dev
            thread = threading.Thread(target=self._loop, args=(dev, self.seed + i),
                                      name=f"traffic-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def errors(self) -> dict[str, int]:
        return {name: dev.errors for name, dev in self._state.items()}

    def last_error(self) -> str | None:
        """The last transport error any device gave, for the summary (None when none)."""
        return next((f"{d.name}: {d.last_error}" for d in self._state.values() if d.last_error),
                    None)

    def snapshot(self) -> list[Record]:
        with self._lock:
            return list(self.records)

    def _loop(self, dev: _Device, seed: int) -> None:
        rng = np.random.default_rng(seed)
        period = 1.0 / self.rate
        next_t = time.monotonic()
        while not self._stop.is_set():
            phase = self._phase
            if phase is not None:
                self._one(dev, phase, int(rng.integers(len(phase.y))))
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_t = time.monotonic()

    def _one(self, dev: _Device, phase: Phase, idx: int) -> None:
        x = phase.x[idx : idx + 1]
        label = int(phase.y[idx])
        t0 = time.perf_counter()
        body = self._post(dev, "/predict", {"inputs": {"x": x.tolist()}, "outputs": "none"})
        latency = (time.perf_counter() - t0) * 1000.0
        try:
            reply = None if body is None else decode(body, PredictReply, require_schema=False)
        except ProtocolError as exc:
            dev.errors += 1
            dev.last_error = f"predict reply: {exc.message}"
            return
        if reply is None or not reply.ok or not reply.classes or reply.prediction_id is None:
            return
        predicted = reply.classes[0]
        self._post(dev, "/feedback", {"prediction_id": reply.prediction_id, "label": label})
        with self._lock:
            self.records.append(Record(time.time(), dev.name, phase.name,
                                       reply.model.version if reply.model else "?",
                                       predicted == label, latency))

    def _post(self, dev: _Device, path: str, doc: dict[str, Any]) -> bytes | None:
        """The body of the device's answer (decoded by the caller); None after two failed
        tries, counted in ``dev.errors``."""
        body = json.dumps(doc).encode()
        problem = ""
        for _attempt in range(2):
            try:
                if dev.conn is None:
                    dev.conn = http.client.HTTPConnection(dev.host, dev.port, timeout=5)
                dev.conn.request("POST", path, body, {"Content-Type": "application/json"})
                resp = dev.conn.getresponse()
                data: bytes = resp.read()
                return data
            except (OSError, http.client.HTTPException) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                if dev.conn is not None:
                    dev.conn.close()
                dev.conn = None
        dev.errors += 1
        dev.last_error = problem
        return None
