"""Logistic regression of correctness, with each group's mean held to its accuracy: the fit
behind the ``logistic`` accuracy estimate (:mod:`converters.calibrate`). Numpy only.

Minimises, over the weights ``w`` of standardised features ``z`` (and an intercept)::

    mean log-loss + GROUP_PENALTY * sum_g share_g * (mean_g p - accuracy_g)^2 + RIDGE * |w|^2

by Gauss-Newton steps (the exact Hessian of the log-loss and of the ridge, the outer
products of the group means' gradients) with a backtracking line search: a positive
definite system of a few dozen unknowns per step, the same result on every run.
"""

from __future__ import annotations

import numpy as np

__all__ = ["GROUP_PENALTY", "RIDGE", "fit_logistic"]

# Weight of the groups' squared errors (a probability squared) against the mean log-loss:
# 0.01 off in every group costs 0.2, more than the log-loss differences of nearby fits.
# On the digits benchmark the errors barely move between 200 and 7,000.
GROUP_PENALTY = 2000.0
# Ridge on the standardised weights: keeps the fit finite when the features separate right
# from wrong; larger values pull the estimate towards the overall accuracy.
RIDGE = 1e-3
_MAX_STEPS = 200


def fit_logistic(x: np.ndarray, correct: np.ndarray, group: np.ndarray
                 ) -> tuple[list[float], float]:
    """Coefficients on the raw features ``x`` ``[N, D]`` and the intercept; ``group`` holds
    each sample's group as 0..G-1."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-12] = 1.0  # a constant feature: its weight stays 0
    z = np.column_stack([np.ones(len(x)), (x - mean) / scale])
    onehot = np.eye(int(group.max()) + 1)[group]
    sizes = onehot.sum(axis=0)
    means = onehot.T / sizes[:, None]  # [G, N]: each group's mean of a per-sample vector
    accuracy = means @ correct
    share = sizes / len(x)
    ridge = np.full(z.shape[1], RIDGE)
    ridge[0] = 0.0

    def loss(w: np.ndarray) -> float:
        t = z @ w
        p = _sigmoid(t)
        gap = means @ p - accuracy
        return float(np.mean(np.logaddexp(0.0, t) - correct * t)
                     + GROUP_PENALTY * share @ gap**2 + ridge @ w**2)

    w = np.zeros(z.shape[1])
    w[0] = np.log((correct.mean() + 1e-3) / (1.0 - correct.mean() + 1e-3))
    current = loss(w)
    for _ in range(_MAX_STEPS):
        p = _sigmoid(z @ w)
        slope = p * (1.0 - p)
        gap = means @ p - accuracy
        jac = (means * slope) @ z  # [G, D]: the gradient of each group's mean
        grad = z.T @ (p - correct) / len(x) + 2 * GROUP_PENALTY * (share * gap) @ jac \
            + 2 * ridge * w
        hess = (z.T * slope) @ z / len(x) + 2 * GROUP_PENALTY * (jac.T * share) @ jac \
            + np.diag(2 * ridge + 1e-9)
        step = np.linalg.solve(hess, grad)
        size = 1.0
        while size > 1e-6 and loss(w - size * step) > current - 1e-4 * size * grad @ step:
            size /= 2
        if size <= 1e-6:
            break
        w = w - size * step
        previous, current = current, loss(w)
        if previous - current < 1e-12:
            break
    coef = w[1:] / scale
    return [float(c) for c in coef], float(w[0] - coef @ mean)


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))
