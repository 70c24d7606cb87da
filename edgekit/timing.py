"""Latency measurement shared by convert reports, ``edgekit bench`` and the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["LatencyStats", "measure"]


@dataclass
class LatencyStats:
    runs: int
    warmup_runs: int
    warmup_ms: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(fn: Callable[[], Any], runs: int = 50, warmup: int = 5) -> LatencyStats:
    """Time ``fn``: warm-up calls are timed apart and excluded from the percentiles."""
    w0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    warm_ms = (time.perf_counter() - w0) * 1000.0
    samples = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        fn()
        samples[i] = (time.perf_counter() - t0) * 1000.0
    return LatencyStats(
        runs=runs,
        warmup_runs=warmup,
        warmup_ms=warm_ms,
        mean_ms=float(samples.mean()),
        p50_ms=float(np.percentile(samples, 50)),
        p95_ms=float(np.percentile(samples, 95)),
        p99_ms=float(np.percentile(samples, 99)),
    )
