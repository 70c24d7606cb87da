"""Fit the confidence calibration a package carries (:mod:`edgekit.calibration`).

Two methods, both numpy only, deterministic, and stored as the same small step function:

``atc`` (the default; average thresholded confidence, Garg et al. 2022): one threshold on the
top-1 confidence, chosen on the labelled data so that the share of its predictions at or
above it equals their accuracy; the estimate is the share of field predictions at or above
it. As a map: probability 0 below the threshold and 1 from it on.

``isotonic``: isotonic regression of correctness on confidence, by pool-adjacent-violators
over at most :data:`~edgekit.calibration.MAX_BINS` equal-count bins.

On the digits demo's rotation + noise drift ATC has the smaller worst error of the two,
whether fitted on clean or on drifted data, and stays near the truth on clean data where
isotonic fitted on drifted data reads far too low (benchmarks/estimate_bench.py): it is the
default.
"""

from __future__ import annotations

import numpy as np

from edgekit.calibration import MAX_BINS, METHODS, Calibration, confidences

__all__ = ["fit_calibration"]

# Fewer labelled samples than this give a map too coarse to estimate anything with.
MIN_SAMPLES = 20


def fit_calibration(scores: np.ndarray, labels: np.ndarray, method: str = "atc"
                    ) -> Calibration | None:
    """The calibration map of a classifier's ``[N, C]`` scores (logits or probabilities)
    against the true classes; None with fewer than 20 samples or outputs that are not
    scores per class.

    Raises:
        ValueError: ``method`` is not one of :data:`edgekit.calibration.METHODS`.
    """
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: expected one of {METHODS}")
    rows = np.asarray(scores)
    if rows.ndim != 2 or rows.shape[1] < 2 or len(rows) < MIN_SAMPLES:
        return None
    labels = np.asarray(labels).reshape(-1)
    conf = confidences(rows)
    correct = (rows.argmax(axis=1) == labels).astype(np.float64)
    order = np.argsort(conf, kind="stable")
    conf, correct = conf[order], correct[order]
    if method == "atc":
        return _thresholded(conf, correct)
    # Equal-count bins; a bin starts at the first of equal confidences, so equal ones never
    # straddle two bins and each start is a real step of the function.
    picks = (np.arange(1, MAX_BINS) * len(conf)) // MAX_BINS
    starts = np.unique(np.concatenate([[0], np.searchsorted(conf, conf[picks], side="left")]))
    sizes = np.diff(np.append(starts, len(conf))).astype(np.float64)
    means = np.add.reduceat(correct, starts) / sizes
    values, firsts = _pool_adjacent_violators(means, sizes, starts)
    edges = [0.0] + [float(conf[i]) for i in firsts[1:]]
    return Calibration(tuple(edges), tuple(float(v) for v in values), samples=int(len(conf)))


def _thresholded(conf: np.ndarray, correct: np.ndarray) -> Calibration:
    """ATC on ascending confidences: the threshold leaves as many predictions at or above it
    as were right. Equal confidences fall on one side together, so the share above is the
    one nearest the accuracy that a threshold can give."""
    n = len(conf)
    wrong = n - int(round(correct.sum()))
    # Candidate cut positions: where a new confidence value starts (0 keeps every prediction).
    starts = np.flatnonzero(np.r_[True, np.diff(conf) > 0])
    cut = int(starts[np.argmin(np.abs(starts - wrong))])
    if cut == 0:  # every prediction counts as right: the map is the constant 1
        return Calibration((0.0,), (1.0,), samples=n, method="atc")
    threshold = float(conf[cut])
    return Calibration((0.0, threshold), (0.0, 1.0), samples=n, method="atc")


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
