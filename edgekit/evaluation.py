"""Turn model outputs and labels into an evaluation report (numpy only).

The host (``edgekit evaluate``, ``edgekit optimize``) and the device compute the same
numbers from the same predictions, because both go through :func:`evaluate_outputs`, which
uses the metric functions of :mod:`edgekit.metrics`.

Classification outputs are either scores (``[N, C]`` logits or probabilities, reduced with
argmax) or class ids (``[N]`` integers). Regression outputs are compared element-wise with
float labels. An embedding model has no labels: :func:`agreement` scores its outputs against
a reference model's outputs by mean cosine similarity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekit import metrics as M
from edgekit.errors import DataError

__all__ = [
    "TASKS",
    "EvaluationReport",
    "agreement",
    "evaluate_outputs",
    "format_evaluation",
    "infer_task",
    "predicted_classes",
]

TASKS = ("auto", "classification", "regression")


@dataclass
class EvaluationReport:
    """What :func:`evaluate_outputs` measured: one of ``classification`` / ``regression``."""

    task: str
    count: int
    classification: M.ClassificationReport | None = None
    regression: M.RegressionReport | None = None

    def headline(self) -> dict[str, float]:
        """The summary numbers: accuracy / precision / recall / f1, or mae / rmse."""
        if self.classification is not None:
            c = self.classification
            return {"accuracy": c.accuracy, "precision": c.precision, "recall": c.recall,
                    "f1": c.f1}
        if self.regression is not None:
            return {"mae": self.regression.mae, "rmse": self.regression.rmse}
        return {}

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"task": self.task, "count": self.count, **self.headline()}
        if self.classification is not None:
            doc["per_class"] = self.classification.per_class
            doc["confusion"] = self.classification.confusion
        return doc


def infer_task(outputs: np.ndarray, labels: np.ndarray) -> str:
    """``classification`` for integer labels, ``regression`` for fractional ones.

    Raises:
        DataError: the labels are empty.
    """
    lab = np.asarray(labels)
    if lab.size == 0:
        raise DataError("the labels are empty: evaluation needs at least one sample")
    if np.issubdtype(lab.dtype, np.integer) or np.issubdtype(lab.dtype, np.bool_):
        return "classification"
    out = np.asarray(outputs)
    whole = bool(np.all(np.mod(lab, 1) == 0))
    if whole and lab.ndim == 1 and out.ndim == 2 and out.shape[1] > 1:
        return "classification"
    return "regression"


def predicted_classes(outputs: np.ndarray) -> np.ndarray:
    """Class ids from scores (argmax over the last axis) or from integer class ids.

    Raises:
        DataError: the outputs are neither ``[N, C]`` scores nor ``[N]`` class ids.
    """
    out = np.asarray(outputs)
    if out.ndim == 2 and out.shape[1] > 1:
        return out.argmax(axis=1)
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.ndim == 1 and np.issubdtype(out.dtype, np.integer):
        return out
    raise DataError(
        f"cannot read classes from outputs of shape {list(out.shape)} and dtype {out.dtype}",
        hint="a classifier should output [N, classes] scores or [N] integer class ids;"
        " use --task regression for continuous outputs",
    )


def evaluate_outputs(
    outputs: Any,
    labels: Any,
    *,
    task: str = "auto",
    num_classes: int | None = None,
    class_names: list[str] | None = None,
) -> EvaluationReport:
    """Score one model's outputs against labels.

    ``num_classes`` defaults to the width of score outputs, so a class that the model never
    predicts and that is absent from the labels still has its row in the confusion matrix.

    Raises:
        DataError: labels are missing or empty, their count differs from the outputs', the
            task is unknown, or the outputs do not fit the task.
    """
    if labels is None:
        raise DataError(
            "the evaluation data has no labels (key 'y')",
            hint="add the true labels under 'y', one per sample",
        )
    out = np.asarray(outputs)
    lab = np.asarray(labels)
    if lab.size == 0 or out.size == 0:
        raise DataError("nothing to evaluate: the data holds no samples")
    if len(out) != len(lab):
        raise DataError(f"{len(out)} model outputs but {len(lab)} labels")
    if task not in TASKS:
        raise DataError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    kind = infer_task(out, lab) if task == "auto" else task
    if kind == "classification":
        pred = predicted_classes(out)
        if num_classes is None and out.ndim == 2 and out.shape[1] > 1:
            num_classes = int(out.shape[1])
        if num_classes is None and class_names:
            num_classes = len(class_names)
        rep = M.classification_report(lab, pred, num_classes, class_names)
        return EvaluationReport("classification", rep.count, classification=rep)
    reg = M.regression_report(lab, out)
    return EvaluationReport("regression", reg.count, regression=reg)


def agreement(reference: Any, candidate: Any) -> float:
    """Mean row-wise cosine similarity between two models' outputs on the same inputs.

    Raises:
        DataError: empty outputs or shapes that differ.
    """
    ref = np.asarray(reference)
    cand = np.asarray(candidate)
    if ref.size == 0:
        raise DataError("no outputs to compare")
    if ref.shape != cand.shape:
        raise DataError(
            f"reference outputs have shape {list(ref.shape)}, candidate {list(cand.shape)}")
    return float(np.mean(M.cosine_similarity(ref, cand)))


def format_evaluation(report: EvaluationReport, *, title: str = "") -> str:
    """Human-readable report: the headline numbers, per-class scores, confusion matrix."""
    lines = [title] if title else []
    lines.append(f"{report.task} on {report.count} samples")
    for key, value in report.headline().items():
        lines.append(f"  {key:<10} {value:.4f}")
    c = report.classification
    if c is None:
        return "\n".join(lines)
    width = max([5, *(len(name) for name in c.per_class)])
    lines.append(f"  {'class':<{width}}  precision  recall     f1  support")
    for name, row in c.per_class.items():
        lines.append(f"  {name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}"
                     f"  {row['f1']:6.4f}  {int(row['support']):7d}")
    lines.append("  confusion (rows: true, columns: predicted)")
    cell = max(3, *(len(str(v)) for counts in c.confusion for v in counts))
    for counts in c.confusion:
        lines.append("    " + " ".join(f"{v:>{cell}d}" for v in counts))
    return "\n".join(lines)
