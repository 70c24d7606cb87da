"""Confidence calibration of a classifier, and the accuracy it estimates without labels.

The converter fits a map from a classifier's confidence (the largest softmax probability of
its primary output) to the chance that its top-1 class is right, on labelled data (its
evaluation data, or the estimate data given for the purpose, which should hold the variation
the field will show), and stores it in the manifest under ``metrics.calibration`` (so the
package's signature covers it). A device looks up the map's value for each prediction's
confidence; their mean is the estimated accuracy. The map is a step function, a small table
of plain numbers, whatever method fitted it (``method``: ``atc``, a single threshold with
values 0 and 1, or ``isotonic``; :mod:`converters.calibrate`):

``edges``: ascending lower bounds of the confidence bins (the first is 0.0); ``probs``: the
calibrated probability of each bin (non-decreasing, in 0..1). A confidence ``c`` falls in the
last bin whose edge is at most ``c``.

The estimate assumes the calibration still holds on the field data: that the model's
confidence falls as far with its accuracy as it did on the data the map was fitted on. It
cannot see a shift that keeps the model confident while it is wrong (a new class it maps onto
an old one, labels whose meaning changed, or strong rotation of the demo's digits, where the
confidence stops falling while the accuracy keeps falling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekit.errors import ArtifactError

__all__ = ["MAX_BINS", "METHODS", "Calibration", "confidences"]

# Bins in a stored map: enough for a smooth curve, small enough for any manifest.
MAX_BINS = 64
# How a map was fitted; any of them is read and applied the same way.
METHODS = ("atc", "isotonic")


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

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "edges": list(self.edges), "probs": list(self.probs),
                "samples": self.samples}

    @classmethod
    def from_manifest(cls, metrics: dict[str, Any]) -> Calibration | None:
        """The map in a manifest's ``metrics``, or None when the package has none.

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
                   method if method in METHODS else "isotonic")
