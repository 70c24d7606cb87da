"""Label-free accuracy estimates of a classifier, fitted at conversion and read on the device.

The converter fits, on labelled data (its evaluation data, or the estimate data given for
the purpose, which should hold the variation the field will show), a model of the chance
that each prediction's top-1 class is right, and stores it in the manifest under
``metrics.calibration`` (so the package's signature covers it). A device applies it to each
prediction's output row; the mean over an interval's rows is the estimated accuracy. Two
kinds (``method``; :mod:`converters.calibrate` fits them):

**Maps of confidence** (``atc``: a single threshold with values 0 and 1; ``isotonic``): a
step function of the top-1 confidence (the largest softmax probability of the primary
output), a small table of plain numbers, :class:`Calibration`. ``edges``: ascending lower
bounds of the confidence bins (the first is 0.0); ``probs``: the calibrated probability of
each bin (non-decreasing, in 0..1). A confidence ``c`` falls in the last bin whose edge is
at most ``c``.

**A logistic model of the output row** (``logistic``, :class:`Logistic`): the probability
is ``sigmoid(intercept + coef . f(row))`` for the features ``f`` that :func:`features`
computes from the row (``features`` names them in order): the log-softmax of every class
(``log_softmax``, C values, left out above :data:`MAX_CLASS_FEATURES` classes), then the
top-1 probability, its margin over the second, the entropy, the largest score, the
log-sum-exp of the scores (the negative energy) and the margin of the two largest scores.
Rows that are probabilities are read as the log-probabilities they stand for. The document
also carries ``edges`` and ``probs``: an ATC map of the same data, which agents that predate
the logistic model apply instead (they read any unknown method as a map).

Either estimate assumes the model of correctness still holds on the field data: that the
model's outputs change with its accuracy as they did on the data it was fitted on. A map of
confidence cannot see a shift that keeps the model confident while it is wrong (a new class
it maps onto an old one, labels whose meaning changed, or strong rotation of the demo's
digits, where the confidence stops falling while the accuracy keeps falling); the logistic
model also sees which class the scores point to and how large they are, which follows the
demo's drift, but not a shift its fitting data never showed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekit.errors import ArtifactError

__all__ = ["FEATURES", "MAX_BINS", "MAX_CLASS_FEATURES", "MAP_METHODS",
           "METHODS", "Calibration", "Estimator",
           "Logistic", "confidences", "estimator_from_manifest", "features"]

# Bins in a stored map: enough for a smooth curve, small enough for any manifest.
MAX_BINS = 64
# How the estimate was fitted: the two maps of confidence, read and applied the same way, and
# the logistic model of the output row.
METHODS = ("logistic", "atc", "isotonic")
MAP_METHODS = ("atc", "isotonic")
# The features of the logistic model, in their order; ``log_softmax`` is one per class.
FEATURES = ("log_softmax", "confidence", "margin", "entropy", "max_score", "log_sum_exp",
            "score_margin")
# Above this many classes the per-class features are left out (too many coefficients for
# the few thousand samples an estimate set holds).
MAX_CLASS_FEATURES = 64
# Log-probabilities are floored here: a probability row's zeros, and logits far below the top.
_LOG_FLOOR = float(np.log(1e-12))


def confidences(scores: np.ndarray) -> np.ndarray:
    """Top-1 probability of each row of ``[N, C]`` scores: rows that already are
    probabilities (non-negative, summing to 1) are used as they are, other rows (logits)
    go through softmax."""
    rows = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    sums = rows.sum(axis=1)
    is_prob = (rows >= 0).all(axis=1) & (np.abs(sums - 1.0) < 1e-3)
    shifted = rows - rows.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    soft_top = 1.0 / exp.sum(axis=1)  # the max of the shifted row is exp(0) = 1
    return np.where(is_prob, rows.max(axis=1), soft_top)


def features(scores: np.ndarray, names: tuple[str, ...] = FEATURES) -> np.ndarray:
    """The logistic model's ``[N, D]`` features of ``[N, C]`` scores (logits, or rows that
    are probabilities), in the order of ``names`` (see the module docstring)."""
    rows = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    is_prob = (rows >= 0).all(axis=1) & (np.abs(rows.sum(axis=1) - 1.0) < 1e-3)
    z = rows.copy()
    z[is_prob] = np.log(np.maximum(rows[is_prob], 1e-300))
    z = np.maximum(z, z.max(axis=1, keepdims=True) + _LOG_FLOOR)
    top2 = np.sort(z, axis=1)[:, -2:] if z.shape[1] > 1 else np.repeat(z, 2, axis=1)
    lse = top2[:, 1] + np.log(np.exp(z - top2[:, 1:]).sum(axis=1))
    log_p = z - lse[:, None]
    p = np.exp(log_p)
    p_top2 = np.exp(top2 - lse[:, None])
    columns = {
        "confidence": p_top2[:, 1], "margin": p_top2[:, 1] - p_top2[:, 0],
        "entropy": -(p * log_p).sum(axis=1), "max_score": top2[:, 1], "log_sum_exp": lse,
        "score_margin": top2[:, 1] - top2[:, 0]}
    return np.column_stack([log_p if name == "log_softmax" else columns[name][:, None]
                            for name in names])


@dataclass(frozen=True)
class Calibration:
    """A confidence -> probability-correct step function (see the module docstring)."""

    edges: tuple[float, ...]
    probs: tuple[float, ...]
    samples: int = 0  # labelled samples it was fitted on
    method: str = "isotonic"  # maps written before the method was recorded are isotonic

    def lookup(self, confidence: np.ndarray) -> np.ndarray:
        """The calibrated probability of each confidence."""
        index = np.searchsorted(np.asarray(self.edges), np.asarray(confidence), side="right")
        return np.asarray(self.probs)[np.clip(index - 1, 0, len(self.probs) - 1)]

    def estimate(self, confidence: np.ndarray) -> float | None:
        """Estimated accuracy of predictions with these confidences (None when empty)."""
        conf = np.asarray(confidence, dtype=np.float64).ravel()
        if conf.size == 0:
            return None
        return float(self.lookup(conf).mean())

    def estimate_scores(self, scores: np.ndarray) -> float | None:
        """Estimated accuracy of the predictions with these ``[N, C]`` scores."""
        return self.estimate(confidences(scores)) if len(scores) else None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "edges": list(self.edges), "probs": list(self.probs),
                "samples": self.samples}

    @classmethod
    def from_manifest(cls, metrics: dict[str, Any]) -> Calibration | None:
        """The map in a manifest's ``metrics``, or None when the package has none (of a
        logistic model's document: the ATC map it carries for older agents).

        Raises:
            ArtifactError: ``metrics.calibration`` is there but malformed.
        """
        doc = metrics.get("calibration")
        if doc is None:
            return None
        where = "manifest metrics.calibration"
        if not isinstance(doc, dict):
            raise ArtifactError(f"{where}: expected an object")
        edges, probs = doc.get("edges"), doc.get("probs")
        if not isinstance(edges, list) or not isinstance(probs, list) \
                or not 1 <= len(edges) <= MAX_BINS or len(edges) != len(probs):
            raise ArtifactError(f"{where}: edges and probs must be lists of the same length,"
                                f" 1 to {MAX_BINS}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool)
                   for v in (*edges, *probs)):
            raise ArtifactError(f"{where}: edges and probs must be numbers")
        e, p = np.asarray(edges, np.float64), np.asarray(probs, np.float64)
        if not (np.isfinite(e).all() and np.isfinite(p).all() and (p >= 0).all()
                and (p <= 1).all() and (np.diff(e) > 0).all()):
            raise ArtifactError(f"{where}: edges must be ascending and probs within 0..1")
        samples, method = doc.get("samples", 0), doc.get("method", "isotonic")
        # An unknown method name changes nothing in how the map is applied.
        return cls(tuple(float(x) for x in e), tuple(float(x) for x in p),
                   samples if isinstance(samples, int) else 0,
                   method if method in MAP_METHODS
                   else "atc" if method == "logistic" else "isotonic")


@dataclass(frozen=True)
class Logistic:
    """P(top-1 right) = sigmoid(intercept + coef . features(row)) (see the module docstring);
    ``fallback``: the ATC map stored beside it for agents that predate it."""

    features: tuple[str, ...]
    coef: tuple[float, ...]
    intercept: float
    classes: int
    fallback: Calibration
    samples: int = 0  # labelled samples it was fitted on
    groups: int = 1  # groups of the fitting data whose mean estimate was held to their accuracy
    method: str = "logistic"

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """The chance that each row's top-1 class is right."""
        t = features(scores, self.features) @ np.asarray(self.coef) + self.intercept
        return 0.5 * (1.0 + np.tanh(0.5 * t))  # the logistic sigmoid, free of overflow

    def estimate_scores(self, scores: np.ndarray) -> float | None:
        """Estimated accuracy of the predictions with these ``[N, C]`` scores (None when
        empty or of another width than the model was fitted on)."""
        rows = np.asarray(scores)
        if len(rows) == 0:
            return None
        rows = rows.reshape(len(rows), -1)
        if rows.shape[1] != self.classes:
            return None
        return float(self.probabilities(rows).mean())

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "features": list(self.features),
                "coef": list(self.coef), "intercept": self.intercept, "classes": self.classes,
                "groups": self.groups, "samples": self.samples,
                "edges": list(self.fallback.edges), "probs": list(self.fallback.probs)}

    @classmethod
    def from_doc(cls, doc: dict[str, Any], fallback: Calibration) -> Logistic:
        """The model in a ``metrics.calibration`` document whose method is ``logistic``.

        Raises:
            ArtifactError: a field is missing or malformed.
        """
        where = "manifest metrics.calibration (logistic)"
        names, coef, classes = doc.get("features"), doc.get("coef"), doc.get("classes")
        intercept = doc.get("intercept")
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
            raise ArtifactError(f"{where}: classes must be an integer of at least 2")
        if not isinstance(names, list) or not names or len(set(map(str, names))) != len(names) \
                or not set(names) <= set(FEATURES):
            raise ArtifactError(f"{where}: features must name some of {', '.join(FEATURES)}"
                                " once each (a newer converter's features need a newer agent)")
        width = len(names) - 1 + classes if "log_softmax" in names else len(names)
        if not isinstance(coef, list) or len(coef) != width:
            raise ArtifactError(f"{where}: coef must be a list of {width} numbers")
        values = [*coef, intercept]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values) \
                or not isinstance(intercept, int | float) \
                or not np.isfinite(np.asarray(values, np.float64)).all():
            raise ArtifactError(f"{where}: coef and intercept must be finite numbers")
        samples, groups = doc.get("samples", 0), doc.get("groups", 1)
        return cls(tuple(names), tuple(float(v) for v in coef), float(intercept), classes,
                   fallback, samples if isinstance(samples, int) else 0,
                   groups if isinstance(groups, int) else 1)


Estimator = Calibration | Logistic


def estimator_from_manifest(metrics: dict[str, Any]) -> Estimator | None:
    """The accuracy estimate a manifest's ``metrics`` carries (a map of confidence, or a
    logistic model), or None when the package has none.

    Raises:
        ArtifactError: ``metrics.calibration`` is there but malformed.
    """
    fallback = Calibration.from_manifest(metrics)
    doc = metrics.get("calibration")
    if fallback is None or not isinstance(doc, dict) or doc.get("method") != "logistic":
        return fallback
    return Logistic.from_doc(doc, fallback)
