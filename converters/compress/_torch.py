"""PyTorch helpers that pruning and distillation share: export, save, measure, train.

torch is imported inside each function so that importing :mod:`converters.compress`
stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.data import Dataset
from edgekit.errors import ConversionError, DataError, UsageError
from edgekit.evaluation import evaluate_outputs
from edgekit.fsutil import atomic_write
from edgekit.timing import measure

__all__ = [
    "ModelFigures",
    "deterministic",
    "export_program",
    "figures",
    "load_torch_source",
    "predict",
    "program_bytes",
    "resolve_factory",
    "save_program",
    "train",
]


@dataclass
class ModelFigures:
    """Size, speed and quality of one PyTorch model, measured the same way before and after."""

    parameters: int
    nonzero_parameters: int
    program_bytes: int
    latency_p50_ms: float
    latency_p95_ms: float
    accuracy: float | None = None
    f1: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_torch_source(source: Any, *, weights: str | os.PathLike[str] | None,
                      data: Dataset | None, example: dict[str, np.ndarray] | None = None
                      ) -> tuple[Any, tuple[Any, ...], list[str]]:
    """Load a PyTorch source the way ``edgekit convert`` does: module, example args, names.

    The example input comes from ``example``, else the first sample of ``data``.

    Raises:
        ModelError: the source cannot be loaded, or there is no example input.
        UsageError: the source is not a PyTorch model.
    """
    from converters import ConvertOptions, load_source

    where = None
    if example is None and data is not None:
        example = {k: v[:1] for k, v in data.inputs.items()}
        where = f"data {data.source}"
    loaded = load_source(source, ConvertOptions(), weights=weights, example=example,
                         example_source=where)
    if loaded.framework != "pytorch":
        raise UsageError(
            f"{loaded.ref.describe()} is a {loaded.framework} model; this command takes"
            " PyTorch models",
            hint="give a .pt2, a TorchScript .pt or a package.module:factory",
        )
    return loaded.module, tuple(loaded.example_args), list(loaded.input_names)  # type: ignore[attr-defined]


def resolve_factory(spec: str) -> Callable[[], Any]:
    """Import ``package.module:factory``.

    Raises:
        UsageError: the text is not ``module:name``, the module cannot be imported, or the
            name is missing or not callable.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"{spec!r} is not package.module:factory",
                         hint="for example --student mymodels.digits:small_cnn")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code
        raise UsageError(
            f"cannot import {module_name!r} for {spec}: {type(exc).__name__}: {exc}",
            hint="make the package importable (pip install -e . or PYTHONPATH)",
        ) from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise UsageError(f"{module_name} has no callable {attr!r}",
                         hint="name a function or class that returns an nn.Module")
    return factory  # type: ignore[no-any-return]


def _batched(example_args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Example args with batch 2, so export does not specialise the batch dimension to 1."""
    import torch

    return tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.ndim and a.shape[0] == 1
                 else a for a in example_args)


def export_program(module: Any, example_args: tuple[Any, ...]) -> tuple[Any, list[str]]:
    """``torch.export`` the module with a dynamic batch dimension (static if that fails).

    Returns the program and notes on what was done.

    Raises:
        ConversionError: the module cannot be exported at all.
    """
    import torch

    args = _batched(example_args)
    batch = torch.export.Dim("batch")
    dyn = tuple({0: batch} if isinstance(a, torch.Tensor) and a.ndim else None for a in args)
    try:
        return torch.export.export(module, args, dynamic_shapes=dyn), []
    except Exception as exc:  # export raises many kinds of errors; the static retry tells
        first = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    try:
        return torch.export.export(module, tuple(example_args)), [
            f"exported with a fixed batch size (a dynamic batch failed: {first})"]
    except Exception as exc:
        raise ConversionError(f"torch.export failed on the model: {type(exc).__name__}: {exc}",
                              hint="the model must be traceable by torch.export") from exc


def program_bytes(program: Any) -> bytes:
    """The bytes of a saved ``.pt2`` program."""
    import torch

    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def save_program(program: Any, path: str | os.PathLike[str]) -> int:
    """Write a ``.pt2`` atomically; return its size in bytes.

    Raises:
        OutputWriteError: the file cannot be written (nothing partial is left).
    """
    data = program_bytes(program)
    with atomic_write(path) as handle:
        handle.write(data)
    return len(data)


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Check up front that the output can be written, before any long computation.

    Raises:
        UsageError: the folder does not exist or the path is a folder.
    """
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"output {p} is a folder", hint="give a file name such as model.pt2")
    if not (p.parent if str(p.parent) else Path(".")).is_dir():
        raise UsageError(f"output folder {p.parent} does not exist")
    return p


def _as_args(inputs: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    if len(names) == 1 and names[0] not in inputs and len(inputs) == 1:
        return [next(iter(inputs.values()))]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise DataError(f"data has no input {missing[0]!r} (has: {', '.join(sorted(inputs))})")
    return [inputs[n] for n in names]


def predict(module: Any, data: Dataset, names: list[str], batch: int = 256) -> np.ndarray:
    """Run the module over the data without gradients; the first output, as numpy.

    Raises:
        DataError: the data lack one of the model's inputs.
    """
    import torch

    arrays = _as_args(data.inputs, names)
    parts = []
    with torch.no_grad():
        for i in range(0, len(arrays[0]), batch):
            out = module(*(torch.from_numpy(np.ascontiguousarray(a[i:i + batch]))
                           for a in arrays))
            if isinstance(out, (tuple, list)):
                out = out[0]
            parts.append(out.detach().float().numpy())
    return np.concatenate(parts)


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Run torch on ``count`` intra-op threads, restoring the previous setting after."""
    import torch

    previous = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seeded, single-threaded, deterministic algorithms: the same seed, the same weights."""
    import torch

    was_det = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    try:
        with threads(1):
            yield
    finally:
        torch.use_deterministic_algorithms(was_det)


def figures(module: Any, example_args: tuple[Any, ...], names: list[str], *,
            program: Any = None, eval_data: Dataset | None = None, thread_count: int = 1,
            runs: int = 50) -> ModelFigures:
    """Parameter counts, ``.pt2`` size, eager batch-1 latency and, with labels, accuracy.

    Raises:
        ConversionError: the module cannot be exported (for the size figure).
    """
    import torch

    params = [p for p in module.parameters()]
    total = sum(int(p.numel()) for p in params)
    nonzero = sum(int(torch.count_nonzero(p)) for p in params)
    prog = program if program is not None else export_program(module, example_args)[0]
    size = len(program_bytes(prog))
    one = tuple(a[:1] if isinstance(a, torch.Tensor) else a for a in example_args)
    with torch.no_grad(), threads(thread_count):
        stats = measure(lambda: module(*one), runs=runs, warmup=5)
    acc = f1 = None
    if eval_data is not None and eval_data.labels is not None:
        rep = evaluate_outputs(predict(module, eval_data, names), eval_data.labels,
                               task="classification")
        acc, f1 = rep.headline()["accuracy"], rep.headline()["f1"]
    return ModelFigures(total, nonzero, size, stats.p50_ms, stats.p95_ms, acc, f1)


def train(module: Any, loss_fn: Callable[[Any, Any, Any], Any], data: Dataset, names: list[str],
          *, epochs: int, batch: int, lr: float, seed: int,
          targets: np.ndarray | None = None,
          after_step: Callable[[], None] | None = None,
          progress: Callable[[str], None] | None = None) -> list[float]:
    """Train with Adam on shuffled mini-batches, deterministically for a seed.

    ``loss_fn(outputs, labels, targets)`` gets the batch's labels and, when given, the
    matching rows of ``targets`` (a teacher's logits). ``after_step`` runs after each
    optimizer step (pruning masks use it). Returns the mean loss per epoch.

    Raises:
        DataError: the data has no labels.
    """
    import torch

    if data.labels is None:
        raise DataError(f"{data.source} has no labels (key 'y'); training needs them",
                        hint="add the labels under 'y', one per sample")
    arrays = [torch.from_numpy(np.ascontiguousarray(a)) for a in _as_args(data.inputs, names)]
    labels = torch.from_numpy(np.asarray(data.labels).astype(np.int64))
    tgt = torch.from_numpy(np.asarray(targets, dtype=np.float32)) if targets is not None else None
    history: list[float] = []
    with deterministic(seed):
        optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
        gen = torch.Generator().manual_seed(seed)
        n = len(labels)
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for i in range(0, n, batch):
                idx = order[i:i + batch]
                optimizer.zero_grad()
                out = module(*(a[idx] for a in arrays))
                if isinstance(out, (tuple, list)):
                    out = out[0]
                loss = loss_fn(out, labels[idx], tgt[idx] if tgt is not None else None)
                loss.backward()
                optimizer.step()
                if after_step is not None:
                    after_step()
                total += float(loss.detach()) * len(idx)
            history.append(total / n)
            if progress is not None:
                progress(f"epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f}")
    return history
