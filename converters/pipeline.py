"""One conversion, end to end: load, export, quantize, validate, package.

Nothing is written until every step has passed (or, without ``strict``, been recorded);
the package is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import edgekit
from edgekit import metrics as M
from edgekit.artifact import golden_to_npz, sha256_file, write_package
from edgekit.data import Dataset, load_npz
from edgekit.errors import DataError, UsageError, ValidationError
from edgekit.manifest import Manifest, TensorSpec
from edgekit.runtimes import RuntimeOptions, Session, backend_for
from edgekit.timing import measure

from ._registry import (
    LoadedSource,
    SourceRef,
    TargetBackend,
    TargetResult,
    find_loader,
    target_backends,
)
from .calibrate import fit_calibration
from .options import ConvertOptions

__all__ = ["DEFAULT_VERSION", "ConversionResult", "convert", "default_name", "load_source",
           "make_ref", "run_batches"]

# Semantic, so that later versions (1.0.0, a rollback --to 1.2.0) order after it.
DEFAULT_VERSION = "0.1.0"

Progress = Callable[[str], None]


@dataclass
class ConversionResult:
    """The package written and the evidence gathered on the way."""

    path: Path | None
    manifest: Manifest
    report: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    # The package's members (model and golden samples), also when nothing was written.
    members: dict[str, bytes] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.report.get("parity", {}).get("passed", True))


def _quiet(_: str) -> None:
    return None


def make_ref(source: Any, *, weights: str | os.PathLike[str] | None = None) -> SourceRef:
    """Turn what the user passed (path, ``module:factory``, object) into a :class:`SourceRef`."""
    if isinstance(source, SourceRef):
        return source
    w = Path(weights) if weights else None
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if ":" in text and not Path(text).exists() and not text.startswith("/"):
            return SourceRef(factory=text, weights=w)
        p = Path(text)
        if not p.exists():
            # A file argument that does not exist is a usage error (exit 2, docs/cli.md).
            raise UsageError(f"model {p} not found",
                             hint="check the path (a .pt2, .pt, .keras, SavedModel folder or"
                                  " .onnx file, or package.module:factory)")
        return SourceRef(path=p, weights=w)
    return SourceRef(obj=source, weights=w)


def load_source(source: Any, opts: ConvertOptions, *, weights: Any = None,
                example: dict[str, np.ndarray] | None = None,
                example_source: str | None = None) -> LoadedSource:
    """Find the loader for ``source`` and load it; ``example_source`` names where the
    example came from (``"evaluation data e.npz"``) in the error when it does not fit.

    Raises:
        UsageError: the source file does not exist.
        ModelError: the source cannot be loaded.
        DataError: the example does not fit the model's declared inputs, or the model
            fails on it.
    """
    ref = make_ref(source, weights=weights)
    if example is not None:
        ref.example = example
        if example_source:
            ref.example_source = example_source
    return find_loader(ref).load(ref, opts)


def run_batches(fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                data: Dataset, batch: int = 64) -> dict[str, np.ndarray]:
    """Run a predict function over a dataset in batches; concatenate outputs by name."""
    parts: dict[str, list[np.ndarray]] = {}
    for feeds in data.batches(batch):
        for name, arr in fn(feeds).items():
            parts.setdefault(name, []).append(np.asarray(arr))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _example_from(calib: Dataset | None, evald: Dataset | None,
                  opts: ConvertOptions) -> tuple[dict[str, np.ndarray] | None, str]:
    """The example input (batch 1) and where it came from, for error messages."""
    if opts.input_shapes:
        return {
            name: np.zeros(shape, dtype=opts.input_dtypes.get(name, "float32"))
            for name, shape in opts.input_shapes.items()
        }, "the --input-shape example"
    for data, what in ((calib, "calibration data"), (evald, "evaluation data")):
        if data is not None:
            return {k: v[:1] for k, v in data.inputs.items()}, f"{what} {data.source}"
    return None, "the example input"


def _infer_task(opts: ConvertOptions, outputs: list[TensorSpec], labels: np.ndarray | None) -> str:
    if opts.task != "auto":
        return opts.task
    if labels is not None:
        if np.issubdtype(labels.dtype, np.integer):
            return "classification"
        return "regression"
    first = outputs[0]
    if len(first.shape) == 2 and isinstance(first.shape[1], int) and first.shape[1] > 1:
        return "classification"
    return "regression"


def _tool_versions(extra: dict[str, str]) -> dict[str, str]:
    tools = {"edgekit": edgekit.__version__, "python": platform.python_version(),
             "numpy": np.__version__}
    for dist in ("onnxruntime", "onnx", "torch", "tensorflow", "tensorflow-cpu", "keras",
                 "ai-edge-litert", "litert-torch", "tf2onnx"):
        try:
            tools[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    tools.update(extra)
    return tools


def convert(
    source: Any,
    opts: ConvertOptions | None = None,
    *,
    output: str | os.PathLike[str] | None,
    calibration: str | os.PathLike[str] | Dataset | None = None,
    eval_data: str | os.PathLike[str] | Dataset | None = None,
    estimate_data: str | os.PathLike[str] | Dataset | None = None,
    weights: str | os.PathLike[str] | None = None,
    sign_key: Ed25519PrivateKey | None = None,
    progress: Progress = _quiet,
    extra_manifest: dict[str, Any] | None = None,
) -> ConversionResult:
    """Convert a model into a ``.edgepkg`` (or, with ``output=None``, only measure it).

    ``source`` is a path (.pt2, TorchScript .pt, .keras, SavedModel folder, .onnx), a
    ``package.module:factory`` string, or an in-memory ``nn.Module`` / ``keras.Model``.
    Labelled ``estimate_data`` (default: ``eval_data``) fit the accuracy-estimate map.

    Raises:
        ModelError: the source cannot be loaded.
        DataError: calibration, evaluation or estimate data do not fit the model.
        ConversionError: export or quantization failed.
        ValidationError: parity is outside the tolerances and ``opts.strict`` is set.
        OutputWriteError: the package could not be written (nothing partial is left).
    """
    opts = (opts or ConvertOptions()).validate()
    backend = _backend_for(opts)
    if output is not None and not Path(output).parent.exists():
        raise UsageError(f"output folder {Path(output).parent} does not exist")
    raw_calib = _dataset(calibration)
    raw_eval = _dataset(eval_data)
    raw_estimate = _labelled(_dataset(estimate_data), "estimate data")
    progress("loading source model")
    ref = make_ref(source, weights=weights)
    if ref.example is None:
        ref.example, ref.example_source = _example_from(raw_calib, raw_eval, opts)
    loaded = find_loader(ref).load(ref, opts)
    if loaded.framework not in backend.SOURCES:
        raise UsageError(
            f"{loaded.framework} models cannot be converted to {opts.target}"
            f" (this target takes: {', '.join(sorted(backend.SOURCES))})"
        )
    warnings: list[str] = []
    calib = _fit(raw_calib, loaded.inputs, "calibration data", warnings)
    evald = _fit(raw_eval, loaded.inputs, "evaluation data", warnings)
    if opts.quantize == "int8" and calib is None:
        calib = evald
        if calib is None:
            raise DataError(
                "--quantize int8 needs calibration data",
                hint="pass --calibration calib.npz (a few hundred representative samples)",
            )

    progress(f"converting to {opts.target} ({opts.quantize})")
    result = backend.convert(loaded, opts, calib, progress)

    progress("validating the artifact")
    session = backend_for(backend.FORMAT).load(
        result.model, result.inputs, result.outputs, RuntimeOptions(threads=opts.threads))
    check = evald or calib or _random_check_data(ref)
    report, task = _validate(loaded, session, result, check, opts)
    _calibrate(report, session, _fit(raw_estimate, loaded.inputs, "estimate data", warnings)
               if task == "classification" else None, result.outputs[0].name, opts)
    report["latency"] = _latency(loaded, session, check, opts)
    golden_in = {k: v[: opts.golden_count] for k, v in check.inputs.items()}
    members = {backend.MODEL_FILE: result.model,
               "golden.npz": golden_to_npz(golden_in, session.run(golden_in))}
    report["size"] = _size_report(ref, len(result.model))
    manifest = _manifest(ref, loaded, backend, result, opts, report, task,
                         golden_count=int(next(iter(golden_in.values())).shape[0]),
                         extra=extra_manifest)
    warnings.extend(result.notes)
    _check_parity(report, opts, warnings)
    path = None
    if output is not None:
        progress("writing package")
        write_package(output, manifest, members, sign_key=sign_key)
        path = Path(output)
    return ConversionResult(path, manifest, report, warnings, members)


def _check_parity(report: dict[str, Any], opts: ConvertOptions, warnings: list[str]) -> None:
    """A failed parity check is a warning, or with ``opts.strict`` an error.

    Raises:
        ValidationError: parity failed and ``opts.strict`` is set.
    """
    if report["parity"]["passed"]:
        return
    msg = "parity check failed: " + "; ".join(report["parity"]["failures"])
    if opts.strict:
        raise ValidationError(msg, hint="loosen the tolerances or pick another --quantize mode;"
                              " nothing was written")
    warnings.append(msg)


def _backend_for(opts: ConvertOptions) -> type[TargetBackend]:
    """The target backend of ``opts``, checked to take its quantization mode.

    Raises:
        UsageError: the target is not available or does not support the mode.
    """
    backends = target_backends()
    if opts.target not in backends:
        raise UsageError(f"target {opts.target!r} is not available (have: {sorted(backends)})")
    backend = backends[opts.target]
    if opts.quantize not in backend.QUANT_MODES:
        raise UsageError(
            f"--quantize {opts.quantize} is not supported for --to {opts.target}"
            f" (supported: {', '.join(sorted(backend.QUANT_MODES))})"
        )
    return backend


def _dataset(data: str | os.PathLike[str] | Dataset | None) -> Dataset | None:
    if data is None or isinstance(data, Dataset):
        return data
    return load_npz(data)


def _random_check_data(ref: SourceRef) -> Dataset:
    """Random inputs shaped like the example, when no data was given to validate with.

    Raises:
        DataError: there is no example either.
    """
    if ref.example is None:
        raise DataError("no data to validate the artifact against",
                        hint="pass --eval or --calibration data, or --input-shape")
    rng = np.random.default_rng(0)
    return Dataset({k: _random_like(v, rng, 16) for k, v in ref.example.items()}, None,
                   "random inputs")


def _size_report(ref: SourceRef, model_bytes: int) -> dict[str, Any]:
    size: dict[str, Any] = {"artifact_model_bytes": model_bytes}
    src_size = _source_size(ref)
    if src_size:
        size["source_bytes"] = src_size
        size["ratio"] = model_bytes / src_size
    return size


def _manifest(ref: SourceRef, loaded: LoadedSource, backend: type[TargetBackend],
              result: TargetResult, opts: ConvertOptions, report: dict[str, Any], task: str,
              *, golden_count: int, extra: dict[str, Any] | None) -> Manifest:
    """The manifest: semantic version ``0.1.0`` unless one is given (the CLI derives the
    next one from the registry)."""
    return Manifest(
        name=opts.name or default_name(ref),
        version=opts.version or DEFAULT_VERSION,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        task=task,
        labels=opts.labels,
        source={
            "framework": loaded.framework,
            "reference": ref.describe(),
            "sha256": loaded.sha256,
            **loaded.framework_version(),
        },
        target={"format": backend.FORMAT, "model_file": backend.MODEL_FILE,
                "runtime": backend_for(backend.FORMAT).KEY, **result.runtime},
        inputs=result.inputs,
        outputs=result.outputs,
        recipe=result.recipe,
        tools=_tool_versions(result.tools),
        metrics=report,
        golden={"count": golden_count,
                "atol": opts.golden_atol, "rtol": opts.golden_rtol, "file": "golden.npz"},
        extra=extra or {},
    )


def _fit(data: Dataset | None, specs: list[TensorSpec], what: str,
         warnings: list[str]) -> Dataset | None:
    """``data`` checked and cast to the model's inputs; a cast from integers to floats is
    allowed (pixels stored as integers) but noted, since it is often a mistake."""
    from edgekit.data import check_inputs

    if data is None:
        return None
    inputs = check_inputs(data.inputs, specs, f"{what} {data.source}")
    if data.groups is not None and np.shape(data.groups) != (len(data),):
        raise DataError(f"{what} {data.source}: {len(data)} samples but groups of shape"
                        f" {list(np.shape(data.groups))}", hint="give one group per sample")
    for name, arr in inputs.items():
        given = data.inputs.get(name, data.inputs.get("x"))
        if given is not None and given.dtype.kind in "iub" and arr.dtype.kind == "f":
            warnings.append(f"{what} {data.source}: input '{name}' holds {given.dtype},"
                            f" cast to the model's {arr.dtype}")
    return Dataset(inputs, data.labels, data.source, data.groups)


def _random_like(arr: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    shape = (n, *arr.shape[1:])
    if np.issubdtype(arr.dtype, np.integer):
        return rng.integers(0, 100, size=shape).astype(arr.dtype)
    return rng.standard_normal(shape).astype(arr.dtype)


def _validate(loaded: LoadedSource, session: Session, result: TargetResult, data: Dataset,
              opts: ConvertOptions) -> tuple[dict[str, Any], str]:
    ref_out = run_batches(loaded.predict, data)
    art_out = run_batches(session.run, data)
    ref_names = [o.name for o in loaded.outputs]
    first_ref = ref_out[ref_names[0]] if ref_names[0] in ref_out else next(iter(ref_out.values()))
    first_art = art_out[result.outputs[0].name]
    task = _infer_task(opts, result.outputs, data.labels)
    par = M.parity(first_ref, first_art, classifier=task == "classification")
    failures = []
    quantized = opts.quantize != "none"
    if not quantized and par.max_abs_error > opts.atol:
        failures.append(f"max abs error {par.max_abs_error:.3g} > atol {opts.atol:g}")
    if par.mean_cosine < opts.min_cosine:
        failures.append(f"mean cosine {par.mean_cosine:.4f} < {opts.min_cosine:g}")
    if par.top1_agreement is not None and par.top1_agreement < opts.min_top1:
        failures.append(f"top-1 agreement {par.top1_agreement:.4f} < {opts.min_top1:g}")
    report: dict[str, Any] = {
        "parity": {**par.to_dict(), "samples": len(data), "data": data.source,
                   "passed": not failures, "failures": failures,
                   "tolerances": {"atol": None if quantized else opts.atol,
                                  "min_cosine": opts.min_cosine, "min_top1": opts.min_top1}},
    }
    if data.labels is not None and task == "classification":
        n = int(first_ref.shape[1]) if first_ref.ndim == 2 else None
        src = M.classification_report(data.labels, first_ref.argmax(axis=1), n, opts.labels)
        art = M.classification_report(data.labels, first_art.argmax(axis=1), n, opts.labels)
        report["accuracy"] = {
            "data": data.source,
            "samples": len(data),
            "source": _headline(src),
            "artifact": _headline(art),
            "drop": src.accuracy - art.accuracy,
            "f1_drop": src.f1 - art.f1,
        }
        _calibrate(report, first_art, data, result.outputs[0].name, opts)
    elif data.labels is not None and task == "regression":
        src_r = M.regression_report(data.labels, first_ref)
        art_r = M.regression_report(data.labels, first_art)
        report["regression"] = {"source": src_r.to_dict(), "artifact": art_r.to_dict()}
    return report, task


def _labelled(data: Dataset | None, what: str) -> Dataset | None:
    """``data`` as it is, after checking it has labels.

    Raises:
        DataError: it has none.
    """
    if data is not None and data.labels is None:
        raise DataError(f"{what} {data.source} have no labels",
                        hint="store the true classes under y in the .npz")
    return data


def _calibrate(report: dict[str, Any], scores: np.ndarray | Session, data: Dataset | None,
               output: str, opts: ConvertOptions) -> None:
    """Fit the accuracy-estimate map on the artifact's scores of labelled data (or on those
    a session gives for it); store it in ``report`` (replacing one fitted before) when there
    are enough of them."""
    if data is None or data.labels is None:
        return
    if not isinstance(scores, np.ndarray):
        scores = run_batches(scores.run, data)[output]
    calibration = fit_calibration(scores, data.labels, opts.estimate_method, data.groups)
    if calibration is not None:
        report["calibration"] = {**calibration.to_dict(), "data": data.source,
                                 "output": output}


def _headline(rep: M.ClassificationReport) -> dict[str, float]:
    return {"accuracy": rep.accuracy, "precision": rep.precision, "recall": rep.recall,
            "f1": rep.f1}


def _latency(loaded: LoadedSource, session: Session, data: Dataset,
             opts: ConvertOptions) -> dict[str, Any]:
    one = {k: v[:1] for k, v in data.inputs.items()}
    art = measure(lambda: session.run(one), runs=opts.latency_runs)
    src = measure(lambda: loaded.predict(one), runs=opts.latency_runs)
    return {"batch": 1, "threads": opts.threads, "artifact": art.to_dict(),
            "source": src.to_dict(), "ratio_p50": art.p50_ms / src.p50_ms if src.p50_ms else None}


def default_name(ref: SourceRef) -> str:
    """The name a model gets without --name: the file stem, or the factory's name."""
    if ref.path is not None:
        return ref.path.stem if ref.path.is_file() else ref.path.name
    if ref.factory is not None:
        return ref.factory.rsplit(":", 1)[-1]
    return type(ref.obj).__name__.lower()


def _source_size(ref: SourceRef) -> int | None:
    if ref.path is None:
        return None
    if ref.path.is_file():
        return ref.path.stat().st_size
    return sum(p.stat().st_size for p in ref.path.rglob("*") if p.is_file()) or None


def source_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, sorted)."""
    if path.is_file():
        return sha256_file(path)
    import hashlib

    digest = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        digest.update(str(p.relative_to(path)).encode())
        digest.update(sha256_file(p).encode())
    return digest.hexdigest()
