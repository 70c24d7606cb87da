"""Telemetry payloads: the metrics of each interval and the Prometheus text (the status is
:mod:`._status`'s)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edgekit.protocol import (
    MetricsPayload,
    PredictionsSection,
    RequestsSection,
    TelemetrySection,
)

from ._estimate import estimate_section
from ._model import probabilities
from ._mqtt import MqttLink
from ._outbox import Outbox
from ._quality import QualityWindow
from ._slot import ModelSlot
from ._stats import Interval, RequestStats
from ._system import SystemSampler
from .config import AgentConfig

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["MetricsSource", "build_metrics", "prometheus_text"]


class MetricsSource(Protocol):
    """What the metrics are read from (the agent provides it)."""

    config: AgentConfig
    slot: ModelSlot
    stats: RequestStats
    window: QualityWindow
    system: SystemSampler
    outbox: Outbox | None
    link: MqttLink | None
    class_totals: Counter[str]

    @property
    def started(self) -> float: ...


def predictions_section(agent: MetricsSource, interval: Interval
                        ) -> tuple[PredictionsSection, np.ndarray | None]:
    """Histogram and mean confidence of the interval's classifier outputs (and their rows,
    for the estimate), and the running totals per class kept for /metrics."""
    model = agent.slot.current
    if not interval.outputs:
        return PredictionsSection(count=0, histogram={}, mean_confidence=None), None
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
    top = probs.max(axis=1)
    return PredictionsSection(count=int(len(rows)), histogram=histogram,
                              mean_confidence=float(top.mean())), rows


def build_metrics(agent: MetricsSource, interval: Interval) -> MetricsPayload:
    """The metrics of one interval; ``seq`` is filled in when it is queued."""
    model = agent.slot.current
    stats = agent.stats
    outbox = agent.outbox
    predictions, rows = predictions_section(agent, interval)
    return MetricsPayload(
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
        predictions=predictions,
        quality=agent.window.snapshot(),
        telemetry=TelemetrySection(
            queue_depth=outbox.depth if outbox is not None else 0,
            dropped_total=outbox.dropped if outbox is not None else 0,
            queue_bytes=outbox.bytes if outbox is not None else 0,
        ),
        estimate=estimate_section(model, rows),
    )


def prometheus_text(agent: MetricsSource, last: MetricsPayload | None) -> str:
    """The Prometheus text exposition of the agent's numbers, through prometheus_client.

    Counters and the request latency histogram (seconds, cumulative since start, with
    ``_sum`` and ``_count``) are live; throughput and CPU are gauges of the last interval.
    """
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_AgentCollector(agent, last))
    return generate_latest(registry).decode("utf-8")


class _AgentCollector:
    """Reads the agent's state at scrape time (nothing is kept twice)."""

    def __init__(self, agent: MetricsSource, last: MetricsPayload | None) -> None:
        self.agent = agent
        self.last = last

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        agent = self.agent
        stats = agent.stats
        yield CounterMetricFamily("edgekit_agent_requests", "Answered inference requests.",
                                  value=stats.requests_total)
        yield CounterMetricFamily("edgekit_agent_errors", "Refused or failed requests.",
                                  value=stats.errors_total)
        hist = stats.latency_histogram()
        yield HistogramMetricFamily(
            "edgekit_agent_request_latency_seconds",
            "Inference request latency in seconds, since the agent started.",
            buckets=[("+Inf" if b == float("inf") else repr(b), n) for b, n in hist.buckets],
            sum_value=hist.sum_s)
        yield GaugeMetricFamily("edgekit_agent_up_seconds", "Seconds since the agent started.",
                                value=time.time() - agent.started)
        info = GaugeMetricFamily("edgekit_agent_model_info", "The model in service (value 1).",
                                 labels=["name", "version", "sha256", "runtime"])
        model = agent.slot.current
        if model is not None:
            info.add_metric([model.name, model.version, model.sha256, model.runtime], 1)
        yield info
        yield GaugeMetricFamily("edgekit_agent_mqtt_connected",
                                "1 while the broker connection is up.",
                                value=1 if agent.link is not None and agent.link.connected else 0)
        yield from _quality_metrics(agent)
        if agent.outbox is not None:
            yield GaugeMetricFamily("edgekit_agent_telemetry_queue_depth",
                                    "Messages waiting to be sent.", value=agent.outbox.depth)
            yield GaugeMetricFamily("edgekit_agent_telemetry_queue_bytes",
                                    "Bytes of the messages waiting to be sent.",
                                    value=agent.outbox.bytes)
            yield CounterMetricFamily("edgekit_agent_telemetry_dropped",
                                      "Messages dropped at the queue's bounds (messages,"
                                      " bytes).", value=agent.outbox.dropped)
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of the agent.",
                                value=agent.system.rss_bytes())
        if self.last is not None:
            yield from _interval_metrics(self.last)


def _quality_metrics(agent: MetricsSource) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    quality = agent.window.snapshot()
    yield GaugeMetricFamily("edgekit_agent_window_labels", "Labelled predictions in the window.",
                            value=quality.labels)
    if quality.accuracy is not None and quality.f1_macro is not None:
        yield GaugeMetricFamily("edgekit_agent_window_accuracy",
                                "Accuracy over the labelled window.", value=quality.accuracy)
        yield GaugeMetricFamily("edgekit_agent_window_f1_macro",
                                "Macro F1 over the labelled window.", value=quality.f1_macro)
    yield CounterMetricFamily("edgekit_agent_feedback", "Labels received.",
                              value=quality.feedback_total)
    per_class = CounterMetricFamily("edgekit_agent_predictions",
                                    "Predicted rows per class (updated each telemetry"
                                    " interval).", labels=["label"])
    totals: Counter[str] = agent.class_totals
    for label, count in sorted(totals.items()):
        per_class.add_metric([label], count)
    yield per_class


def _interval_metrics(last: MetricsPayload) -> Iterator[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    yield GaugeMetricFamily("edgekit_agent_throughput_rps",
                            "Requests per second, last interval.", value=last.throughput_rps)
    if last.estimate is not None:
        yield GaugeMetricFamily("edgekit_agent_estimated_accuracy",
                                "Accuracy estimated without labels (the package's estimate),"
                                " last interval.", value=last.estimate.accuracy)
    system = last.system
    if system.cpu_percent is not None:
        yield GaugeMetricFamily("edgekit_agent_cpu_percent", "CPU of the agent, last interval.",
                                value=system.cpu_percent)
    if system.temperature_c is not None:
        yield GaugeMetricFamily("edgekit_agent_temperature_celsius", "Hottest thermal zone.",
                                value=system.temperature_c)
