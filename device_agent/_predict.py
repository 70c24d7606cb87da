"""The request path: answer a request with the model in service, and take its label later.

:class:`Predictor` reads the slot's :class:`~device_agent._slot.Serving` once per request,
checks the inputs, runs the model (through the probation's watch while one runs), records
the request for telemetry and feedback, and tells the observers. It depends on the slot,
the statistics, the prediction log, the quality window and the event sink, nothing else.

Observers (:meth:`Predictor.observe`) receive a :class:`Served` after every request the
model ran, in the requesting thread. That is the hook for work beside the request: a part
that evaluates a candidate model on a sample of requests (a shadow evaluation) registers an
observer that puts the sampled feeds on its own bounded queue and returns, and a worker
thread of its own runs the candidate off the request path.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError, InputError, RuntimeBackendError
from edgekit.protocol import ErrorCode, Kind, SamplePayload, encode_array

from ._events import EventSink
from ._model import LoadedModel, Prediction
from ._probation import AnsweredByPrevious
from ._quality import PredictionLog, QualityWindow, SampleGate
from ._slot import ModelSlot
from ._stats import FOLD_AT, RequestStats
from .config import DeviceSection
from .errors import RequestError

__all__ = ["LabelListener", "Observer", "Predictor", "Served"]

log = logging.getLogger("device_agent")

_now = time.perf_counter


class Served:
    """One request the model ran: ``outputs`` on success, ``error`` when the runtime failed.
    ``feeds`` are the checked inputs (the model's dtypes); like ``outputs`` they belong to
    the request: an observer that keeps them past its call copies them. ``prediction_id``
    is the id the caller gets back ("" when the runtime failed)."""

    __slots__ = ("error", "feeds", "latency_s", "model", "outputs", "prediction_id")

    def __init__(self, model: LoadedModel, feeds: dict[str, np.ndarray],
                 outputs: dict[str, np.ndarray] | None, latency_s: float,
                 error: Exception | None, prediction_id: str = "") -> None:
        self.model = model
        self.feeds = feeds
        self.outputs = outputs
        self.latency_s = latency_s
        self.error = error
        self.prediction_id = prediction_id


Observer = Callable[[Served], None]
LabelListener = Callable[[str, list[int]], None]


class Predictor:
    """Predictions and feedback of one agent; see the module docstring."""

    # Slots: the request path reads a dozen of these after the model ran, when the
    # runtime has pushed most else out of the CPU's caches.
    __slots__ = ("_id_prefix", "_ids", "_log_ring", "_log_size", "_pending", "device", "events",
                 "label_listeners", "observers", "predictions", "samples", "slot", "stats",
                 "window")

    def __init__(self, slot: ModelSlot, stats: RequestStats, predictions: PredictionLog,
                 window: QualityWindow, samples: SampleGate, events: EventSink,
                 device: DeviceSection) -> None:
        self.slot = slot
        self.stats = stats
        self.predictions = predictions
        self.window = window
        self.samples = samples
        self.events = events
        self.device = device
        # Replaced, never changed in place, so a request iterates a stable list while
        # another thread adds or removes one.
        self.observers: list[Observer] = []
        self.label_listeners: list[LabelListener] = []
        self._ids = itertools.count(1)
        self._id_prefix = predictions.prefix
        # The prediction log's ring and the statistics' pending deque, written inline by
        # :meth:`predict` (PredictionLog.add and RequestStats.record without their calls).
        self._log_ring = predictions.ring
        self._log_size = predictions.capacity
        self._pending = stats.pending

    @property
    def model(self) -> LoadedModel | None:
        """The model in service."""
        return self.slot.current

    def observe(self, observer: Observer) -> None:
        self.observers = [*self.observers, observer]

    def unobserve(self, observer: Observer) -> None:
        self.observers = [o for o in self.observers if o is not observer]

    def on_label(self, listener: LabelListener) -> None:
        """Call ``listener(prediction_id, classes)`` after every accepted label (in the
        feedback's thread): a shadow evaluation scores its candidate with them."""
        self.label_listeners = [*self.label_listeners, listener]

    def off_label(self, listener: LabelListener) -> None:
        self.label_listeners = [f for f in self.label_listeners if f is not listener]

    def refused(self, channel: str, code: str) -> None:
        """Count a request refused before it reached :meth:`predict` (or by the transport)."""
        self.stats.error(channel, code)

    def feedback_refused(self) -> None:
        """Count a feedback message refused before it reached :meth:`feedback`."""
        self.window.rejected()

    def predict(self, inputs: Mapping[str, Any], channel: str = "python") -> Prediction:
        """Raises: as :meth:`device_agent.Agent.predict`."""
        t0 = _now()
        serving = self.slot.serving
        if serving is None:
            self.stats.error(channel, ErrorCode.NO_MODEL.value)
            raise RequestError(ErrorCode.NO_MODEL, "no model is active on this device",
                               hint="start the agent with --model PKG, or deploy one")
        try:
            feeds, outputs = serving.answer(inputs)
            model = serving.model
        except AnsweredByPrevious as answer:
            # In a probation, the previous model answered for a new one that failed.
            model, outputs, feeds = answer.model, answer.outputs, answer.feeds
        except InputError:
            self.stats.error(channel, ErrorCode.INVALID_INPUT.value)
            raise
        except RuntimeBackendError as exc:
            self.stats.error(channel, ErrorCode.INTERNAL.value)
            observers = self.observers
            if observers:
                # The inputs passed the check before the run failed: checking them again
                # gives the same feeds, off the path of a request that succeeds.
                served = Served(serving.model, serving.model.validator.check(inputs), None,
                                _now() - t0, exc)
                for observer in observers:
                    observer(served)
            raise
        latency = _now() - t0
        seq = next(self._ids)
        scores = None
        if model.num_classes is not None:
            # Kept by reference: the copy, the argmax and the inputs' copy (for a sample)
            # wait until a label comes; the caller does not change its outputs.
            scores = outputs[model.primary_output]
            samples = self.samples
            if seq >= samples.next_pick:
                samples.picked(seq)
                self.predictions.add(seq, model.sha256, scores,
                                     {k: v.copy() for k, v in feeds.items()})
            else:
                self._log_ring[seq % self._log_size] = (seq, model.sha256, scores, None)
        pending = self._pending
        pending.append((channel, latency, scores))
        if len(pending) >= FOLD_AT:
            self.stats.fold()
        observers = self.observers
        if observers:
            served = Served(model, feeds, outputs, latency, None, self._id_prefix + str(seq))
            for observer in observers:
                observer(served)
        return Prediction(self._id_prefix, seq, outputs, model, latency * 1000.0)

    def feedback(self, prediction_id: str, label: int | str | None = None,
                 labels: list[int | str] | None = None) -> int:
        """Raises: as :meth:`device_agent.Agent.feedback`."""
        model = self.slot.current
        try:
            if model is None or model.num_classes is None:
                raise RequestError(ErrorCode.UNSUPPORTED, "feedback needs a classification model")
            if not isinstance(prediction_id, str) or not prediction_id:
                raise RequestError(ErrorCode.BAD_REQUEST,
                                   "prediction_id must be a non-empty string")
            entry = self.predictions.claim(prediction_id)
            try:
                if entry.model_sha256 != model.sha256:
                    raise RequestError(ErrorCode.UNSUPPORTED,
                                       f"prediction {prediction_id} was made by a model that is"
                                       " no longer in service; its label does not count")
                predicted = entry.classes()
                truth = _class_ids(model, label, labels, len(predicted))
            except RequestError:
                self.predictions.release(prediction_id)
                raise
        except RequestError:
            self.window.rejected()
            raise
        self.window.add(truth, predicted.tolist())
        for listener in self.label_listeners:
            listener(prediction_id, truth)
        if entry.inputs is not None and self.events.outbox is not None and self.samples.allow():
            self._queue_sample(prediction_id, model, entry.inputs, truth, predicted.tolist())
        return len(truth)

    def _queue_sample(self, pid: str, model: LoadedModel, inputs: dict[str, np.ndarray],
                      truth: list[int], predicted: list[int]) -> None:
        try:
            encoded = {k: encode_array(v) for k, v in inputs.items()}
        except EdgekitError as exc:
            log.warning("sample %s not sent: %s", pid, exc.message)
            return
        payload = SamplePayload(device=self.device.id, fleet=self.device.fleet, seq=0,
                                ts=time.time(), prediction_id=pid, model=model.ref,
                                inputs=encoded, label=truth, prediction=predicted)
        self.events.queue(Kind.SAMPLES, payload)


def _class_ids(model: LoadedModel, label: Any, labels: Any, rows: int) -> list[int]:
    if (label is None) == (labels is None):
        raise RequestError(ErrorCode.BAD_REQUEST, "give either 'label' or 'labels'")
    values = [label] if labels is None else labels
    if not isinstance(values, list) or len(values) != rows:
        raise RequestError(ErrorCode.BAD_REQUEST,
                           f"the prediction has {rows} row(s); give one label per row")
    names = model.manifest.labels or []
    n = model.num_classes or 0
    out = []
    for value in values:
        if isinstance(value, str) and value in names:
            value = names.index(value)
        elif isinstance(value, str) and value.isdigit():
            value = int(value)
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or not 0 <= value < n:
            raise RequestError(ErrorCode.INVALID_INPUT,
                               f"label {value!r} is not a class of {model.name} (0..{n - 1}"
                               + (f" or one of {names}" if names else "") + ")")
        out.append(int(value))
    return out
