"""Evaluate a source model or a ``.edgepkg`` on labelled data, with the same numbers for both.

A package runs in the runtime its manifest names (onnxruntime or LiteRT); a source model
(PyTorch, Keras, ONNX: whatever ``edgekit convert`` loads) runs in its own framework. Both
outputs go through :func:`edgekit.evaluation.evaluate_outputs`, the function the device
uses, so the same predictions give the same report.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.artifact import open_package
from edgekit.data import Dataset, check_inputs, load_npz
from edgekit.errors import DataError
from edgekit.evaluation import EvaluationReport, evaluate_outputs
from edgekit.manifest import TensorSpec
from edgekit.runtimes import RuntimeOptions, load_session

__all__ = ["Evaluation", "evaluate", "is_package", "package_predictor", "run_model"]

Predict = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class Evaluation:
    """A report, and what produced it."""

    model: str
    kind: str  # "package" or the source framework
    data: str
    output: str
    report: EvaluationReport

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "kind": self.kind, "data": self.data,
                "output": self.output, **self.report.to_dict()}


def is_package(path: str | os.PathLike[str]) -> bool:
    """Whether the path is an ``.edgepkg`` (a zip that holds a manifest.json)."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as zf:
        return "manifest.json" in zf.namelist()


def _fixed_batch(specs: list[TensorSpec]) -> int | None:
    dims = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
    return int(dims.pop()) if len(dims) == 1 else None


def run_model(predict: Predict, data: Dataset, *, batch: int = 64,
              fixed_batch: int | None = None) -> dict[str, np.ndarray]:
    """Run ``predict`` over the data in batches; outputs concatenated by name.

    A model with a fixed batch size gets exactly that many rows per call: the last batch is
    padded with its final row and the padding dropped from the outputs.
    """
    step = fixed_batch or batch
    parts: dict[str, list[np.ndarray]] = {}
    n = len(data)
    for start in range(0, n, step):
        feeds = {k: v[start:start + step] for k, v in data.inputs.items()}
        rows = len(next(iter(feeds.values())))
        if fixed_batch and rows < fixed_batch:
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], fixed_batch - rows, axis=0)])
                     for k, v in feeds.items()}
        for name, arr in predict(feeds).items():
            parts.setdefault(name, []).append(np.asarray(arr)[:rows])
    return {k: np.concatenate(v) for k, v in parts.items()}


def package_predictor(path: str | os.PathLike[str], *, threads: int = 0
                      ) -> tuple[Predict, Any]:
    """A predict function for a package in its runtime, and the package's manifest.

    Raises:
        ArtifactError: the package is missing or corrupt.
        RuntimeBackendError: its runtime is missing or cannot load the model.
    """
    pkg = open_package(path)
    session = load_session(pkg.manifest, pkg.model_bytes(), RuntimeOptions(threads=threads))
    return session.run, pkg.manifest


def evaluate(
    model: Any,
    data: str | os.PathLike[str] | Dataset,
    *,
    task: str = "auto",
    weights: str | os.PathLike[str] | None = None,
    batch: int = 64,
    threads: int = 0,
) -> Evaluation:
    """Run a package or a source model over labelled data and score its first output.

    Raises:
        DataError: the data have no labels, do not fit the model's inputs, or the outputs do
            not fit the task (an embedding model has no labels to score against).
        ArtifactError: a package that is corrupt.
        ModelError: a source model that cannot be loaded.
        RuntimeBackendError: the package's runtime is missing.
    """
    ds = data if isinstance(data, Dataset) else load_npz(data)
    if ds.labels is None:
        raise DataError(
            f"{ds.source} has no labels (key 'y'); evaluation scores outputs against labels",
            hint="add the true labels under 'y'; for an embedding model without labels use"
                 " `edgekit optimize --metric cosine`, which compares with the source model",
        )
    class_names: list[str] | None = None
    if not isinstance(model, (str, os.PathLike)) or not is_package(model):
        from converters import ConvertOptions, load_source

        loaded = load_source(model, ConvertOptions(), weights=weights,
                             example={k: v[:1] for k, v in ds.inputs.items()},
                             example_source=f"evaluation data {ds.source}")
        specs, outputs, kind = loaded.inputs, loaded.outputs, loaded.framework
        predict: Predict = loaded.predict
        described = loaded.ref.describe()
        fixed = None
    else:
        predict, manifest = package_predictor(model, threads=threads)
        specs, outputs, kind = manifest.inputs, manifest.outputs, "package"
        described = str(model)
        class_names = manifest.labels
        fixed = _fixed_batch(specs)
        if task == "auto" and manifest.task in ("classification", "regression"):
            task = manifest.task
        elif task == "auto":
            raise DataError(
                f"{model} is an {manifest.task} model: it has no classes or values to score",
                hint="use `edgekit optimize --metric cosine` to compare it with its source",
            )
    fitted = Dataset(check_inputs(ds.inputs, specs, f"evaluation data {ds.source}"),
                     ds.labels, ds.source)
    out = run_model(predict, fitted, batch=batch, fixed_batch=fixed)
    first = outputs[0].name if outputs[0].name in out else next(iter(out))
    report = evaluate_outputs(out[first], fitted.labels, task=task, class_names=class_names)
    return Evaluation(described, kind, ds.source, first, report)
