"""Model-quality metrics in numpy alone: the host and the device compute the same numbers.

Classification: accuracy, macro and per-class precision / recall / F1, confusion matrix.
Regression: MAE, RMSE. Embeddings: mean cosine similarity. Parity: max abs error, mean
cosine, top-1 agreement between two sets of model outputs.

Conventions follow scikit-learn (``zero_division=0``): a class that is never predicted has
precision 0, a class with no true samples has recall 0; the class set is the union of the
labels seen in ``y_true`` and ``y_pred`` unless ``num_classes`` is given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgekit.errors import DataError

__all__ = [
    "ClassificationReport",
    "ParityReport",
    "RegressionReport",
    "classification_report",
    "confusion_matrix",
    "cosine_similarity",
    "parity",
    "regression_report",
]


@dataclass
class ClassificationReport:
    count: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RegressionReport:
    count: int
    mae: float
    rmse: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ParityReport:
    max_abs_error: float
    mean_cosine: float
    top1_agreement: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _labels(y: Any, what: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise DataError(f"{what} must be one label per sample (1-D), found shape {arr.shape}")
    if arr.size == 0:
        raise DataError(f"{what} is empty: metrics need at least one sample")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise DataError(f"{what} must hold integer class ids, found dtype {arr.dtype}")
    if np.any(arr < 0):
        raise DataError(f"{what} holds negative class ids")
    return arr.astype(np.int64)


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """Rows are true classes, columns predicted classes.

    Raises:
        DataError: empty input, lengths differ, or labels are not non-negative integers.
    """
    t = _labels(y_true, "y_true")
    p = _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise DataError(f"y_true has {t.size} labels but y_pred has {p.size}")
    n = int(max(t.max(), p.max()) + 1)
    if num_classes is not None:
        if n > num_classes:
            raise DataError(f"label {n - 1} is outside the {num_classes} classes")
        n = num_classes
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def classification_report(
    y_true: Any, y_pred: Any, num_classes: int | None = None,
    class_names: list[str] | None = None,
) -> ClassificationReport:
    """Accuracy, macro precision / recall / F1, per-class scores and the confusion matrix.

    Raises:
        DataError: as :func:`confusion_matrix`.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    pred_count = cm.sum(axis=0).astype(np.float64)
    true_count = cm.sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(pred_count > 0, tp / np.maximum(pred_count, 1), 0.0)
        recall = np.where(true_count > 0, tp / np.maximum(true_count, 1), 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    # Macro averages run over the classes that occur in y_true or y_pred (scikit-learn's
    # default label set), not over classes absent from both.
    present = (pred_count + true_count) > 0
    per_class: dict[str, dict[str, float]] = {}
    for idx in np.flatnonzero(present):
        name = class_names[idx] if class_names and idx < len(class_names) else str(int(idx))
        per_class[name] = {
            "precision": float(precision[idx]),
            "recall": float(recall[idx]),
            "f1": float(f1[idx]),
            "support": int(true_count[idx]),
        }
    total = int(cm.sum())
    return ClassificationReport(
        count=total,
        accuracy=float(tp.sum() / total),
        precision=float(precision[present].mean()),
        recall=float(recall[present].mean()),
        f1=float(f1[present].mean()),
        per_class=per_class,
        confusion=cm.tolist(),
    )


def regression_report(y_true: Any, y_pred: Any) -> RegressionReport:
    """MAE and RMSE over all elements.

    Raises:
        DataError: empty input or shapes that differ.
    """
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.size == 0:
        raise DataError("y_true is empty: metrics need at least one sample")
    if t.shape != p.shape:
        p = p.reshape(t.shape) if p.size == t.size else p
    if t.shape != p.shape:
        raise DataError(f"y_true has shape {t.shape} but predictions have shape {p.shape}")
    err = p - t
    return RegressionReport(
        count=int(t.shape[0]) if t.ndim else 1,
        mae=float(np.mean(np.abs(err))),
        rmse=float(np.sqrt(np.mean(err**2))),
    )


def cosine_similarity(a: Any, b: Any) -> np.ndarray:
    """Row-wise cosine similarity of two batches (flattened per sample)."""
    x = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    y = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if x.shape != y.shape:
        raise DataError(f"cannot compare outputs of shapes {x.shape} and {y.shape}")
    nx = np.linalg.norm(x, axis=1)
    ny = np.linalg.norm(y, axis=1)
    both_zero = (nx == 0) & (ny == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.sum(x * y, axis=1) / (nx * ny)
    cos = np.where(both_zero, 1.0, np.nan_to_num(cos, nan=0.0))
    return np.clip(cos, -1.0, 1.0)


def parity(reference: Any, candidate: Any, *, classifier: bool) -> ParityReport:
    """Agreement of a converted model's outputs with the source model's.

    Raises:
        DataError: empty input or shapes that differ.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.size == 0:
        raise DataError("no outputs to compare")
    if ref.shape != cand.shape:
        raise DataError(f"source outputs have shape {ref.shape}, converted {cand.shape}")
    top1 = None
    if classifier and ref.ndim == 2:
        top1 = float(np.mean(ref.argmax(axis=1) == cand.argmax(axis=1)))
    return ParityReport(
        max_abs_error=float(np.max(np.abs(ref - cand))),
        mean_cosine=float(np.mean(cosine_similarity(ref, cand))),
        top1_agreement=top1,
    )
