"""Fleet telemetry into the database: status, metrics, events and samples from MQTT.

:class:`Ingest` subscribes on a :class:`~edgekit.host.mqtt_client.HostClient` and hands each
message to worker threads, which turn the protocol payloads (:mod:`edgekit.protocol`) into
:class:`~edgekit.host.Store` calls. Metrics, events and samples go through a shared
subscription (``$share/<group>/...``) when a group is configured, so several controllers
split them; status stays a plain subscription on every controller, because brokers do not
send retained messages to shared subscriptions and a status applies idempotently (the
session number orders births and deaths). Duplicates from at-least-once delivery are dropped
by the database's unique keys. A payload that is not what its topic promises is logged,
counted and ignored.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from edgekit.errors import DataError, ProtocolError, UsageError
from edgekit.host.db import MetricsSummary, SampleIn, Store
from edgekit.host.errors import StoreError
from edgekit.host.mqtt_client import HostClient
from edgekit.protocol import (
    DeviceState,
    Kind,
    Schema,
    decode,
    decode_array,
    is_valid_id,
    parse_topic,
)
from edgekit.protocol import subscription as topic_filter
from edgekit.protocol.controller import rollout_of_deployment
from edgekit.protocol.ota.topics import shared

__all__ = ["Ingest", "IngestStats", "metrics_summary", "sample_rows", "status_fields"]

log = logging.getLogger("edgekit.controller.ingest")

Listener = Callable[[str, str, str, dict[str, Any]], None]  # kind, fleet, device, payload
_KINDS = (Kind.STATUS, Kind.METRICS, Kind.EVENTS, Kind.SAMPLES)
_SCHEMAS = {Kind.STATUS.value: Schema.STATUS, Kind.METRICS.value: Schema.METRICS,
            Kind.EVENTS.value: Schema.EVENT, Kind.SAMPLES.value: Schema.SAMPLE}
_STORE_RETRIES = 3
_MAX_TEXT = 2000
# Largest payload per kind, checked in paho's thread before a message is queued or parsed
# (samples carry an input array; the rest are small documents).
_MAX_BYTES = {Kind.STATUS.value: 64 * 1024, Kind.METRICS.value: 256 * 1024,
              Kind.EVENTS.value: 64 * 1024, Kind.SAMPLES.value: 4 * 1024 * 1024}


@dataclass
class IngestStats:
    """Counters per message kind (status, metrics, events, samples)."""

    received: dict[str, int] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {"received": dict(self.received), "stored": dict(self.stored),
                "duplicates": dict(self.duplicates), "rejected": dict(self.rejected),
                "failed": dict(self.failed)}


@dataclass
class _Prepared:
    """A checked message and how to write it."""

    topic: str
    kind: str
    fleet: str
    device: str
    doc: dict[str, Any]
    call: Callable[[], bool] = lambda: False
    batch: dict[str, Any] | None = None  # metrics: the arguments of one batched write


class Ingest:
    """Subscribes to the fleets' telemetry and writes it to ``store``; see the module docstring.

    ``fleets`` may be ``["+"]`` (every fleet). ``listeners`` are called from the worker
    threads after a message was stored (not for duplicates), e.g. to wake the rollout loop.
    """

    def __init__(self, store: Store, client: HostClient, *, fleets: Iterable[str],
                 share_group: str | None = None, workers: int = 2, queue_max: int = 20000,
                 samples: bool = True, batch: int = 200) -> None:
        self.store = store
        self.batch = batch
        self.client = client
        self.fleets = list(fleets)
        self.share_group = share_group
        self.samples = samples
        self.stats = IngestStats()
        self.listeners: list[Listener] = []
        self._queue: queue.Queue[tuple[str, bytes, float] | None] = queue.Queue(queue_max)
        self._stats_lock = threading.Lock()
        self._workers = [threading.Thread(target=self._work, name=f"edgekit-ingest-{i}",
                                          daemon=True) for i in range(workers)]
        self._filters: list[str] = []
        self._busy = 0
        self._idle = threading.Condition(self._stats_lock)

    def start(self) -> None:
        """Start the workers and subscribe (again after every reconnect, by the client)."""
        for worker in self._workers:
            worker.start()
        kinds = [k for k in _KINDS if k != Kind.SAMPLES or self.samples]
        for fleet in self.fleets:
            for kind in kinds:
                group = None if kind == Kind.STATUS else self.share_group
                self._filters.append(shared(topic_filter(fleet, "+", kind), group))
        for f in self._filters:
            self.client.subscribe(f, self._on_message, qos=1)

    def stop(self, timeout: float = 10.0) -> None:
        """Unsubscribe, write what is queued, and stop the workers."""
        for f in self._filters:
            self.client.unsubscribe(f)
        self._filters.clear()
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every message received so far is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._queue.unfinished_tasks or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
        return True

    @property
    def backlog(self) -> int:
        """Messages received and not yet written."""
        return self._queue.qsize()

    # ---------------------------------------------------------------- MQTT thread

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        # Only queue here: paho's network thread must keep reading (and acknowledging).
        kind = msg.topic.rsplit("/", 1)[-1]
        limit = _MAX_BYTES.get(kind, 64 * 1024)
        if len(msg.payload) > limit:
            self._count("received", kind)
            self._reject(kind, msg.topic, f"{len(msg.payload)} bytes, over the limit of {limit}")
            return
        self._queue.put((msg.topic, bytes(msg.payload), time.time()))

    # ---------------------------------------------------------------- workers

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            items = [first]
            # Take what else waits (up to a batch): metrics of many devices go to the
            # database in one transaction, one commit instead of one per message.
            while first is not None and len(items) < self.batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            with self._idle:
                self._busy += 1
            try:
                self._write_all([i for i in items if i is not None])
            except Exception:
                log.exception("ingest failed on %d message(s)", len(items))
            finally:
                with self._idle:
                    self._busy -= 1
                    for _ in items:
                        self._queue.task_done()
                    self._idle.notify_all()
            if any(i is None for i in items):
                return

    def _write_all(self, items: list[tuple[str, bytes, float]]) -> None:
        metrics: list[_Prepared] = []
        for topic, payload, received in items:
            prepared = self._parse(topic, payload, received)
            if isinstance(prepared, str):
                continue
            if prepared.batch is not None:
                metrics.append(prepared)
            else:
                self._finish(prepared, self._write(prepared.kind, topic, prepared.call))
        if metrics:
            outcomes = self._write_batch(metrics)
            for prepared, outcome in zip(metrics, outcomes, strict=True):
                self._finish(prepared, outcome)

    def handle(self, topic: str, payload: bytes, received: float | None = None) -> str:
        """Write one message; return what happened: stored, duplicate, rejected, failed or
        ignored (an empty retained payload, or a topic of another kind)."""
        prepared = self._parse(topic, payload, received or time.time())
        if isinstance(prepared, str):
            return prepared
        outcome = self._write(prepared.kind, topic, prepared.call)
        self._finish(prepared, outcome)
        return outcome

    def _parse(self, topic: str, payload: bytes, received: float) -> _Prepared | str:
        """The store call a message needs, or the outcome (``ignored``, ``rejected``,
        counted) of one that needs none."""
        parts = parse_topic(topic)
        if parts is None or parts.kind not in _SCHEMAS or parts.rest:
            return "ignored"
        kind = parts.kind
        self._count("received", kind)
        if not payload:
            return "ignored"  # a cleared retained status
        if not (is_valid_id(parts.fleet) and is_valid_id(parts.device)):
            return self._reject(kind, topic, "the topic's fleet or device is not a valid id")
        try:
            doc = decode(payload, _SCHEMAS[kind])
            if doc.get("fleet", parts.fleet) != parts.fleet or \
                    doc.get("device", parts.device) != parts.device:
                raise ProtocolError("the payload's fleet or device differs from its topic")
            return self._prepare(topic, kind, parts.fleet, parts.device, doc, received)
        except (ProtocolError, DataError, UsageError) as exc:
            return self._reject(kind, topic, exc.message)

    def _finish(self, prepared: _Prepared, outcome: str) -> None:
        if outcome != "stored":
            return
        for listener in self.listeners:
            try:
                listener(prepared.kind, prepared.fleet, prepared.device, prepared.doc)
            except Exception:
                log.exception("ingest listener failed")

    def _prepare(self, topic: str, kind: str, fleet: str, device: str, doc: dict[str, Any],
                 received: float) -> _Prepared:
        """Validate a payload and pair it with the store call that writes it (True: new)."""
        store = self.store
        done = _Prepared(topic, kind, fleet, device, doc)
        if kind == Kind.STATUS:
            values = status_fields(doc)
            done.call = lambda: store.upsert_device_status(fleet, device, **values,
                                                           seen_at=_when(received))
        elif kind == Kind.METRICS:
            # ``received`` stays the time of writing, so it minus ``ts`` is the ingest lag.
            done.batch = {"fleet": fleet, "device": device, "seq": _count_field(doc, "seq"),
                          "payload": doc, "summary": metrics_summary(doc),
                          "ts": _timestamp(doc.get("ts"), received)}
            batch = done.batch
            done.call = lambda: store.record_metrics(**batch)
        elif kind == Kind.EVENTS:
            done.call = self._event_call(fleet, device, doc, received)
        else:
            rows = sample_rows(doc)
            done.call = lambda: store.add_samples(fleet, device, rows) > 0
        return done

    def _write_batch(self, metrics: list[_Prepared]) -> list[str]:
        for attempt in range(_STORE_RETRIES):
            try:
                new = self.store.record_metrics_batch([p.batch for p in metrics
                                                       if p.batch is not None])
            except StoreError as exc:
                if attempt + 1 == _STORE_RETRIES:
                    for _ in metrics:
                        self._count("failed", "metrics")
                    log.error("could not store %d metrics messages: %s", len(metrics),
                              exc.message)
                    return ["failed"] * len(metrics)
                time.sleep(0.2 * (attempt + 1))
                continue
            outcomes = ["stored" if n else "duplicate" for n in new]
            for outcome in outcomes:
                self._count("stored" if outcome == "stored" else "duplicates", "metrics")
            return outcomes
        return ["failed"] * len(metrics)

    def _event_call(self, fleet: str, device: str, doc: dict[str, Any],
                    received: float) -> Callable[[], bool]:
        seq = _count_field(doc, "seq")
        kind = doc.get("kind")
        if not isinstance(kind, str) or not kind or len(kind) > 64:
            raise ProtocolError("event: kind must be a string of 1 to 64 characters")
        level = doc.get("level", "info")
        level = level if level in ("info", "warning", "error") else "info"
        reason = doc.get("reason")
        reason = reason[:64] if isinstance(reason, str) else None
        message = doc.get("message", "")
        message = message[:_MAX_TEXT] if isinstance(message, str) else ""
        data = doc.get("data")
        data = data if isinstance(data, dict) else None
        rollout = rollout_of_deployment(data.get("deployment")) if data else None
        ts = _timestamp(doc.get("ts"), received)

        def call() -> bool:
            args: dict[str, Any] = dict(device=device, seq=seq, level=level, reason=reason,
                                        data=data, ts=ts)
            try:
                return self.store.record_event(fleet, kind, message, rollout_id=rollout,
                                               **args) is not None
            except UsageError:
                # The deployment names a rollout this database does not hold.
                return self.store.record_event(fleet, kind, message, **args) is not None

        return call

    def _write(self, kind: str, topic: str, call: Callable[[], bool]) -> str:
        for attempt in range(_STORE_RETRIES):
            try:
                new = call()
            except (DataError, UsageError) as exc:
                return self._reject(kind, topic, exc.message)
            except StoreError as exc:
                if attempt + 1 == _STORE_RETRIES:
                    self._count("failed", kind)
                    log.error("could not store a %s message from %s: %s", kind, topic,
                              exc.message)
                    return "failed"
                time.sleep(0.2 * (attempt + 1))
                continue
            self._count("stored" if new else "duplicates", kind)
            return "stored" if new else "duplicate"
        return "failed"

    def _reject(self, kind: str, topic: str, why: str) -> str:
        self._count("rejected", kind)
        log.warning("ignoring a %s message on %s: %s", kind, topic, why)
        return "rejected"

    def _count(self, what: str, kind: str) -> None:
        with self._stats_lock:
            counts: dict[str, int] = getattr(self.stats, what)
            counts[kind] = counts.get(kind, 0) + 1


# --------------------------------------------------------------------------- payloads


def status_fields(doc: dict[str, Any]) -> dict[str, Any]:
    """The :meth:`Store.upsert_device_status` arguments of a status payload.

    Raises:
        ProtocolError: ``state`` or ``session`` is missing or of the wrong type.
    """
    state = doc.get("state")
    if state not in {s.value for s in DeviceState}:
        raise ProtocolError(f"status: state {state!r} is not one of"
                            f" {', '.join(s.value for s in DeviceState)}")
    session = _count_field(doc, "session")
    model = doc.get("model")
    if model is not None and not isinstance(model, dict):
        raise ProtocolError("status: model must be an object or null")
    model = model or {}
    agent_version = doc.get("agent_version")
    return {
        "online": state == DeviceState.ONLINE,
        "session": session,
        "agent_version": str(agent_version)[:64] if agent_version is not None else None,
        "model_name": _short(model.get("name"), 128),
        "model_version": _short(model.get("version"), 64),
        "model_sha256": _short(model.get("sha256"), 64),
        "status": doc,
    }


def metrics_summary(doc: dict[str, Any]) -> MetricsSummary:
    """The device summary ``fleet status`` shows, from a metrics payload (missing parts are
    None; a section of the wrong type is an error)."""
    latency = _section(doc, "latency")
    quality = _section(doc, "quality")
    labels = quality.get("labels")
    return MetricsSummary(
        latency_p50_ms=_number(latency.get("p50_ms")),
        latency_p95_ms=_number(latency.get("p95_ms")),
        latency_p99_ms=_number(latency.get("p99_ms")),
        accuracy=_number(quality.get("accuracy")),
        f1=_number(quality.get("f1_macro")),
        label_count=labels if isinstance(labels, int) and not isinstance(labels, bool)
        and labels >= 0 else None,
    )


def sample_rows(doc: dict[str, Any]) -> list[SampleIn]:
    """One :class:`SampleIn` per row of a samples payload (inputs without the batch axis).

    Raises:
        ProtocolError: no prediction id, inputs that do not decode or do not share a batch
            size, or labels / predictions that are not one class id per row.
    """
    pid = doc.get("prediction_id")
    if not isinstance(pid, str) or not pid or len(pid) > 128:
        raise ProtocolError("samples: prediction_id must be a string of 1 to 128 characters")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, dict) or not raw_inputs:
        raise ProtocolError("samples: inputs must be an object of encoded arrays")
    arrays = {str(k): decode_array(v, f"samples.inputs.{k}") for k, v in raw_inputs.items()}
    rows = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
    if len(rows) != 1 or -1 in rows:
        raise ProtocolError("samples: every input needs the same batch size (axis 0)")
    count = rows.pop()
    labels, predictions = doc.get("label"), doc.get("prediction")
    for name, values in (("label", labels), ("prediction", predictions)):
        if not isinstance(values, list) or len(values) != count or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ProtocolError(f"samples: {name} must be one class id per row ({count})")
    assert isinstance(labels, list) and isinstance(predictions, list)
    raw_model = doc.get("model")
    model: dict[str, Any] = raw_model if isinstance(raw_model, dict) else {}
    ts = _timestamp(doc.get("ts"), time.time())
    return [SampleIn(prediction_id=pid, row=i,
                     inputs={k: np.ascontiguousarray(a[i]) for k, a in arrays.items()},
                     label=labels[i], prediction=predictions[i],
                     model_name=_short(model.get("name"), 128),
                     model_version=_short(model.get("version"), 64), ts=ts)
            for i in range(count)]


def _section(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"metrics: {key} must be an object")
    return value


def _count_field(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{key} must be a non-negative integer, found {value!r}")
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _short(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _when(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


def _timestamp(value: Any, fallback: float) -> dt.datetime:
    """The device's time of a message, or ``fallback`` when it is missing or absurd."""
    number = _number(value)
    if number is None or not 0 < number < 1e11:
        number = fallback
    return _when(number)

