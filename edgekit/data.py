"""Calibration and evaluation data: ``.npz`` files with one array per model input.

Keys are input names (a single-input model may use ``x``); labels are under ``y``; estimate
data may hold each sample's group under ``group`` (the condition it was drawn under, such
as clean or one drift: the accuracy estimate is fitted to hold every group's accuracy).
Every array is batched along axis 0 and all of them hold the same number of samples.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import DataError
from edgekit.manifest import TensorSpec

__all__ = ["Dataset", "check_inputs", "load_npz", "save_npz"]

LABEL_KEY = "y"
GROUP_KEY = "group"
SINGLE_INPUT_KEY = "x"


@dataclass
class Dataset:
    """Model inputs keyed by input name, and labels (and groups) when the file has them."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    groups: np.ndarray | None = None  # each sample's group (estimate data; see above)

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, count: int, start: int = 0) -> Dataset:
        stop = start + count
        return Dataset(
            {k: v[start:stop] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[start:stop],
            self.source,
            None if self.groups is None else self.groups[start:stop],
        )

    def batches(self, size: int) -> list[dict[str, np.ndarray]]:
        n = len(self)
        return [{k: v[i : i + size] for k, v in self.inputs.items()} for i in range(0, n, size)]


def save_npz(path: str | os.PathLike[str], inputs: dict[str, np.ndarray],
             labels: np.ndarray | None = None, groups: np.ndarray | None = None) -> None:
    """Write a data file in the layout :func:`load_npz` reads, atomically."""
    from edgekit.fsutil import atomic_write

    arrays = dict(inputs)
    if labels is not None:
        arrays[LABEL_KEY] = np.asarray(labels)
    if groups is not None:
        arrays[GROUP_KEY] = np.asarray(groups)
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]


def load_npz(
    path: str | os.PathLike[str],
    specs: list[TensorSpec] | None = None,
    *,
    require_labels: bool = False,
) -> Dataset:
    """Read a data file and, with ``specs``, check it against the model's inputs.

    Raises:
        DataError: the file is missing or not an npz, an input is missing, or a shape,
            dtype or sample count does not fit; the message names the input, the expected
            and the found shape.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {p} not found")
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(
            f"{p} is not a readable .npz file ({exc})",
            hint="save data with numpy.savez(path, <input name>=array, y=labels)",
        ) from exc
    labels = arrays.pop(LABEL_KEY, None)
    groups = arrays.pop(GROUP_KEY, None)
    if require_labels and labels is None:
        raise DataError(
            f"{p} has no labels (key 'y')",
            hint="add the labels under the key 'y', one per sample",
        )
    if not arrays:
        raise DataError(f"{p} holds no input arrays (only {sorted(['y'] if labels is not None else [])})")
    inputs = check_inputs(arrays, specs, str(p)) if specs is not None else arrays
    n = len(next(iter(inputs.values())))
    if labels is not None and len(labels) != n:
        raise DataError(f"{p}: {n} samples but {len(labels)} labels under 'y'")
    if groups is not None and (groups.ndim != 1 or len(groups) != n):
        raise DataError(f"{p}: {n} samples but groups of shape {list(groups.shape)} under"
                        f" '{GROUP_KEY}'", hint="store one group (an int or a name) per sample")
    return Dataset(inputs, labels, str(p), groups)


def check_inputs(
    arrays: dict[str, np.ndarray], specs: list[TensorSpec], where: str = "inputs"
) -> dict[str, np.ndarray]:
    """Match arrays to input specs by name (``x`` for a single input) and cast dtypes.

    Raises:
        DataError: collects every mismatch (missing input, unknown key, wrong rank or
            dimension, uncastable dtype, differing sample counts) into one message.
    """
    problems: list[str] = []
    out: dict[str, np.ndarray] = {}
    keys = set(arrays)
    if len(specs) == 1 and specs[0].name not in arrays and SINGLE_INPUT_KEY in arrays:
        arrays = {specs[0].name: arrays[SINGLE_INPUT_KEY]}
        keys = {specs[0].name}
    expected_names = [s.name for s in specs]
    for spec in specs:
        if spec.name not in arrays:
            problems.append(f"input '{spec.name}' is missing (expected shape {_fmt(spec.shape)})")
            continue
        arr = np.asarray(arrays[spec.name])
        keys.discard(spec.name)
        if arr.ndim != len(spec.shape):
            problems.append(
                f"input '{spec.name}': expected shape {_fmt(spec.shape)}, found {_fmt(arr.shape)}"
            )
            continue
        bad_dim = any(isinstance(d, int) and d > 0 and d != a
                      for i, (d, a) in enumerate(zip(spec.shape, arr.shape, strict=True)) if i > 0)
        if bad_dim:
            problems.append(
                f"input '{spec.name}': expected shape {_fmt(spec.shape)}, found {_fmt(arr.shape)}"
            )
            continue
        try:
            out[spec.name] = _cast(arr, spec.dtype)
        except DataError as exc:
            problems.append(f"input '{spec.name}': {exc.message}")
    for extra in sorted(keys):
        problems.append(f"unknown key '{extra}' (model inputs: {', '.join(expected_names)})")
    counts = {k: v.shape[0] for k, v in out.items()}
    if len(set(counts.values())) > 1:
        problems.append(f"inputs hold different sample counts: {counts}")
    if any(c == 0 for c in counts.values()):
        problems.append("inputs hold no samples")
    if problems:
        raise DataError(f"{where} does not fit the model:\n  - " + "\n  - ".join(problems))
    return out


def _cast(arr: np.ndarray, dtype: str) -> np.ndarray:
    target = np.dtype(dtype)
    if arr.dtype == target:
        return arr
    if np.issubdtype(target, np.floating) and (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        return arr.astype(target)
    if np.issubdtype(target, np.integer) and np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(target)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise DataError(f"values do not fit in {dtype}")
        return arr.astype(target)
    raise DataError(f"expected dtype {dtype}, found {arr.dtype}")


def _fmt(shape: object) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"  # type: ignore[attr-defined]
