"""Accuracy-aware optimization: convert every candidate recipe, measure, keep the best.

Each candidate (fp32, fp16, dynamic and static int8 variants, the TFLite modes) is converted
by the real pipeline into a package, run in its real runtime over the evaluation data and
scored on the metric against the source model: ``accuracy`` or ``f1`` against the labels,
or ``cosine`` agreement with the source's outputs (for encoders without labels). Latency is
measured afterwards for all candidates and the source model together, in interleaved rounds
with the same thread count, so a busy machine slows them all alike. The best candidate
within the budget (``drop <= max_drop``) for the objective (latency or size) is written,
with the whole table and the reason in ``manifest.extra["optimize"]`` and a plot beside it.

When no int8 candidate meets the budget, :mod:`.sensitivity` finds the nodes that hurt
most and keeps just enough of them in float; that candidate joins the comparison.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.artifact import open_package, write_package
from edgekit.data import Dataset, check_inputs, load_npz
from edgekit.errors import DataError, UsageError, ValidationError
from edgekit.evaluation import agreement, evaluate_outputs
from edgekit.runtimes import RuntimeOptions, load_session

from ..evaluate import run_model
from ..options import ConvertOptions
from .candidates import Recipe, select_recipes
from .report import change_text, choose, format_table, write_plot

__all__ = ["METRICS", "OBJECTIVES", "OptimizeResult", "optimize"]

METRICS = ("accuracy", "f1", "cosine")
OBJECTIVES = ("latency", "size")
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@dataclass
class OptimizeResult:
    """The decision, the evidence, and what was written."""

    chosen: dict[str, Any]
    reason: str
    rows: list[dict[str, Any]]
    source: dict[str, Any]
    settings: dict[str, Any]
    sensitivity: dict[str, Any] | None
    table: str
    output: Path | None = None
    plot: Path | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen["name"], "reason": self.reason, "candidates": self.rows,
                "source": self.source, "settings": self.settings,
                "sensitivity": self.sensitivity, "notes": self.notes,
                "output": str(self.output) if self.output else None,
                "plot": str(self.plot) if self.plot else None}


def score(outputs: np.ndarray, *, metric: str, labels: np.ndarray | None,
          reference: np.ndarray) -> float:
    """One number per model: accuracy / macro F1 against labels, or cosine to the source.

    Raises:
        DataError: missing labels, or outputs that do not fit the metric.
    """
    if metric == "cosine":
        return agreement(reference, outputs)
    rep = evaluate_outputs(outputs, labels, task="classification")
    return rep.headline()[metric]


class Runner:
    """Converts recipes into packages and scores them; shared by optimize and sensitivity."""

    def __init__(self, source: Any, base: ConvertOptions, *, weights: Any,
                 calibration: Dataset | None, eval_set: Dataset, reference: np.ndarray,
                 metric: str, baseline: float, max_drop: float, workdir: Path) -> None:
        self.source = source
        self.base = base
        self.weights = weights
        self.calibration = calibration
        self.eval_set = eval_set
        self.reference = reference
        self.metric = metric
        self.baseline = baseline
        self.max_drop = max_drop
        self.workdir = workdir
        self.packages: dict[str, Path] = {}
        self.exporter: str | None = None
        self._count = 0

    def run(self, recipe: Recipe, *, subset: int | None = None, keep: bool = True
            ) -> dict[str, Any]:
        """Convert one recipe and score it (on the first ``subset`` samples if given).

        A failed conversion is a row with ``status: failed``, never an exception.
        """
        from converters import convert

        self._count += 1
        path = self.workdir / f"candidate-{self._count}.edgepkg"
        data = self.eval_set if subset is None else self.eval_set.take(subset)
        reference = self.reference[: len(data)]
        baseline = self.baseline if subset is None else score(
            reference, metric=self.metric, labels=data.labels, reference=reference)
        row: dict[str, Any] = {
            "name": recipe.name, "target": recipe.target, "quantize": recipe.quantize,
            "per_channel": recipe.per_channel if recipe.int8 else None,
            "calibration_method": recipe.calibration_method if recipe.static_onnx
            or (recipe.target == "tflite" and recipe.quantize == "int8") else None,
            "nodes_in_float": list(recipe.nodes_to_exclude), "status": "failed",
            "error": None, "metric": None, "drop": None, "meets_budget": False,
            "latency_p50_ms": None, "latency_p95_ms": None, "latency_ratio": None,
            "size_bytes": None, "convert_s": None, "warnings": [], "exporter": None,
        }
        opts = recipe.options(self.base)
        if recipe.target == "onnx" and self.exporter is not None:
            opts = opts.replace(exporter=self.exporter)
        t0 = time.perf_counter()
        try:
            # onnxruntime's calibrators print to stdout; keep stdout for --json.
            with contextlib.redirect_stdout(sys.stderr):
                result = convert(self.source, opts, output=path, calibration=self.calibration,
                                 eval_data=data, weights=self.weights)
            pkg = open_package(path)
            session = load_session(pkg.manifest, pkg.model_bytes(),
                                   RuntimeOptions(threads=self.base.threads))
            outputs = run_model(session.run, data, batch=64)
            first = pkg.manifest.outputs[0].name
            value = score(outputs[first], metric=self.metric, labels=data.labels,
                          reference=reference)
        except Exception as exc:  # a failing candidate is reported, never fatal
            path.unlink(missing_ok=True)
            row["error"] = _first_line(exc)
            row["convert_s"] = round(time.perf_counter() - t0, 2)
            return row
        chosen_exporter = result.manifest.recipe.get("exporter")
        if recipe.target == "onnx" and self.exporter is None \
                and chosen_exporter in ("dynamo", "torchscript"):
            self.exporter = str(chosen_exporter)
        if not math.isfinite(value):
            value = float("-inf")
        row.update(status="ok", metric=value, drop=baseline - value,
                   meets_budget=bool(baseline - value <= self.max_drop + 1e-12),
                   size_bytes=pkg.manifest.files[pkg.manifest.model_file].size,
                   convert_s=round(time.perf_counter() - t0, 2), warnings=result.warnings,
                   exporter=chosen_exporter)
        if keep:
            self.packages[recipe.name] = path
        else:
            path.unlink(missing_ok=True)
        return row


def _time_all(packages: dict[str, Path], loaded: Any, one: dict[str, np.ndarray],
              threads: int, runs: int) -> tuple[dict[str, tuple[float, float]], tuple[float, float]]:
    """p50 and p95 (ms) of each package and of the source, interleaved run by run."""
    calls: dict[str, Callable[[], Any]] = {}
    for name, path in packages.items():
        pkg = open_package(path)
        session = load_session(pkg.manifest, pkg.model_bytes(), RuntimeOptions(threads=threads))
        feeds = check_inputs(one, pkg.manifest.inputs, "latency input")
        calls[name] = (lambda s, f: lambda: s.run(f))(session, feeds)
    calls["\0source"] = lambda: loaded.predict(one)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    guard: Any = contextlib.nullcontext()
    if loaded.framework == "pytorch" and "torch" in sys.modules:
        from ._torch import threads as torch_threads

        guard = torch_threads(threads)
    with guard:
        for fn in calls.values():
            for _ in range(3):
                fn()
        for _ in range(runs):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1000.0)
    stats = {k: (float(np.percentile(v, 50)), float(np.percentile(v, 95)))
             for k, v in samples.items()}
    source = stats.pop("\0source")
    return stats, source


def _check(metric: str, max_drop: float, objective: str, targets: tuple[str, ...],
           runs: int) -> None:
    problems = []
    if metric not in METRICS:
        problems.append(f"--metric {metric!r} is not one of {', '.join(METRICS)}")
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop)
            and 0.0 <= max_drop < 1.0):
        problems.append(f"--max-drop {max_drop} must be at least 0 and below 1"
                        " (0.01 allows one point of accuracy)")
    if objective not in OBJECTIVES:
        problems.append(f"--objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if not targets or any(t not in ("onnx", "tflite") for t in targets):
        problems.append(f"--target {'+'.join(targets)}: choose onnx, tflite or both")
    if runs < 1:
        problems.append("--latency-runs must be 1 or more")
    if problems:
        raise UsageError("; ".join(problems))


def optimize(
    source: Any,
    *,
    eval_data: str | os.PathLike[str] | Dataset,
    output: str | os.PathLike[str] | None,
    calibration: str | os.PathLike[str] | Dataset | None = None,
    metric: str = "accuracy",
    max_drop: float = 0.01,
    targets: tuple[str, ...] = ("onnx",),
    objective: str = "latency",
    candidates: Sequence[str | Recipe] | None = None,
    weights: str | os.PathLike[str] | None = None,
    options: ConvertOptions | None = None,
    latency_runs: int = 50,
    sensitivity_samples: int = 200,
    max_probes: int = 24,
    sign_key: Any = None,
    plot: bool = True,
    progress: Progress = _quiet,
) -> OptimizeResult:
    """Try the candidate recipes and write the best one within the budget.

    ``options`` carries what every candidate shares (name, version, input shapes,
    threads); target and quantization fields are set per candidate.

    Raises:
        UsageError: a bad metric, budget, objective, target or candidate name, or an output
            folder that does not exist.
        DataError: evaluation data without labels for accuracy/f1, or data that do not fit.
        ModelError: the source cannot be loaded.
        ValidationError: no candidate meets the budget (nothing is written).
        OutputWriteError: the package or plot cannot be written.
    """
    _check(metric, max_drop, objective, targets, latency_runs)
    if sensitivity_samples < 1 or max_probes < 1:
        raise UsageError("--sensitivity-samples and --max-probes must be 1 or more")
    if output is not None and not Path(output).resolve().parent.is_dir():
        raise UsageError(f"output folder {Path(output).parent} does not exist")
    base = (options or ConvertOptions()).validate()
    study = _prepare(source, eval_data, calibration, metric, base, weights,
                     select_recipes(targets, candidates), progress)
    with tempfile.TemporaryDirectory(prefix="edgekit-optimize-") as tmp:
        runner = Runner(source, base, weights=weights, calibration=study.calib,
                        eval_set=study.ev, reference=study.reference, metric=metric,
                        baseline=study.baseline, max_drop=max_drop, workdir=Path(tmp))
        rows, fallback = _run_candidates(runner, study, sensitivity_samples, max_probes,
                                         progress)
        src = _time_rows(runner, study, rows, base.threads, latency_runs, progress)
        chosen, reason = choose(rows, metric=metric, max_drop=max_drop, objective=objective,
                                fallback=fallback)
        table = format_table(rows, metric=metric, source=src,
                             chosen=chosen["name"] if chosen else None)
        threshold = study.baseline - max_drop
        settings = {"metric": metric, "max_drop": max_drop, "baseline": study.baseline,
                    "threshold": threshold, "objective": objective, "targets": list(targets),
                    "threads": base.threads, "eval": study.ev.source,
                    "eval_samples": len(study.ev),
                    "calibration": (study.calib or study.ev).source,
                    "latency": {"batch": 1, "runs": latency_runs, "method": "interleaved"}}
        if chosen is None:
            raise ValidationError(
                "\n".join([reason, *(f"note: {n}" for n in study.notes), table]),
                hint="raise --max-drop, add candidates, or improve the model; nothing was"
                     " written")
        result = OptimizeResult(chosen=chosen, reason=reason, rows=rows, source=src,
                                settings=settings, sensitivity=fallback, table=table,
                                notes=study.notes)
        if output is not None:
            _write(runner.packages[chosen["name"]], Path(output), result, sign_key)
            result.output = Path(output)
            if plot:
                result.plot = Path(output).with_suffix(".optimize.png")
                write_plot(result.plot, rows, metric=metric, threshold=threshold, source=src,
                           chosen=chosen["name"],
                           title=f"{Path(output).name}: {metric} vs latency"
                                 f" (max drop {max_drop:g}, {base.threads} thread(s))")
    return result


def _time_rows(runner: Runner, study: _Study, rows: list[dict[str, Any]], threads: int,
               latency_runs: int, progress: Progress) -> dict[str, Any]:
    """Time every candidate package and the source model (interleaved, batch 1), add the
    figures to ``rows``, and return the source's row."""
    progress(f"timing {len(runner.packages)} candidates and the source model"
             f" ({latency_runs} interleaved runs, batch 1, {threads} thread(s))")
    one = {k: v[:1] for k, v in study.ev.inputs.items()}
    stats, src_stats = _time_all(runner.packages, study.loaded, one, threads, latency_runs)
    for row in rows:
        if row["name"] in stats:
            p50, p95 = stats[row["name"]]
            row.update(latency_p50_ms=p50, latency_p95_ms=p95,
                       latency_ratio=p50 / src_stats[0] if src_stats[0] else None)
    return {"framework": study.loaded.framework, "metric": study.baseline,
            "latency_p50_ms": src_stats[0], "latency_p95_ms": src_stats[1]}


@dataclass
class _Study:
    """What every candidate is measured against: the data, the source and its score."""

    ev: Dataset
    calib: Dataset | None
    loaded: Any
    recipes: list[Recipe]
    reference: np.ndarray
    baseline: float
    notes: list[str]


def _prepare(source: Any, eval_data: str | os.PathLike[str] | Dataset,
             calibration: str | os.PathLike[str] | Dataset | None, metric: str,
             base: ConvertOptions, weights: Any, recipes: list[Recipe],
             progress: Progress) -> _Study:
    """Load the data and the source (the data checked against its inputs before it runs),
    drop the recipes whose target does not take it, and score the source.

    Raises:
        DataError: no labels for accuracy/f1, or data that do not fit the model.
        ModelError: the source cannot be loaded.
        UsageError: no recipe applies to the model.
    """
    from converters import load_source, target_backends

    ev = eval_data if isinstance(eval_data, Dataset) else load_npz(eval_data)
    if metric != "cosine" and ev.labels is None:
        raise DataError(
            f"--metric {metric} needs labels, and {ev.source} has none (key 'y')",
            hint="add the labels under 'y', or use --metric cosine to score agreement with"
                 " the source model's outputs")
    calib = calibration if isinstance(calibration, Dataset) or calibration is None \
        else load_npz(calibration)
    notes: list[str] = []
    progress("loading the source model")
    loaded = load_source(source, base, weights=weights,
                         example={k: v[:1] for k, v in ev.inputs.items()},
                         example_source=f"evaluation data {ev.source}")
    ev = Dataset(check_inputs(ev.inputs, loaded.inputs, f"evaluation data {ev.source}"),
                 ev.labels, ev.source)
    for recipe in list(recipes):
        backend = target_backends().get(recipe.target)
        if backend is None or loaded.framework not in backend.SOURCES:
            recipes.remove(recipe)
            notes.append(f"{recipe.name}: the {recipe.target} target does not take"
                         f" {loaded.framework} models; skipped")
    if not recipes:
        raise UsageError("no candidate recipe applies to this model",
                         hint="choose another --target or --candidates")
    if calib is None and any(r.quantize == "int8" for r in recipes):
        notes.append("static int8 was calibrated on the evaluation data (pass --calibration"
                     " to keep calibration and evaluation apart)")
    progress("running the source model on the evaluation data")
    ref_out = run_model(loaded.predict, ev, batch=64)
    first = loaded.outputs[0].name if loaded.outputs[0].name in ref_out else next(iter(ref_out))
    reference = ref_out[first]
    baseline = score(reference, metric=metric, labels=ev.labels, reference=reference)
    return _Study(ev, calib, loaded, recipes, reference, baseline, notes)


def _run_candidates(runner: Runner, study: _Study, sensitivity_samples: int, max_probes: int,
                    progress: Progress) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Convert and score every recipe; when no int8 one meets the budget, retry the best
    static ONNX int8 one with its sensitive nodes in float."""
    recipes, metric = study.recipes, runner.metric
    rows = []
    for i, recipe in enumerate(recipes, 1):
        progress(f"[{i}/{len(recipes)}] {recipe.name}: converting")
        row = runner.run(recipe)
        rows.append(row)
        progress(f"[{i}/{len(recipes)}] {recipe.name}: " + _summary(row, metric))
    if runner.exporter:
        study.notes.append(f"ONNX candidates share the {runner.exporter} exporter (chosen"
                           " for the first ONNX candidate), so node names match across them")
    fallback = None
    int8_tried = any(rec.int8 for rec in recipes)
    int8_ok = any(r["status"] == "ok" and r["meets_budget"] and r["quantize"]
                  in ("dynamic", "int8") for r in rows)
    static = [(r, rec) for r, rec in zip(rows, recipes, strict=True) if rec.static_onnx
              and r["status"] == "ok"]
    if int8_tried and not int8_ok and static:
        from .sensitivity import keep_sensitive_in_float

        base_row, base_recipe = max(static, key=lambda p: p[0]["metric"])
        mixed, fallback = keep_sensitive_in_float(
            runner, base_row, base_recipe, samples=sensitivity_samples,
            max_probes=max_probes, progress=progress)
        if mixed is not None:
            rows.append(mixed)
    elif int8_tried and not int8_ok:
        study.notes.append("no int8 candidate met the budget and no static ONNX int8"
                           " candidate converted, so no nodes could be kept in float")
    return rows, fallback


def _write(candidate: Path, output: Path, result: OptimizeResult, sign_key: Any) -> None:
    """Re-package the measured candidate with the optimize record in its manifest."""
    pkg = open_package(candidate)
    members = {name: pkg.read_member(name) for name in pkg.manifest.files}
    manifest = pkg.manifest
    manifest.extra = {**manifest.extra, "optimize": {
        "chosen": result.chosen["name"], "reason": result.reason, "settings": result.settings,
        "source": result.source, "candidates": result.rows, "sensitivity": result.sensitivity,
        "notes": result.notes}}
    write_package(output, manifest, members, sign_key=sign_key)


def _summary(row: dict[str, Any], metric: str) -> str:
    if row["status"] != "ok":
        return f"failed ({row['error']})"
    verdict = "within budget" if row["meets_budget"] else "misses the budget"
    return (f"{metric} {row['metric']:.4f} ({change_text(row['drop'])}, {verdict}),"
            f" {row['size_bytes'] / 1024:.1f} KiB, {row['convert_s']:.1f} s")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0][:240]}"
