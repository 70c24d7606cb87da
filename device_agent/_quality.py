"""Feedback: labels that arrive after the prediction, and the window they are scored in.

:class:`PredictionLog` remembers the last ``quality.prediction_log`` predictions (model,
scores, and the inputs of those picked for sample upload) in a ring, so a label can find
its prediction later; a prediction costs one list store, and the work (argmax, copies) is
done when its label comes. :class:`QualityWindow` keeps the last ``quality.window`` labelled
rows of the active model and scores them with :func:`edgekit.metrics.classification_report`,
the same function the host uses. A model swap empties the window: accuracy belongs to a
model, and a new one starts from no evidence.
"""

from __future__ import annotations

import math
import random
import secrets
import threading
import time
from collections import deque

import numpy as np

from edgekit.metrics import classification_report
from edgekit.protocol import ErrorCode, QualitySection

from .errors import RequestError

__all__ = ["LoggedPrediction", "PredictionLog", "QualityWindow", "SampleGate"]


class LoggedPrediction:
    """What feedback needs of a prediction: its model, scores, and (if picked) inputs."""

    __slots__ = ("inputs", "model_sha256", "scores")

    def __init__(self, model_sha256: str, scores: np.ndarray,
                 inputs: dict[str, np.ndarray] | None) -> None:
        self.model_sha256 = model_sha256
        self.scores = scores  # primary output, as the model returned it
        self.inputs = inputs  # kept only for predictions picked for sample upload

    def classes(self) -> np.ndarray:
        return self.scores.reshape(len(self.scores), -1).argmax(axis=1)


_Entry = tuple[int, str, np.ndarray, "dict[str, np.ndarray] | None"]


class PredictionLog:
    """The most recent ``capacity`` predictions, oldest overwritten first. Thread-safe.

    A prediction id is this log's random prefix and a sequence number; the number names the
    ring slot, and the slot's entry must carry the same number (else it was overwritten).
    :meth:`add` is one list store of an immutable tuple, atomic without a lock (``ring``:
    the agent's request path makes the same store inline); claims take the lock.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.prefix = secrets.token_hex(4) + "-"
        # Slot ``seq % capacity`` holds (seq, model sha256, scores, inputs or None).
        self.ring: list[_Entry | None] = [None] * capacity
        self._labelled = [0] * capacity  # the sequence number labelled in each slot
        self._lock = threading.Lock()

    def add(self, seq: int, model_sha256: str, scores: np.ndarray,
            inputs: dict[str, np.ndarray] | None) -> None:
        """Remember prediction ``seq`` (its id is :meth:`id_of`); ``scores`` is kept by
        reference (the caller does not change it)."""
        self.ring[seq % self.capacity] = (seq, model_sha256, scores, inputs)

    def id_of(self, seq: int) -> str:
        return self.prefix + str(seq)

    def _seq(self, prediction_id: str) -> int | None:
        digits = prediction_id[len(self.prefix):]
        if not prediction_id.startswith(self.prefix) or not digits.isascii() or \
                not digits.isdigit() or len(digits) > 18 or str(int(digits)) != digits:
            return None
        return int(digits)

    def claim(self, prediction_id: str) -> LoggedPrediction:
        """The entry of a prediction that has no label yet; marks it labelled.

        Raises:
            RequestError: unknown (never made, or overwritten) or already labelled.
        """
        seq = self._seq(prediction_id)
        with self._lock:
            entry = self.ring[seq % self.capacity] if seq is not None else None
            if entry is None or entry[0] != seq:
                raise RequestError(
                    ErrorCode.UNKNOWN_PREDICTION,
                    f"prediction {prediction_id!r} is not among the last {self.capacity}",
                    hint="send feedback sooner, or raise quality.prediction_log")
            slot = seq % self.capacity
            if self._labelled[slot] == seq:
                raise RequestError(ErrorCode.ALREADY_LABELLED,
                                   f"prediction {prediction_id!r} already has a label")
            self._labelled[slot] = seq
        return LoggedPrediction(entry[1], entry[2], entry[3])

    def release(self, prediction_id: str) -> None:
        """Undo :meth:`claim` when the label turned out to be unusable."""
        seq = self._seq(prediction_id)
        if seq is None:
            return
        with self._lock:
            if self._labelled[seq % self.capacity] == seq:
                self._labelled[seq % self.capacity] = 0


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
    """Picks predictions for sample upload (``fraction``) and rate-limits the uploads.

    The pick is scheduled: the gap to the next picked prediction is drawn from the geometric
    distribution when a pick happens, so the request path compares two integers.
    """

    def __init__(self, fraction: float, per_minute: int) -> None:
        self.fraction = fraction
        self.per_minute = per_minute
        self.enabled = fraction > 0 and per_minute > 0
        self._rng = random.Random()
        self.next_pick: float = math.inf
        if self.enabled:
            self.picked(0)
        self._sent: deque[float] = deque()
        self._lock = threading.Lock()

    def picked(self, seq: int) -> None:
        """Prediction ``seq`` was picked: schedule the next pick."""
        if self.fraction >= 1.0:
            self.next_pick = seq + 1
            return
        # Inverse transform of the geometric distribution (trials to the first success).
        u = 1.0 - self._rng.random()
        self.next_pick = seq + 1 + int(math.log(u) / math.log1p(-self.fraction))

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
