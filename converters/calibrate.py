"""Fit the confidence calibration a package carries (:mod:`edgekit.calibration`).

Isotonic regression of correctness on confidence, by pool-adjacent-violators over at most
:data:`~edgekit.calibration.MAX_BINS` equal-count bins: numpy only, deterministic, and a
result small enough to sit in the manifest as two lists.
"""

from __future__ import annotations

import numpy as np

from edgekit.calibration import MAX_BINS, Calibration, confidences

__all__ = ["fit_calibration"]

# Fewer labelled samples than this give a map too coarse to estimate anything with.
MIN_SAMPLES = 20


def fit_calibration(scores: np.ndarray, labels: np.ndarray) -> Calibration | None:
    """The calibration map of a classifier's ``[N, C]`` scores (logits or probabilities)
    against the true classes; None with fewer than 20 samples or outputs that are not
    scores per class."""
    rows = np.asarray(scores)
    if rows.ndim != 2 or rows.shape[1] < 2 or len(rows) < MIN_SAMPLES:
        return None
    labels = np.asarray(labels).reshape(-1)
    conf = confidences(rows)
    correct = (rows.argmax(axis=1) == labels).astype(np.float64)
    order = np.argsort(conf, kind="stable")
    conf, correct = conf[order], correct[order]
    # Equal-count bins; a bin starts at the first of equal confidences, so equal ones never
    # straddle two bins and each start is a real step of the function.
    picks = (np.arange(1, MAX_BINS) * len(conf)) // MAX_BINS
    starts = np.unique(np.concatenate([[0], np.searchsorted(conf, conf[picks], side="left")]))
    sizes = np.diff(np.append(starts, len(conf))).astype(np.float64)
    means = np.add.reduceat(correct, starts) / sizes
    values, firsts = _pool_adjacent_violators(means, sizes, starts)
    edges = [0.0] + [float(conf[i]) for i in firsts[1:]]
    return Calibration(tuple(edges), tuple(float(v) for v in values), samples=int(len(conf)))


def _pool_adjacent_violators(means: np.ndarray, weights: np.ndarray, starts: np.ndarray
                             ) -> tuple[list[float], list[int]]:
    """Merge neighbouring bins until their means never decrease (weighted by size)."""
    values: list[float] = []
    mass: list[float] = []
    firsts: list[int] = []
    for mean, weight, start in zip(means, weights, starts, strict=True):
        values.append(float(mean))
        mass.append(float(weight))
        firsts.append(int(start))
        while len(values) > 1 and values[-2] >= values[-1]:
            merged = mass[-2] + mass[-1]
            values[-2] = (values[-2] * mass[-2] + values[-1] * mass[-1]) / merged
            mass[-2] = merged
            values.pop()
            mass.pop()
            firsts.pop()
    return values, firsts
