"""Feedback: labels that arrive after the prediction, and the window they are scored in.

:class:`PredictionLog` remembers the last ``quality.prediction_log`` predictions (model,
predicted classes, and the inputs of those picked for sample upload) so a label can find
its prediction later. :class:`QualityWindow` keeps the last ``quality.window`` labelled
rows of the active model and scores them with :func:`edgekit.metrics.classification_report`,
the same function the host uses. A model swap empties the window: accuracy belongs to a
model, and a new one starts from no evidence.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque

import numpy as np

from edgekit.metrics import classification_report
from edgekit.protocol import ErrorCode, QualitySection

from .errors import RequestError

__all__ = ["LoggedPrediction", "PredictionLog", "QualityWindow", "SampleGate"]


class LoggedPrediction:
    """What feedback needs of a prediction: its model, scores, and (if picked) inputs."""

    __slots__ = ("inputs", "labelled", "model_sha256", "scores")

    def __init__(self, model_sha256: str, scores: np.ndarray,
                 inputs: dict[str, np.ndarray] | None) -> None:
        self.model_sha256 = model_sha256
        self.scores = scores  # primary output, a copy
        self.inputs = inputs  # kept only for predictions picked for sample upload
        self.labelled = False

    def classes(self) -> np.ndarray:
        return self.scores.reshape(len(self.scores), -1).argmax(axis=1)


class PredictionLog:
    """The most recent predictions by id, oldest evicted first. Thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, LoggedPrediction] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, prediction_id: str, entry: LoggedPrediction) -> None:
        with self._lock:
            self._items[prediction_id] = entry
            if len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def claim(self, prediction_id: str) -> LoggedPrediction:
        """The entry of a prediction that has no label yet; marks it labelled.

        Raises:
            RequestError: unknown (never made, or evicted) or already labelled.
        """
        with self._lock:
            entry = self._items.get(prediction_id)
            if entry is None:
                raise RequestError(
                    ErrorCode.UNKNOWN_PREDICTION,
                    f"prediction {prediction_id!r} is not among the last {self.capacity}",
                    hint="send feedback sooner, or raise quality.prediction_log")
            if entry.labelled:
                raise RequestError(ErrorCode.ALREADY_LABELLED,
                                   f"prediction {prediction_id!r} already has a label")
            entry.labelled = True
            return entry

    def release(self, prediction_id: str) -> None:
        """Undo :meth:`claim` when the label turned out to be unusable."""
        with self._lock:
            entry = self._items.get(prediction_id)
            if entry is not None:
                entry.labelled = False


class QualityWindow:
    """The last ``capacity`` (true, predicted) pairs of the active model."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._pairs: deque[tuple[int, int]] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None
        self.feedback_total = 0
        self.feedback_rejected = 0

    def reset(self, num_classes: int | None, class_names: list[str] | None) -> None:
        with self._lock:
            self._pairs.clear()
            self.num_classes = num_classes
            self.class_names = class_names

    def add(self, y_true: list[int], y_pred: list[int]) -> None:
        with self._lock:
            self._pairs.extend(zip(y_true, y_pred, strict=True))
            self.feedback_total += len(y_true)

    def rejected(self) -> None:
        with self._lock:
            self.feedback_rejected += 1

    def snapshot(self) -> QualitySection:
        with self._lock:
            pairs = list(self._pairs)
            total, rejected = self.feedback_total, self.feedback_rejected
        section = QualitySection(window=self.capacity, labels=len(pairs), accuracy=None,
                                 f1_macro=None, confusion=None, feedback_total=total,
                                 feedback_rejected=rejected)
        if pairs:
            y_true, y_pred = zip(*pairs, strict=True)
            report = classification_report(list(y_true), list(y_pred), self.num_classes,
                                           self.class_names)
            section.accuracy = report.accuracy
            section.f1_macro = report.f1
            if len(report.confusion) <= 32:
                section.confusion = report.confusion
        return section


class SampleGate:
    """Picks predictions for sample upload (``fraction``) and rate-limits the uploads."""

    def __init__(self, fraction: float, per_minute: int) -> None:
        self.fraction = fraction
        self.per_minute = per_minute
        self._rng = np.random.default_rng()
        self._sent: deque[float] = deque()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.fraction > 0 and self.per_minute > 0

    def pick(self) -> bool:
        """Whether to keep a new prediction's inputs in case its label comes."""
        return self.enabled and bool(self._rng.random() < self.fraction)

    def allow(self) -> bool:
        """Whether one more sample may go out now (sliding one-minute window)."""
        now = time.monotonic()
        with self._lock:
            while self._sent and now - self._sent[0] > 60.0:
                self._sent.popleft()
            if len(self._sent) >= self.per_minute:
                return False
            self._sent.append(now)
            return True
