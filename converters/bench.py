"""Benchmark a ``.edgepkg`` on the runtime the device uses: load time, latency, memory.

The package is loaded through :mod:`edgekit.runtimes`, exactly as the device agent loads
it. Reported apart: loading (reading and verifying the package, creating the session), the
first (cold) inference, the warm-up runs, and the timed runs (p50 / p95 / p99, throughput).
Memory is the process's resident set size sampled in the background from before loading
to the end of the runs, and Python's own allocations (tracemalloc) while loading and on the
first inference; the runtime's native buffers show only in the resident set.
"""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgekit.artifact import open_package
from edgekit.data import Dataset, check_inputs, load_npz
from edgekit.errors import DataError, UsageError
from edgekit.manifest import TensorSpec
from edgekit.runtimes import RuntimeOptions, backend_for
from edgekit.timing import measure

__all__ = ["BenchReport", "bench", "bench_inputs"]

_MB = 1024.0 * 1024.0


@dataclass
class BenchReport:
    """Everything ``edgekit bench`` measured; ``to_dict`` is its stable JSON form."""

    package: str
    name: str
    version: str
    runtime: str
    runtime_version: str | None
    threads: int
    batch: int
    inputs: str
    load: dict[str, float]
    first_run_ms: float
    latency: dict[str, Any]
    throughput_per_s: float
    memory: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _RssSampler:
    """Samples the resident set size every few milliseconds on a background thread."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self._interval = interval_s
        self._stop = threading.Event()
        self.start_bytes = _rss_bytes()
        self.peak_bytes = self.start_bytes or 0
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = _rss_bytes()
            if now is not None and now > self.peak_bytes:
                self.peak_bytes = now
            self._stop.wait(self._interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        now = _rss_bytes()
        if now is not None and now > self.peak_bytes:
            self.peak_bytes = now


def bench_inputs(specs: list[TensorSpec], batch: int, *, data: Dataset | None,
                 golden: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """One batch of inputs: from the data file, else the package's golden samples, else
    random values for fully known shapes. Rows repeat to fill the batch.

    Raises:
        UsageError: the model has a fixed batch size other than ``batch``.
        DataError: the data do not fit, or no inputs can be made for symbolic dimensions.
    """
    for spec in specs:
        first = spec.shape[0] if spec.shape else None
        if isinstance(first, int) and first != batch:
            raise UsageError(f"input '{spec.name}' has a fixed batch of {first}; --batch"
                             f" {batch} cannot run", hint=f"use --batch {first}")
    if data is not None:
        rows, origin = check_inputs(data.inputs, specs, f"bench data {data.source}"), data.source
    elif golden and all(s.name in golden for s in specs):
        rows, origin = {s.name: golden[s.name] for s in specs}, "golden samples"
    else:
        rows, origin = {}, "random"
        rng = np.random.default_rng(0)
        for spec in specs:
            dims = spec.shape[1:]
            if not all(isinstance(d, int) for d in dims):
                raise DataError(f"input '{spec.name}' has symbolic dimensions {spec.shape}"
                                " and the package has no golden samples",
                                hint="pass --data with real inputs")
            shape = (1, *(int(d) for d in dims))
            if np.issubdtype(np.dtype(spec.dtype), np.integer):
                rows[spec.name] = rng.integers(0, 100, size=shape).astype(spec.dtype)
            else:
                rows[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    out = {}
    for name, arr in rows.items():
        reps = -(-batch // len(arr))
        out[name] = np.ascontiguousarray(np.concatenate([arr] * reps)[:batch])
    return out, origin


def bench(
    package: str | os.PathLike[str],
    *,
    threads: int = 1,
    batch: int = 1,
    runs: int = 100,
    warmup: int = 10,
    data: str | os.PathLike[str] | Dataset | None = None,
) -> BenchReport:
    """Load the package in its runtime and time it.

    Raises:
        UsageError: threads, batch, runs or warmup out of range, or a fixed batch mismatch.
        ArtifactError: the package is missing or corrupt.
        RuntimeBackendError: its runtime is missing or cannot load or run the model.
        DataError: the data do not fit the model's inputs.
    """
    if threads < 0 or batch < 1 or runs < 1 or warmup < 0:
        raise UsageError(f"need --threads >= 0, --batch >= 1, --runs >= 1, --warmup >= 0"
                         f" (got {threads}, {batch}, {runs}, {warmup})")
    ds = data if isinstance(data, Dataset) or data is None else load_npz(data)
    with _RssSampler() as rss:
        tracemalloc.start()
        try:
            t0 = time.perf_counter()
            pkg = open_package(package)
            model = pkg.model_bytes()
            golden = pkg.golden()[0]
            t1 = time.perf_counter()
            backend = backend_for(pkg.manifest.format.value)
            session = backend.load(model, pkg.manifest.inputs, pkg.manifest.outputs,
                                   RuntimeOptions(threads=threads))
            t2 = time.perf_counter()
            feeds, origin = bench_inputs(pkg.manifest.inputs, batch, data=ds, golden=golden)
            t3 = time.perf_counter()
            session.run(feeds)
            first_ms = (time.perf_counter() - t3) * 1000.0
            _, py_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        stats = measure(lambda: session.run(feeds), runs=runs, warmup=warmup)
    info = backend.info()
    start = rss.start_bytes
    memory: dict[str, Any] = {
        "rss_before_mb": start / _MB if start is not None else None,
        "rss_peak_mb": rss.peak_bytes / _MB if start is not None else None,
        "rss_increase_mb": (rss.peak_bytes - start) / _MB if start is not None else None,
        "python_peak_mb": py_peak / _MB,
        "method": "resident set sampled every 2 ms; Python allocations by tracemalloc"
                  " while loading and on the first run",
    }
    return BenchReport(
        package=str(package), name=pkg.manifest.name, version=pkg.manifest.version,
        runtime=backend.KEY, runtime_version=info.version, threads=threads, batch=batch,
        inputs=origin,
        load={"read_ms": (t1 - t0) * 1000.0, "session_ms": (t2 - t1) * 1000.0,
              "total_ms": (t2 - t0) * 1000.0},
        first_run_ms=first_ms, latency=stats.to_dict(),
        throughput_per_s=batch * 1000.0 / stats.mean_ms if stats.mean_ms > 0 else 0.0,
        memory=memory,
    )
