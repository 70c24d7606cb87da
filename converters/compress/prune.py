"""Magnitude pruning of PyTorch models, written out as a ``torch.export`` program (``.pt2``).

Two modes:

- unstructured: global magnitude pruning; the smallest ``sparsity`` fraction of all
  Conv/Linear weights becomes zero. Tensors keep their shapes, so the model is not faster;
  it compresses better (the package is a deflated zip).
- structured: whole output channels of Conv/Linear layers go, and the layers that read them
  (BatchNorm, the next Conv or Linear, a flatten in between) are rebuilt with fewer inputs,
  so the exported model really is smaller and faster.

Optional fine-tuning on labelled data recovers accuracy (pruned weights stay zero).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgekit.data import Dataset, load_npz
from edgekit.errors import ConversionError, DataError, UsageError
from edgekit.fsutil import write_bytes_atomic

from . import _torch as T
from ._channels import apply_groups, plan_groups

__all__ = ["PruneReport", "prune", "prune_module"]

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@dataclass
class PruneReport:
    """Before-and-after figures, per-layer changes and where the program was written."""

    mode: str
    sparsity: float
    before: T.ModelFigures
    after: T.ModelFigures
    layers: list[dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)
    finetune: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    output: str | None = None
    compressed_bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "sparsity": self.sparsity, "before": self.before.to_dict(),
                "after": self.after.to_dict(), "layers": self.layers, "skipped": self.skipped,
                "finetune": self.finetune, "notes": self.notes, "output": self.output,
                "compressed_bytes": self.compressed_bytes}


def _check_args(sparsity: float, finetune: Any, epochs: int) -> None:
    problems = []
    if not 0.0 < sparsity < 1.0:
        problems.append(f"--sparsity {sparsity} must be above 0 and below 1 (e.g. 0.5)")
    if finetune is not None and epochs < 1:
        problems.append("--finetune needs --epochs 1 or more")
    if finetune is None and epochs:
        problems.append("--epochs needs --finetune train.npz")
    if problems:
        raise UsageError("; ".join(problems))


def _weight_names(gm: Any) -> list[str]:
    import torch

    aten = torch.ops.aten
    kinds = {aten.conv1d.default, aten.conv2d.default, aten.linear.default}
    return [str(n.args[1].target) for n in gm.graph.nodes
            if n.op == "call_function" and n.target in kinds
            and getattr(n.args[1], "op", None) == "get_attr"]


def _global_masks(gm: Any, sparsity: float) -> dict[str, Any]:
    """Zero the globally smallest weights; return the masks that keep them zero."""
    import torch

    names = list(dict.fromkeys(_weight_names(gm)))
    if not names:
        raise ConversionError("the model has no Conv or Linear weights to prune")
    params = [gm.get_parameter(n) for n in names]
    flat = torch.cat([p.detach().abs().reshape(-1) for p in params])
    k = int(round(sparsity * flat.numel()))
    keep = torch.ones_like(flat)
    keep[torch.argsort(flat, stable=True)[:k]] = 0.0
    masks: dict[str, Any] = {}
    start = 0
    with torch.no_grad():
        for name, p in zip(names, params, strict=True):
            mask = keep[start:start + p.numel()].reshape(p.shape)
            start += p.numel()
            p.mul_(mask)
            masks[name] = mask
    return masks


def prune_module(gm: Any, sparsity: float, *, structured: bool
                 ) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, Any]]:
    """Prune an unlifted exported module in place.

    Returns per-layer changes, the layers left alone with the reason, and (unstructured)
    the masks to re-apply after each fine-tuning step.

    Raises:
        ConversionError: nothing in the model can be pruned in the chosen mode.
    """
    if structured:
        groups, skipped = plan_groups(gm)
        if not groups:
            detail = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "no Conv/Linear layer"
            raise ConversionError(
                f"no layer can lose channels ({detail})",
                hint="structured pruning needs Conv/Linear layers that feed other Conv/Linear"
                " layers; try unstructured pruning (leave out --structured)",
            )
        apply_groups(gm, groups, sparsity)
        layers = [{"layer": g.layer, "channels": g.channels, "kept": len(g.keep)}
                  for g in groups]
        return layers, skipped, {}
    masks = _global_masks(gm, sparsity)
    layers = [{"layer": name.rsplit(".", 1)[0], "weights": int(m.numel()),
               "zeros": float(1.0 - m.mean())} for name, m in masks.items()]
    return layers, {}, masks


def prune(
    source: Any,
    *,
    sparsity: float,
    structured: bool,
    output: str | os.PathLike[str] | None,
    weights: str | os.PathLike[str] | None = None,
    finetune: str | os.PathLike[str] | Dataset | None = None,
    epochs: int = 0,
    eval_data: str | os.PathLike[str] | Dataset | None = None,
    lr: float = 1e-3,
    batch: int = 64,
    seed: int = 0,
    threads: int = 1,
    example: dict[str, Any] | None = None,
    progress: Progress = _quiet,
) -> PruneReport:
    """Prune a PyTorch model and write it as a ``.pt2`` program that ``convert`` takes.

    The example input for export is ``example`` (arrays by input name), else the first
    sample of the evaluation or fine-tuning data.

    Raises:
        UsageError: sparsity outside (0, 1), --epochs without --finetune (or the reverse),
            an unwritable output, or a source that is not a PyTorch model.
        DataError: fine-tuning or evaluation data without labels or of the wrong shape.
        ModelError: the source cannot be loaded.
        ConversionError: nothing can be pruned, or the pruned model cannot be exported.
        OutputWriteError: the program cannot be written (nothing partial is left).
    """
    _check_args(sparsity, finetune, epochs)
    if output is not None:
        T.check_output_path(output)
    train_set = _dataset(finetune)
    eval_set = _dataset(eval_data)
    progress("loading the model")
    module, args, names = T.load_torch_source(source, weights=weights,
                                              data=eval_set or train_set, example=example)
    program, notes = T.export_program(module, args)
    gm = program.module()
    before = T.figures(gm, args, names, program=program, eval_data=eval_set,
                       thread_count=threads)
    before_zip = len(zlib.compress(T.program_bytes(program), 6))
    progress(f"pruning {'channels' if structured else 'weights'} at sparsity {sparsity:g}")
    layers, skipped, masks = prune_module(gm, sparsity, structured=structured)
    tuned = None
    if train_set is not None:
        import torch
        from torch.nn import functional as F

        def reapply() -> None:
            with torch.no_grad():
                for name, mask in masks.items():
                    gm.get_parameter(name).mul_(mask)

        history = T.train(gm, lambda out, y, _t: F.cross_entropy(out, y), train_set, names,
                          epochs=epochs, batch=batch, lr=lr, seed=seed,
                          after_step=reapply if masks else None, progress=progress)
        tuned = {"data": train_set.source, "epochs": epochs, "loss": history, "seed": seed}
    progress("exporting the pruned model")
    pruned, more = T.export_program(gm, args)
    after = T.figures(gm, args, names, program=pruned, eval_data=eval_set,
                      thread_count=threads)
    data = T.program_bytes(pruned)
    report = PruneReport(
        mode="structured" if structured else "unstructured", sparsity=sparsity, before=before,
        after=after, layers=layers, skipped=skipped, finetune=tuned, notes=notes + more,
        compressed_bytes={"before": before_zip, "after": len(zlib.compress(data, 6))},
    )
    if output is not None:
        write_bytes_atomic(output, data)
        report.output = str(output)
    return report


def _dataset(data: str | os.PathLike[str] | Dataset | None) -> Dataset | None:
    if data is None or isinstance(data, Dataset):
        if data is not None and data.labels is None:
            raise DataError(f"{data.source} has no labels (key 'y')",
                            hint="add the labels under 'y', one per sample")
        return data
    return load_npz(data, require_labels=True)
