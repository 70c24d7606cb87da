"""Shadow evaluation: a candidate model runs beside the model in service, off the request path.

The request path calls :meth:`ShadowRunner.offer` after the serving model answered: a
sampled request's inputs and primary output are copied into a bounded queue (a full queue
drops the request and counts it), and that is all the request pays. One worker thread runs
the candidate on what it takes from the queue, compares the two outputs, and then sleeps in
proportion to its own compute time, so the candidate uses at most ``cpu_share`` of one core
on average; on Linux the worker also runs at a lower priority (nice 10), so a request
wins most of a core both want. Feedback on a prediction (:meth:`ShadowRunner.label`) scores both models.
The runner never touches what the serving model returned.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.metrics import classification_report, cosine_similarity
from edgekit.protocol.ota.shadow import ModelFigures, ShadowReport

from ._model import LoadedModel, probabilities

if TYPE_CHECKING:
    from ._predict import Predictor, Served

__all__ = ["DEFAULT_CPU_SHARE", "DEFAULT_QUEUE", "ShadowRunner"]

log = logging.getLogger("device_agent.shadow")

DEFAULT_CPU_SHARE = 0.25
DEFAULT_QUEUE = 16
_KEEP = 10_000  # predictions kept waiting for feedback, and latencies kept per model
_NICE = 10
_IDLE_POLL_S = 0.005


class _Side:
    """What one model did on the shadowed requests."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.latency_ms: deque[float] = deque(maxlen=_KEEP)
        self.confidence_sum = 0.0
        self.confidence_rows = 0
        self.errors = 0
        self.labelled_pred: list[int] = []

    def add_confidence(self, scores: np.ndarray) -> None:
        conf = probabilities(scores).max(axis=1)
        self.confidence_sum += float(np.nansum(conf))
        self.confidence_rows += len(conf)

    def figures(self, truth: list[int]) -> ModelFigures:
        lat = np.asarray(self.latency_ms, dtype=np.float64)
        acc = f1 = None
        if truth:
            report = classification_report(truth, self.labelled_pred,
                                           self.model.num_classes)
            acc, f1 = report.accuracy, report.f1
        m = self.model
        return ModelFigures(
            name=m.name, version=m.version, sha256=m.sha256, accuracy=acc, f1=f1,
            confidence=(min(1.0, self.confidence_sum / self.confidence_rows)
                        if self.confidence_rows else None),
            latency_p50_ms=float(np.percentile(lat, 50)) if lat.size else None,
            latency_p95_ms=float(np.percentile(lat, 95)) if lat.size else None,
            errors=self.errors)


class ShadowRunner:
    """Runs ``candidate`` beside ``serving`` on a ``sample`` of requests until ``target``
    of them were compared (:attr:`done` is set then); see the module docstring."""

    def __init__(self, candidate: LoadedModel, serving: LoadedModel, *, target: int,
                 sample: float, cpu_share: float = DEFAULT_CPU_SHARE,
                 queue_size: int = DEFAULT_QUEUE, seed: int | None = None) -> None:
        self.serving = _Side(serving)
        self.candidate = _Side(candidate)
        self.target = target
        self.sample = sample
        self.cpu_share = min(1.0, max(0.01, cpu_share))
        self.kind = ("classifier" if serving.num_classes is not None
                     and candidate.num_classes is not None else
                     "embedding" if serving.num_classes is None
                     and candidate.num_classes is None else "other")
        self.done = threading.Event()
        self.offered = 0
        self.dropped = 0
        self.requests = 0
        self.rows = 0
        self._agree = 0.0  # agreeing rows (classifiers) or summed cosine (embeddings)
        self._queue: deque[Any] = deque()
        self._queue_size = queue_size
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts = threading.Lock()  # request threads: offered, dropped, the sampler
        self._pending: OrderedDict[str, tuple[list[int], list[int]]] = OrderedDict()
        self._truths: OrderedDict[str, list[int]] = OrderedDict()
        self._truth: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="shadow", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- request path

    def offer(self, pid: str, model: LoadedModel, feeds: dict[str, np.ndarray],
              outputs: dict[str, np.ndarray], latency_s: float) -> None:
        """After the serving model answered: maybe queue a copy for the candidate. Never
        blocks and never raises."""
        if model.sha256 != self.serving.model.sha256 or self.done.is_set():
            return
        with self._counts:
            self.offered += 1
            if self._rng.random() >= self.sample:
                return
            if len(self._queue) >= self._queue_size:
                self.dropped += 1
                return
        primary = outputs.get(model.primary_output)
        if primary is None:
            return
        # deque.append is atomic: no condition variable to notify on the request path.
        self._queue.append((pid, {k: np.array(a, copy=True) for k, a in feeds.items()},
                            np.array(primary, copy=True), latency_s * 1000.0))

    def label(self, pid: str, truth: list[int]) -> None:
        """Feedback on a prediction: scores both models if the candidate ran on it."""
        with self._lock:
            preds = self._pending.pop(pid, None)
            if preds is None:
                _bounded_put(self._truths, pid, truth)
                return
            self._score(truth, preds)

    # ---------------------------------------------------------------- worker

    def _work(self) -> None:
        _lower_priority()
        while not self._stop.is_set():
            try:
                item = self._queue.popleft()
            except IndexError:
                self._stop.wait(_IDLE_POLL_S)  # polled: the request path never signals
                continue
            t0 = time.perf_counter()
            try:
                self._compare(*item)
            except Exception:  # the shadow must never take the agent down
                log.exception("shadow comparison failed")
                self.candidate.errors += 1
            spent = time.perf_counter() - t0
            # The CPU share cap: idle long enough that compute is cpu_share of the time.
            self._stop.wait(spent * (1.0 - self.cpu_share) / self.cpu_share)

    def _compare(self, pid: str, feeds: dict[str, np.ndarray], served: np.ndarray,
                 served_ms: float) -> None:
        cand = self.candidate.model
        t0 = time.perf_counter()
        try:
            outputs = cand.session.run_checked(cand.validator.check(feeds))
        except EdgekitError as exc:
            log.warning("the shadow candidate failed: %s", exc.message)
            self.candidate.errors += 1
            return
        cand_ms = (time.perf_counter() - t0) * 1000.0
        mine = np.asarray(outputs[cand.primary_output])
        with self._lock:
            self.serving.latency_ms.append(served_ms)
            self.candidate.latency_ms.append(cand_ms)
            if self.kind == "classifier":
                a = _classes(served)
                b = _classes(mine)
                self._agree += float(np.sum(a == b)) if a.shape == b.shape else 0.0
                self.serving.add_confidence(served.reshape(len(served), -1))
                self.candidate.add_confidence(mine.reshape(len(mine), -1))
                preds = (a.tolist(), b.tolist())
                truth = self._truths.pop(pid, None)
                if truth is not None:
                    self._score(truth, preds)
                else:
                    _bounded_put(self._pending, pid, preds)
            elif self.kind == "embedding":
                try:
                    self._agree += float(np.sum(cosine_similarity(served, mine)))
                except EdgekitError:
                    self.candidate.errors += 1
                    return
            self.rows += len(served)
            self.requests += 1
            if self.requests >= self.target:
                self.done.set()

    def _score(self, truth: list[int], preds: tuple[list[int], list[int]]) -> None:
        served, mine = preds
        if len(truth) != len(served) or len(truth) != len(mine) or len(self._truth) >= _KEEP:
            return
        self._truth.extend(truth)
        self.serving.labelled_pred.extend(served)
        self.candidate.labelled_pred.extend(mine)

    # ---------------------------------------------------------------- end

    def close(self) -> None:
        """Stop the worker (what is still queued is not run)."""
        self._stop.set()
        self._thread.join(timeout=5.0)

    def report(self, deployment: str, ended: str) -> ShadowReport:
        """The figures so far, as the wire document."""
        with self._lock:
            agreement = None
            if self.rows and self.kind != "other":
                agreement = max(-1.0, min(1.0, self._agree / self.rows))
            truth = list(self._truth)
            return ShadowReport(
                deployment=deployment, kind=self.kind,  # type: ignore[arg-type]
                target=self.target, requests=self.requests, rows=self.rows,
                offered=self.offered, dropped=self.dropped, agreement=agreement,
                labelled=len(truth), ended=ended,  # type: ignore[arg-type]
                serving=self.serving.figures(truth), candidate=self.candidate.figures(truth))


def _lower_priority() -> None:
    """Lower this thread's CPU priority where the OS allows it per thread (Linux: a thread
    id is a process id to setpriority), so requests win most of a contended core."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
    except (AttributeError, OSError) as exc:
        log.debug("the shadow worker keeps its priority: %s", exc)


def _classes(scores: np.ndarray) -> np.ndarray:
    return np.asarray(scores).reshape(len(scores), -1).argmax(axis=1)


def _bounded_put(store: OrderedDict[str, Any], key: str, value: Any) -> None:
    store[key] = value
    while len(store) > _KEEP:
        store.popitem(last=False)


def attach(requests: Predictor, runner: ShadowRunner) -> Callable[[], None]:
    """Feed ``runner`` the predictions and labels of ``requests`` (the agent's request path,
    as an observer: nothing runs on that path while no shadow is attached); returns the
    function that detaches it."""
    def offer(served: Served) -> None:
        if served.outputs is not None:
            runner.offer(served.prediction_id, served.model, served.feeds, served.outputs,
                         served.latency_s)

    label = runner.label  # one bound method: the same object detaches it
    requests.observe(offer)
    requests.on_label(label)

    def detach() -> None:
        requests.unobserve(offer)
        requests.off_label(label)

    return detach
