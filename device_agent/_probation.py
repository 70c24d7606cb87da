"""Probation: watching a newly activated model, and answering for it when it misbehaves.

While a probation runs, the model slot answers requests with :meth:`ProbationWatch.run`
instead of the plain session call (no branch on the request path outside a probation): it
answers with the new model and records what happened: a failure of the runtime, NaN or infinite outputs, the latency.
A request the new model fails, or answers with non-finite numbers, is answered by the
previous model (kept loaded until the probation ends), so no client sees the failure. A
non-finite output counts against the new model only when the previous model stays finite on
the same input: an input that overflows both (one huge finite value) says nothing about the
update and must not roll a good deployment back. The updater asks
:meth:`ProbationWatch.verdict` for the outcome and tells the slot to end the probation or to
roll back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.errors import RuntimeBackendError
from edgekit.protocol.ota import Probation, UpdateReason

from ._model import LoadedModel

__all__ = ["AnsweredByPrevious", "ProbationWatch", "Verdict"]

_MIN_LATENCY_SAMPLES = 5


class AnsweredByPrevious(Exception):  # noqa: N818 (an answer, not an error)
    """Raised by :meth:`ProbationWatch.answer` when the previous model answered a request
    the new one failed: it carries the answer, so the request path (which expects the
    new model's outputs and has no branch for a probation) reports the model that answered.
    """

    def __init__(self, model: LoadedModel, outputs: dict[str, np.ndarray],
                 feeds: dict[str, np.ndarray]) -> None:
        super().__init__(model.name)
        self.model = model
        self.outputs = outputs
        self.feeds = feeds  # the checked inputs both models were given


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: UpdateReason | None
    message: str
    details: dict[str, Any]


@dataclass
class ProbationWatch:
    """The counts of one probation."""

    new: LoadedModel
    previous: LoadedModel | None
    settings: Probation
    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    errors: int = 0
    nonfinite: int = 0
    nonfinite_both: int = 0  # inputs on which the previous model was not finite either
    fallbacks: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    changed: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, *, latency_ms: float | None, error: bool = False, nonfinite: bool = False,
               nonfinite_both: bool = False, fallback: bool = False) -> None:
        with self._lock:
            self.requests += 1
            self.errors += error
            self.nonfinite += nonfinite
            self.nonfinite_both += nonfinite_both
            self.fallbacks += fallback
            if latency_ms is not None:
                self.latencies_ms.append(latency_ms)
        self.changed.set()

    def details(self) -> dict[str, Any]:
        with self._lock:
            lat = list(self.latencies_ms)
            return {"requests": self.requests, "errors": self.errors,
                    "nonfinite": self.nonfinite, "nonfinite_on_both": self.nonfinite_both,
                    "answered_by_previous": self.fallbacks,
                    "p95_ms": round(float(np.percentile(lat, 95)), 3) if lat else None,
                    "seconds": round(time.monotonic() - self.started, 3)}

    def verdict(self) -> Verdict | None:
        """None while the probation goes on; else pass, or fail with the reason."""
        s = self.settings
        d = self.details()
        n = d["requests"]
        if n:
            if d["errors"] / n > s.max_error_rate:
                return Verdict(False, UpdateReason.PROBATION_ERRORS,
                               f"{d['errors']} of {n} requests failed on the new model"
                               f" (allowed: {s.max_error_rate:.1%})", d)
            if d["nonfinite"] / n > s.max_nonfinite_rate:
                return Verdict(False, UpdateReason.NONFINITE_OUTPUT,
                               f"{d['nonfinite']} of {n} requests gave NaN or infinite outputs"
                               f" (allowed: {s.max_nonfinite_rate:.1%})", d)
        limit = s.max_latency_ms
        enough = len(self.latencies_ms) >= min(_MIN_LATENCY_SAMPLES, max(1, s.requests))
        if limit is not None and enough and d["p95_ms"] is not None and d["p95_ms"] > limit:
            return Verdict(False, UpdateReason.SLOW,
                           f"p95 latency {d['p95_ms']:.1f} ms over {limit:g} ms", d)
        done_requests = s.requests > 0 and n >= s.requests
        done_seconds = s.seconds > 0 and d["seconds"] >= s.seconds
        if done_requests or done_seconds or (s.requests == 0 and s.seconds == 0):
            return Verdict(True, None, f"probation passed after {n} requests in"
                           f" {d['seconds']:.1f} s", d)
        return None

    def time_left(self) -> float:
        s = self.settings
        if s.seconds <= 0:
            return 1.0
        return max(0.0, s.seconds - (time.monotonic() - self.started))

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[LoadedModel, dict[str, np.ndarray]]:
        """Answer checked ``feeds`` with the new model, watch it, and fall back to the
        previous model when it fails; return the model that answered and its outputs.

        Raises:
            RuntimeBackendError: the new model failed and no previous model could answer.
        """
        model = self.new
        t0 = time.perf_counter()
        try:
            outputs = model.session.run_checked(feeds)
        except RuntimeBackendError:
            fallback = self._fallback(feeds)
            self.record(latency_ms=None, error=True, fallback=fallback is not None)
            if fallback is None:
                raise
            return fallback
        latency_ms = (time.perf_counter() - t0) * 1000.0
        if _finite(outputs):
            self.record(latency_ms=latency_ms)
            return model, outputs
        fallback = self._fallback(feeds)
        if fallback is not None and not _finite(fallback[1]):
            # The serving model overflows on this input too: the input is at fault.
            self.record(latency_ms=latency_ms, nonfinite_both=True)
            return model, outputs
        self.record(latency_ms=latency_ms, nonfinite=True, fallback=fallback is not None)
        return fallback if fallback is not None else (model, outputs)

    def answer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:meth:`run` as the model slot serves it: the new model's outputs.

        Raises:
            AnsweredByPrevious: the previous model answered instead (with its outputs).
            RuntimeBackendError: the new model failed and no previous model could answer.
        """
        model, outputs = self.run(feeds)
        if model is not self.new:
            raise AnsweredByPrevious(model, outputs, feeds)
        return outputs

    def _fallback(self, feeds: Mapping[str, np.ndarray]
                  ) -> tuple[LoadedModel, dict[str, np.ndarray]] | None:
        previous = self.previous
        if previous is None:
            return None
        try:
            return previous, previous.session.run(dict(feeds))
        except Exception:
            # A breaking update: the old model does not take the new inputs.
            return None


def _finite(outputs: Mapping[str, np.ndarray]) -> bool:
    return all(np.isfinite(a).all() for a in outputs.values()
               if np.issubdtype(a.dtype, np.floating))
