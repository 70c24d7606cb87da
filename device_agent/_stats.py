"""Request counters and per-interval buffers, kept cheap on the request path.

A request appends one tuple (channel, latency, primary output) to a pending deque, without
a lock (a deque's append and popleft are atomic); nothing else. :meth:`RequestStats.record`
does that; the agent's request path does the same inline (``pending`` and ``FOLD_AT``). The pending requests are
folded into the counters, the latency histogram and the interval's (reservoir-sampled)
buffers in bulk, under the lock: when they reach a fixed number, and whenever the numbers
are read (a telemetry tick, a /metrics scrape). The telemetry thread does the numpy work on
the interval (percentiles, argmax, confidence) off the request path.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from edgekit.protocol import LatencySection

__all__ = ["FOLD_AT", "LATENCY_BUCKETS_S", "Interval", "LatencyHistogram", "RequestStats"]

# Upper bounds (seconds) of the cumulative latency histogram /metrics exposes: from the
# 10 us of a tiny model to seconds on a loaded Pi.
LATENCY_BUCKETS_S = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                     0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Above this many requests in one interval, latencies are kept by reservoir sampling so the
# memory of a busy interval stays bounded; counts stay exact.
_MAX_SAMPLES = 20000
# Requests recorded before a fold; bounds the pending deque's memory between reads.
FOLD_AT = 2048
_BOUNDS = np.asarray(LATENCY_BUCKETS_S)


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
        self._requests_total = 0
        self.errors_total = 0
        # One slot per bucket plus the overflow, counted in bulk at each fold; the collector
        # turns these into the Prometheus exposition.
        self._bucket_counts = np.zeros(len(LATENCY_BUCKETS_S) + 1, dtype=np.int64)
        self._latency_sum_s = 0.0
        self._interval = Interval(time.time(), 0.0)
        # Appended to by requests without the lock; only a fold (lock held) takes from it.
        # A writer that appends directly calls :meth:`fold` once it holds ``FOLD_AT``.
        self.pending: deque[tuple[str, float, np.ndarray | None]] = deque()
        self._rng = np.random.default_rng()

    @property
    def requests_total(self) -> int:
        """Answered requests since start."""
        with self._lock:
            self._fold()
            return self._requests_total

    def record(self, channel: str, latency_s: float, primary: np.ndarray | None) -> None:
        """Count one answered request; ``primary`` (a classifier's scores) is kept by
        reference for the interval's prediction histogram: the caller does not change it."""
        pending = self.pending
        pending.append((channel, latency_s, primary))
        if len(pending) >= FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Fold the pending requests into the counters now."""
        with self._lock:
            self._fold()

    def _fold(self) -> None:
        """Move the pending requests into the counters and the interval (lock held)."""
        # Only the requests there now: one appended meanwhile waits for the next fold.
        take = self.pending.popleft
        pending = [take() for _ in range(len(self.pending))]
        if not pending:
            return
        channels, latencies, primaries = zip(*pending, strict=True)
        iv = self._interval
        iv.by_channel.update(channels)
        self._requests_total += len(pending)
        lat = np.fromiter(latencies, dtype=np.float64, count=len(latencies))
        self._bucket_counts += np.bincount(np.searchsorted(_BOUNDS, lat, side="left"),
                                           minlength=len(self._bucket_counts))
        self._latency_sum_s += float(lat.sum())
        room = max(0, _MAX_SAMPLES - len(iv.latencies_s))
        iv.latencies_s.extend(latencies[:room])
        iv.outputs.extend(p for p in primaries[:room] if p is not None)
        seen = iv.requests + room
        iv.requests += len(pending)
        rest = len(pending) - room
        if rest > 0:
            # Reservoir sampling of the rest, the draws made in one numpy call: request k
            # (1-based in the interval) replaces a random slot with probability MAX / k.
            slots = (self._rng.random(rest) * np.arange(seen + 1, seen + rest + 1)).astype(
                np.int64)
            for k in np.flatnonzero(slots < _MAX_SAMPLES).tolist():
                slot = int(slots[k])
                iv.latencies_s[slot] = latencies[room + k]
                primary = primaries[room + k]
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
            self._fold()
            counts = self._bucket_counts.tolist()
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
            self._fold()
            done, self._interval = self._interval, Interval(now, 0.0)
        done.ended = now
        return done
