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

import msgspec
import numpy as np
import paho.mqtt.client as mqtt

from edgekit.errors import DataError, ProtocolError, UsageError
from edgekit.host.db import MetricsSummary, SampleIn, Store
from edgekit.host.errors import StoreError
from edgekit.host.mqtt_client import HostClient
from edgekit.protocol import (
    DeviceState,
    Document,
    EventPayload,
    Kind,
    MetricsPayload,
    SamplePayload,
    StatusPayload,
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

Listener = Callable[[str, str, str, Document], None]  # kind, fleet, device, document
_KINDS = (Kind.STATUS, Kind.METRICS, Kind.EVENTS, Kind.SAMPLES)
_DOCUMENTS: dict[str, type[Document]] = {
    Kind.STATUS.value: StatusPayload, Kind.METRICS.value: MetricsPayload,
    Kind.EVENTS.value: EventPayload, Kind.SAMPLES.value: SamplePayload}
_STORE_RETRIES = 3


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
    doc: Document
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
        # Checked in paho's thread, before a message is queued or parsed.
        document = _DOCUMENTS.get(kind)
        limit = document.max_bytes if document is not None else 64 * 1024
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
        if parts is None or parts.kind not in _DOCUMENTS or parts.rest:
            return "ignored"
        kind = parts.kind
        self._count("received", kind)
        if not payload:
            return "ignored"  # a cleared retained status
        if not (is_valid_id(parts.fleet) and is_valid_id(parts.device)):
            return self._reject(kind, topic, "the topic's fleet or device is not a valid id")
        try:
            doc: Any = decode(payload, _DOCUMENTS[kind])
            if doc.fleet != parts.fleet or doc.device != parts.device:
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

    def _prepare(self, topic: str, kind: str, fleet: str, device: str, doc: Any,
                 received: float) -> _Prepared:
        """Pair a decoded document with the store call that writes it (True: new).

        Raises:
            ProtocolError: a sample whose inputs, labels and predictions do not agree.
        """
        store = self.store
        done = _Prepared(topic, kind, fleet, device, doc)
        if isinstance(doc, MetricsPayload):
            # ``received`` stays the time of writing, so it minus ``ts`` is the ingest lag.
            done.batch = {"fleet": fleet, "device": device, "seq": doc.seq,
                          "payload": msgspec.to_builtins(doc), "summary": metrics_summary(doc),
                          "ts": _timestamp(doc.ts, received)}
            batch = done.batch
            done.call = lambda: store.record_metrics(**batch)
        elif isinstance(doc, StatusPayload):
            values = status_fields(doc)
            done.call = lambda: store.upsert_device_status(fleet, device, **values,
                                                           seen_at=_when(received))
        elif isinstance(doc, EventPayload):
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

    def _event_call(self, fleet: str, device: str, doc: EventPayload,
                    received: float) -> Callable[[], bool]:
        data = doc.data
        rollout = rollout_of_deployment(data.get("deployment")) if data else None
        args: dict[str, Any] = dict(device=device, session=doc.session, seq=doc.seq,
                                    level=doc.level.value, reason=doc.reason, data=data,
                                    ts=_timestamp(doc.ts, received))

        def call() -> bool:
            try:
                return self.store.record_event(fleet, doc.kind, doc.message,
                                               rollout_id=rollout, **args) is not None
            except UsageError:
                # The deployment names a rollout this database does not hold.
                return self.store.record_event(fleet, doc.kind, doc.message, **args) is not None

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


def status_fields(doc: StatusPayload) -> dict[str, Any]:
    """The :meth:`Store.upsert_device_status` arguments of a status document."""
    model = doc.model
    return {
        "online": doc.state == DeviceState.ONLINE,
        "session": doc.session,
        "agent_version": doc.agent_version,
        "model_name": model.name if model is not None else None,
        "model_version": model.version if model is not None else None,
        "model_sha256": model.sha256 if model is not None else None,
        "status": msgspec.to_builtins(doc),
    }


def metrics_summary(doc: MetricsPayload) -> MetricsSummary:
    """The device summary ``fleet status`` shows, from a metrics document."""
    latency, quality, estimate = doc.latency, doc.quality, doc.estimate
    return MetricsSummary(
        latency_p50_ms=_finite(latency.p50_ms), latency_p95_ms=_finite(latency.p95_ms),
        latency_p99_ms=_finite(latency.p99_ms), accuracy=_finite(quality.accuracy),
        f1=_finite(quality.f1_macro), label_count=quality.labels,
        estimated_accuracy=estimate.accuracy if estimate is not None else None,
        estimated_count=estimate.count if estimate is not None else None,
    )


def sample_rows(doc: SamplePayload) -> list[SampleIn]:
    """One :class:`SampleIn` per row of a samples document (inputs without the batch axis).

    Raises:
        ProtocolError: inputs that do not decode or do not share a batch size, or labels /
            predictions that are not one class id per row.
    """
    arrays = {k: decode_array(v, f"samples.inputs.{k}") for k, v in doc.inputs.items()}
    rows = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
    if len(rows) != 1 or -1 in rows:
        raise ProtocolError("samples: every input needs the same batch size (axis 0)")
    count = rows.pop()
    for name, values in (("label", doc.label), ("prediction", doc.prediction)):
        if len(values) != count:
            raise ProtocolError(f"samples: {name} must be one class id per row ({count})")
    ts = _timestamp(doc.ts, time.time())
    return [SampleIn(prediction_id=doc.prediction_id, row=i,
                     inputs={k: np.ascontiguousarray(a[i]) for k, a in arrays.items()},
                     label=doc.label[i], prediction=doc.prediction[i],
                     model_name=doc.model.name, model_version=doc.model.version, ts=ts)
            for i in range(count)]


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _when(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


def _timestamp(value: float, fallback: float) -> dt.datetime:
    """The device's time of a message, or ``fallback`` when it is absurd."""
    return _when(value if 0 < value < 1e11 and math.isfinite(value) else fallback)
