"""Request counters and per-interval buffers, kept cheap on the request path.

A request adds its latency and a copy of its primary output (classifiers) to the current
interval under one lock; the telemetry thread takes the interval and does the numpy work
(percentiles, argmax, confidence) off the request path.
"""

from __future__ import annotations

import bisect
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from edgekit.protocol import LatencySection

__all__ = ["LATENCY_BUCKETS_S", "Interval", "LatencyHistogram", "RequestStats"]

# Upper bounds (seconds) of the cumulative latency histogram /metrics exposes: from the
# 10 us of a tiny model to seconds on a loaded Pi.
LATENCY_BUCKETS_S = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                     0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Above this many requests in one interval, latencies are kept by reservoir sampling so the
# memory of a busy interval stays bounded; counts stay exact.
_MAX_SAMPLES = 20000


@dataclass
class Interval:
    """What happened between two telemetry ticks."""

    started: float
    ended: float
    requests: int = 0
    errors: int = 0
    by_channel: Counter[str] = field(default_factory=Counter)
    errors_by_code: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return max(self.ended - self.started, 1e-9)

    def latency(self) -> LatencySection:
        if not self.latencies_s:
            return LatencySection(count=0, mean_ms=None, p50_ms=None, p95_ms=None, p99_ms=None)
        ms = np.asarray(self.latencies_s) * 1000.0
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        return LatencySection(count=self.requests, mean_ms=float(ms.mean()), p50_ms=float(p50),
                              p95_ms=float(p95), p99_ms=float(p99))


@dataclass(frozen=True)
class LatencyHistogram:
    """Request latencies since the agent started: cumulative counts per upper bound
    (seconds, the last one ``+Inf``), their sum and count; never reset, so Prometheus'
    ``rate()`` and ``histogram_quantile()`` work across scrapes."""

    buckets: list[tuple[float, int]]
    sum_s: float
    count: int


class RequestStats:
    """Totals since start and the open interval. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests_total = 0
        self.errors_total = 0
        # One slot per bucket plus the overflow; a bisect on the request path is cheaper
        # than a prometheus_client Histogram.observe (its own lock), and the collector
        # turns these into the same exposition.
        self._bucket_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self._latency_sum_s = 0.0
        self._interval = Interval(time.time(), 0.0)
        # The stdlib generator: a reservoir slot costs 0.1 us with it, ~2 us with numpy's.
        self._random = random.Random()

    def record(self, channel: str, latency_s: float, primary: np.ndarray | None) -> None:
        with self._lock:
            iv = self._interval
            iv.requests += 1
            iv.by_channel[channel] += 1
            self.requests_total += 1
            self._bucket_counts[bisect.bisect_left(LATENCY_BUCKETS_S, latency_s)] += 1
            self._latency_sum_s += latency_s
            if len(iv.latencies_s) < _MAX_SAMPLES:
                iv.latencies_s.append(latency_s)
                if primary is not None:
                    iv.outputs.append(primary)
            else:
                slot = int(self._random.random() * iv.requests)
                if slot < _MAX_SAMPLES:
                    iv.latencies_s[slot] = latency_s
                    if primary is not None and slot < len(iv.outputs):
                        iv.outputs[slot] = primary

    def error(self, channel: str, code: str) -> None:
        with self._lock:
            iv = self._interval
            iv.errors += 1
            iv.by_channel[channel] += 0
            iv.errors_by_code[code] += 1
            self.errors_total += 1

    def latency_histogram(self) -> LatencyHistogram:
        """The cumulative latency histogram since start."""
        with self._lock:
            counts = list(self._bucket_counts)
            total_s = self._latency_sum_s
        cumulative, running = [], 0
        for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), counts, strict=True):
            running += n
            cumulative.append((bound, running))
        return LatencyHistogram(cumulative, total_s, running)

    def take(self) -> Interval:
        """Close the open interval and start a new one."""
        now = time.time()
        with self._lock:
            done, self._interval = self._interval, Interval(now, 0.0)
        done.ended = now
        return done
