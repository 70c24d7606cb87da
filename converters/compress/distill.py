"""Knowledge distillation: train a small PyTorch student on a teacher's softened outputs.

The loss is Hinton's: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) *
CE(s, y)``; the ``T^2`` factor keeps the soft-target gradients on the scale of the hard
ones. The teacher can be any source ``edgekit convert`` loads (PyTorch, Keras, ONNX): its
logits on the training data are computed once, up front. Training is seeded,
single-threaded and uses deterministic algorithms, so one seed gives one set of weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.data import Dataset, check_inputs, load_npz
from edgekit.errors import DataError, UsageError
from edgekit.evaluation import evaluate_outputs
from edgekit.timing import measure

from . import _torch as T

__all__ = ["DistillReport", "distill", "kd_loss"]

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@dataclass
class DistillReport:
    """Teacher and student figures, the training settings and where the student went."""

    teacher: dict[str, Any]
    student: T.ModelFigures
    settings: dict[str, Any]
    loss: list[float]
    notes: list[str] = field(default_factory=list)
    output: str | None = None

    @property
    def parameter_ratio(self) -> float | None:
        params = self.teacher.get("parameters")
        return params / self.student.parameters if params else None

    def to_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "student": self.student.to_dict(),
                "settings": self.settings, "loss": self.loss, "notes": self.notes,
                "output": self.output, "parameter_ratio": self.parameter_ratio}


def kd_loss(student_logits: Any, labels: Any, teacher_logits: Any, *, temperature: float,
            alpha: float) -> Any:
    """Soft-target KL (scaled by T^2) weighted by ``alpha``, plus hard-label cross-entropy."""
    from torch.nn import functional as F

    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1),
                    F.softmax(teacher_logits / t, dim=1), reduction="batchmean") * (t * t)
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1.0 - alpha) * hard


def _check_args(temperature: float, alpha: float, epochs: int, lr: float, batch: int) -> None:
    problems = []
    if not temperature > 0:
        problems.append(f"--temperature {temperature} must be above 0 (typical: 2 to 8)")
    if not 0.0 <= alpha <= 1.0:
        problems.append(f"--alpha {alpha} must be between 0 and 1")
    if epochs < 1:
        problems.append(f"--epochs {epochs} must be 1 or more")
    if not lr > 0:
        problems.append(f"--lr {lr} must be above 0")
    if batch < 1:
        problems.append(f"--batch {batch} must be 1 or more")
    if problems:
        raise UsageError("; ".join(problems))


def _labelled(data: str | os.PathLike[str] | Dataset, what: str) -> Dataset:
    ds = data if isinstance(data, Dataset) else load_npz(data)
    if ds.labels is None:
        raise DataError(f"{what} {ds.source} has no labels (key 'y')",
                        hint="add the true labels under 'y', one per sample")
    return ds


def _teacher_figures(loaded: Any, logits_eval: np.ndarray | None, eval_set: Dataset | None,
                     one: dict[str, np.ndarray], thread_count: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"framework": loaded.framework, "reference": loaded.ref.describe()}
    module = getattr(loaded, "module", None)
    if loaded.framework == "pytorch" and module is not None:
        doc["parameters"] = sum(int(p.numel()) for p in module.parameters())
    path = loaded.ref.path
    if path is not None:
        p = Path(path)
        doc["bytes"] = p.stat().st_size if p.is_file() else sum(
            q.stat().st_size for q in p.rglob("*") if q.is_file())
    with T.threads(thread_count):
        stats = measure(lambda: loaded.predict(one), runs=50, warmup=5)
    doc["latency_p50_ms"] = stats.p50_ms
    doc["latency_p95_ms"] = stats.p95_ms
    if logits_eval is not None and eval_set is not None:
        rep = evaluate_outputs(logits_eval, eval_set.labels, task="classification")
        doc["accuracy"] = rep.headline()["accuracy"]
        doc["f1"] = rep.headline()["f1"]
    return doc


def _build_student(student: str | Callable[[], Any], seed: int) -> Any:
    """The student model, built by its factory under ``seed``.

    Raises:
        UsageError: the factory cannot be imported, fails, or returns no ``nn.Module``.
    """
    import torch

    factory = T.resolve_factory(student) if isinstance(student, str) else student
    try:
        with T.deterministic(seed):
            model = factory()
    except Exception as exc:  # the user's factory raises anything
        raise UsageError(f"the student factory failed: {type(exc).__name__}: {exc}",
                         hint="check that it builds the model without arguments") from exc
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"the student factory returned {type(model).__name__}, not an nn.Module",
                         hint="the factory must build and return a torch.nn.Module")
    return model


@dataclass
class _Teacher:
    """The teacher's outputs on the (checked) training data, and its figures on the data
    the student is scored on."""

    train_set: Dataset
    scored: Dataset
    names: list[str]
    train_logits: np.ndarray
    figures: dict[str, Any]

    @classmethod
    def run(cls, teacher: Any, weights: str | os.PathLike[str] | None, train_set: Dataset,
            eval_set: Dataset | None, threads: int, progress: Progress) -> _Teacher:
        """Load the teacher, check the data against its inputs and run it on them.

        Raises:
            ModelError: the teacher cannot be loaded.
            DataError: the data do not fit the teacher's inputs.
        """
        from converters import ConvertOptions, load_source, run_batches

        loaded = load_source(teacher, ConvertOptions(), weights=weights,
                             example={k: v[:1] for k, v in train_set.inputs.items()})
        names = [s.name for s in loaded.inputs]
        train_set = Dataset(check_inputs(train_set.inputs, loaded.inputs,
                                         f"training data {train_set.source}"),
                            train_set.labels, train_set.source)
        scored = train_set
        if eval_set is not None:
            scored = Dataset(check_inputs(eval_set.inputs, loaded.inputs,
                                          f"evaluation data {eval_set.source}"),
                             eval_set.labels, eval_set.source)
        progress("computing the teacher's outputs")
        with T.threads(1):
            first = loaded.outputs[0].name
            train_logits = run_batches(loaded.predict, train_set, 256)[first]
            eval_logits = run_batches(loaded.predict, scored, 256)[first]
        one = {k: v[:1] for k, v in scored.inputs.items()}
        figures = _teacher_figures(loaded, eval_logits, scored, one, threads)
        return cls(train_set, scored, names, train_logits, figures)


def _check_student_outputs(model: Any, example: tuple[Any, ...], teacher_logits: np.ndarray
                           ) -> None:
    """Raises UsageError: the student's output per sample differs in shape from the teacher's."""
    import torch

    model.eval()
    with torch.no_grad():
        probe = model(*example)
    probe = probe[0] if isinstance(probe, (tuple, list)) else probe
    if tuple(probe.shape[1:]) != tuple(teacher_logits.shape[1:]):
        raise UsageError(
            f"the student outputs shape {list(probe.shape[1:])} per sample, the teacher"
            f" {list(teacher_logits.shape[1:])}",
            hint="build the student with the same number of classes as the teacher",
        )


def distill(
    teacher: Any,
    student: str | Callable[[], Any],
    *,
    data: str | os.PathLike[str] | Dataset,
    output: str | os.PathLike[str] | None,
    eval_data: str | os.PathLike[str] | Dataset | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    epochs: int = 10,
    seed: int = 0,
    lr: float = 3e-3,
    batch: int = 64,
    teacher_weights: str | os.PathLike[str] | None = None,
    threads: int = 1,
    progress: Progress = _quiet,
) -> DistillReport:
    """Distill ``teacher`` into the model that ``student`` (``package.module:factory``) builds.

    Without ``eval_data`` the accuracies are measured on the training data.

    Raises:
        UsageError: a bad setting, an output folder that does not exist, a student factory
            that cannot be imported or does not return an ``nn.Module``, or a student whose
            outputs do not match the teacher's classes.
        DataError: training data without labels, or data that do not fit the teacher.
        ModelError: the teacher cannot be loaded.
        ConversionError: the trained student cannot be exported.
        OutputWriteError: the program cannot be written (nothing partial is left).
    """
    import torch

    _check_args(temperature, alpha, epochs, lr, batch)
    if output is not None:
        T.check_output_path(output)
    model = _build_student(student, seed)
    train = _labelled(data, "training data")
    evaluation = _labelled(eval_data, "evaluation data") if eval_data is not None else None
    progress("loading the teacher")
    taught = _Teacher.run(teacher, teacher_weights, train, evaluation, threads, progress)
    train_set, scored, names, teacher_train = (taught.train_set, taught.scored, taught.names,
                                               taught.train_logits)
    example = tuple(torch.from_numpy(np.ascontiguousarray(train_set.inputs[n][:1]))
                    for n in names)
    _check_student_outputs(model, example, teacher_train)

    progress(f"distilling for {epochs} epochs (T={temperature:g}, alpha={alpha:g}, seed={seed})")
    model.train()
    history = T.train(
        model,
        lambda out, y, t: kd_loss(out, y, t, temperature=temperature, alpha=alpha),
        train_set, names, epochs=epochs, batch=batch, lr=lr, seed=seed,
        targets=teacher_train, progress=progress,
    )
    model.eval()
    program, notes = T.export_program(model, example)
    figures = T.figures(model, example, names, program=program, eval_data=scored,
                        thread_count=threads)
    report = DistillReport(
        teacher=taught.figures, student=figures,
        settings={"temperature": temperature, "alpha": alpha, "epochs": epochs, "seed": seed,
                  "lr": lr, "batch": batch, "data": train_set.source,
                  "eval": scored.source, "student": student if isinstance(student, str)
                  else getattr(student, "__name__", type(student).__name__)},
        loss=history, notes=notes,
    )
    if output is not None:
        T.save_program(program, output)
        report.output = str(output)
    return report
