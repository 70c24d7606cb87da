"""Fit the accuracy estimate a package carries (:mod:`edgekit.calibration`).

Three methods, all numpy only and deterministic:

``logistic`` (the default): a logistic regression of correctness (top-1 right or not) on
features of the whole output row (:func:`edgekit.calibration.features`: the log-softmax of
every class, the top-1 probability and its margin, the entropy, the largest score, the
log-sum-exp and the margin of the scores), on standardised features with a small ridge
penalty, by Gauss-Newton steps. When the data come in groups (``groups``: the condition each
sample was drawn under, such as clean and each drift of the demo's estimate set), the fit
also holds the mean estimate of every group to that group's accuracy (a penalty on the
squared differences, weighted by the groups' shares): a plain fit of correctness pools the
groups, and where one output pattern is right in mild drift and wrong in strong drift it
reads the strong drift too high.

The two maps of confidence, stored as a small step function:

``atc`` (average thresholded confidence, Garg et al. 2022): one threshold on the
top-1 confidence, chosen on the labelled data so that the share of its predictions at or
above it equals their accuracy; the estimate is the share of field predictions at or above
it. As a map: probability 0 below the threshold and 1 from it on.

``isotonic``: isotonic regression of correctness on confidence, by pool-adjacent-violators
over at most :data:`~edgekit.calibration.MAX_BINS` equal-count bins.

On the digits demo's rotation + noise drift, fitted on the demo's estimate set with its
groups, the logistic model stays within 3 points of the true accuracy on clean data and at
every drift strength, where the best map (ATC) is 20.5 points off at the demo's drift and no
map of confidence can come within 16.8 (benchmarks/estimate_bench.py): it is the default.
"""

from __future__ import annotations

import numpy as np

from edgekit.calibration import (
    FEATURES,
    MAX_BINS,
    MAX_CLASS_FEATURES,
    METHODS,
    Calibration,
    Estimator,
    Logistic,
    confidences,
    features,
)

from ._logistic import fit_logistic

__all__ = ["fit_calibration"]

# Fewer labelled samples than this give a map too coarse to estimate anything with.
MIN_SAMPLES = 20


def fit_calibration(scores: np.ndarray, labels: np.ndarray, method: str = "logistic",
                    groups: np.ndarray | None = None) -> Estimator | None:
    """The accuracy estimate of a classifier's ``[N, C]`` scores (logits or probabilities)
    against the true classes (``groups``: each sample's group, for ``logistic``); None with
    fewer than 20 samples (rows holding NaN or inf left out) or outputs that are not scores
    per class.

    Raises:
        ValueError: ``method`` is not one of :data:`edgekit.calibration.METHODS`, or
            ``groups`` does not hold one value per sample.
    """
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: expected one of {METHODS}")
    rows = np.asarray(scores)
    if rows.ndim != 2 or rows.shape[1] < 2 or len(rows) < MIN_SAMPLES:
        return None
    labels = np.asarray(labels).reshape(-1)
    if groups is not None and np.asarray(groups).reshape(-1).shape != labels.shape:
        raise ValueError(f"groups: expected one per sample ({len(labels)}), found"
                         f" {np.asarray(groups).size}")
    finite = np.isfinite(rows).all(axis=1)  # rows with NaN or inf say nothing: left out
    if not finite.all():
        rows, labels = rows[finite], labels[finite]
        groups = None if groups is None else np.asarray(groups).reshape(-1)[finite]
        if len(rows) < MIN_SAMPLES:
            return None
    correct = (rows.argmax(axis=1) == labels).astype(np.float64)
    conf = confidences(rows)
    order = np.argsort(conf, kind="stable")
    if method == "logistic":
        names = FEATURES if rows.shape[1] <= MAX_CLASS_FEATURES else FEATURES[1:]
        group = np.zeros(len(rows), np.int64) if groups is None else \
            np.unique(np.asarray(groups).reshape(-1), return_inverse=True)[1]
        coef, intercept = fit_logistic(features(rows, names), correct, group)
        return Logistic(names, tuple(coef), intercept, int(rows.shape[1]),
                        _thresholded(conf[order], correct[order]), samples=int(len(rows)),
                        groups=int(group.max()) + 1)
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
