"""Telemetry payloads: the status (birth, will, stop), metrics, and the Prometheus text."""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from edgekit.protocol import (
    DeviceState,
    MetricsPayload,
    PredictionsSection,
    RequestsSection,
    Schema,
    StatusPayload,
    TelemetrySection,
)
from edgekit.signing import key_id

from ._model import probabilities
from ._stats import Interval

if TYPE_CHECKING:
    from ._agent import Agent

__all__ = ["build_metrics", "build_status", "prometheus_text"]


def build_status(agent: Agent, session: int, state: DeviceState, reason: str | None
                 ) -> StatusPayload:
    model = agent.slot.current
    payload = StatusPayload(
        schema=Schema.STATUS.value,
        state=state.value,
        device=agent.config.device.id,
        fleet=agent.config.device.fleet,
        session=session,
        ts=time.time(),
        agent_version=agent.version,
        runtimes=agent.runtimes,
        hardware=agent.hardware,
        # The will is set before the connection and published after it died, when nothing
        # serves: it names no model (the last online status of the session does).
        model=model.ref if model is not None and state != DeviceState.OFFLINE else None,
        http=agent.http_address,
        started=agent.started,
    )
    if reason:
        payload["reason"] = reason
    payload["trusted_keys"] = [key_id(k) for k in agent.trust.trusted_keys]
    payload["allow_unsigned"] = bool(agent.trust.allow_unsigned)
    update = agent.ota.status_section()
    if update is not None:
        payload["update"] = update
    return payload


def predictions_section(agent: Agent, interval: Interval) -> PredictionsSection:
    """Histogram and mean confidence of the interval's classifier outputs, and the running
    totals per class kept for /metrics."""
    model = agent.slot.current
    if not interval.outputs:
        return PredictionsSection(count=0, histogram={}, mean_confidence=None)
    try:
        rows = np.concatenate([o.reshape(len(o), -1) for o in interval.outputs])
    except ValueError:  # outputs of two models of different widths around a swap
        rows = interval.outputs[-1].reshape(len(interval.outputs[-1]), -1)
    probs = probabilities(rows)
    classes = probs.argmax(axis=1)
    counts = np.bincount(classes)
    histogram: dict[str, int] = {}
    for index in np.flatnonzero(counts):
        name = model.label_name(int(index)) if model is not None else str(int(index))
        histogram[name] = int(counts[index])
    agent.class_totals.update(histogram)
    return PredictionsSection(count=int(len(rows)), histogram=histogram,
                              mean_confidence=float(probs.max(axis=1).mean()))


def build_metrics(agent: Agent, interval: Interval) -> MetricsPayload:
    """The metrics of one interval; ``seq`` is filled in when it is queued."""
    model = agent.slot.current
    stats = agent.stats
    outbox = agent.outbox
    return MetricsPayload(
        schema=Schema.METRICS.value,
        device=agent.config.device.id,
        fleet=agent.config.device.fleet,
        seq=0,
        ts=interval.ended,
        interval_s=round(interval.duration_s, 3),
        model=model.ref if model is not None else None,
        requests=RequestsSection(
            total=stats.requests_total,
            interval=interval.requests,
            errors_total=stats.errors_total,
            errors_interval=interval.errors,
            by_channel=dict(interval.by_channel),
            errors_by_code=dict(interval.errors_by_code),
        ),
        latency=interval.latency(),
        throughput_rps=interval.requests / interval.duration_s,
        system=agent.system.sample(),
        predictions=predictions_section(agent, interval),
        quality=agent.window.snapshot(),
        telemetry=TelemetrySection(
            queue_depth=outbox.depth if outbox is not None else 0,
            dropped_total=outbox.dropped if outbox is not None else 0,
        ),
    )


def _labels(**pairs: str) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items())
    return "{" + inner + "}" if inner else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(agent: Agent, last: MetricsPayload | None) -> str:
    """The Prometheus text exposition (format 0.0.4) of the agent's numbers.

    Counters are live; latency quantiles, throughput and CPU come from the last interval.
    """
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {_number(value)}")

    stats = agent.stats
    model = agent.slot.current
    metric("edgekit_agent_requests_total", "counter", "Answered inference requests.",
           [("", stats.requests_total)])
    metric("edgekit_agent_errors_total", "counter", "Refused or failed requests.",
           [("", stats.errors_total)])
    metric("edgekit_agent_up_seconds", "gauge", "Seconds since the agent started.",
           [("", time.time() - agent.started)])
    metric("edgekit_agent_model_info", "gauge", "The model in service (value 1).",
           [(_labels(name=model.name, version=model.version, sha256=model.sha256,
                     runtime=model.runtime), 1)] if model is not None else [])
    metric("edgekit_agent_mqtt_connected", "gauge", "1 while the broker connection is up.",
           [("", 1 if agent.link is not None and agent.link.connected else 0)])
    quality = agent.window.snapshot()
    metric("edgekit_agent_window_labels", "gauge", "Labelled predictions in the window.",
           [("", quality["labels"])])
    if quality["accuracy"] is not None and quality["f1_macro"] is not None:
        metric("edgekit_agent_window_accuracy", "gauge", "Accuracy over the labelled window.",
               [("", quality["accuracy"])])
        metric("edgekit_agent_window_f1_macro", "gauge", "Macro F1 over the labelled window.",
               [("", quality["f1_macro"])])
    metric("edgekit_agent_feedback_total", "counter", "Labels received.",
           [("", quality["feedback_total"])])
    totals: Counter[str] = agent.class_totals
    metric("edgekit_agent_predictions_total", "counter",
           "Predicted rows per class (updated each telemetry interval).",
           [(_labels(label=k), v) for k, v in sorted(totals.items())])
    if agent.outbox is not None:
        metric("edgekit_agent_telemetry_queue_depth", "gauge", "Messages waiting to be sent.",
               [("", agent.outbox.depth)])
        metric("edgekit_agent_telemetry_dropped_total", "counter",
               "Messages dropped at the queue bound.", [("", agent.outbox.dropped)])
    metric("process_resident_memory_bytes", "gauge", "Resident memory of the agent.",
           [("", agent.system.rss_bytes())])
    if last is not None:
        lat = last["latency"]
        quantiles: list[tuple[str, float]] = [
            (_labels(quantile=q), value) for q, value in
            (("0.5", lat["p50_ms"]), ("0.95", lat["p95_ms"]), ("0.99", lat["p99_ms"]))
            if value is not None
        ]
        metric("edgekit_agent_latency_ms", "summary",
               "Request latency in milliseconds over the last interval.",
               [*quantiles, ("_count", lat["count"])])
        metric("edgekit_agent_throughput_rps", "gauge", "Requests per second, last interval.",
               [("", last["throughput_rps"])])
        system = last["system"]
        if system["cpu_percent"] is not None:
            metric("edgekit_agent_cpu_percent", "gauge", "CPU of the agent, last interval.",
                   [("", system["cpu_percent"])])
        if system["temperature_c"] is not None:
            metric("edgekit_agent_temperature_celsius", "gauge", "Hottest thermal zone.",
                   [("", system["temperature_c"])])
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
