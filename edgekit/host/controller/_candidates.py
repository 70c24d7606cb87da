"""Candidate models for the maintenance policy: judge them on field data, or retrain one.

:func:`score_package` runs a package in its real runtime on labelled samples.
:func:`registered_candidates` lists registered models that can replace the current one.
:func:`retrain` runs the configured command on the recent samples and converts what it
writes with the running artifact's recipe (:func:`options_from_manifest`).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.artifact import open_package
from edgekit.data import Dataset, save_npz
from edgekit.errors import DataError, EdgekitError, ModelError
from edgekit.evaluation import evaluate_outputs
from edgekit.host.db import ModelRecord
from edgekit.host.registry import Registry
from edgekit.manifest import compare_versions, parse_version
from edgekit.runtimes import load_session

__all__ = [
    "RetrainResult",
    "Score",
    "next_version",
    "options_from_manifest",
    "registered_candidates",
    "retrain",
    "score_package",
    "split_holdout",
]

log = logging.getLogger("edgekit.controller.policy")

_BATCH = 256
_LOG_TAIL = 2000


@dataclass(frozen=True)
class Score:
    """A model's accuracy and macro F1 on a set of labelled samples."""

    ref: str
    accuracy: float
    f1: float
    samples: int

    def metric(self, name: str) -> float:
        # Candidates are judged on labelled samples: an estimated metric is judged as the
        # labelled one it estimates.
        return self.f1 if name == "f1" else self.accuracy

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.ref, "accuracy": self.accuracy, "f1": self.f1,
                "samples": self.samples}


def split_holdout(data: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split into (train, held-out) at random, held-out taking ``fraction`` (at least 1)."""
    n = len(data)
    order = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, int(round(n * fraction))))
    held, train = np.sort(order[:k]), np.sort(order[k:])
    assert data.labels is not None

    def pick(idx: np.ndarray, what: str) -> Dataset:
        return Dataset({name: v[idx] for name, v in data.inputs.items()},
                       data.labels[idx] if data.labels is not None else None,
                       f"{data.source}, {what}")

    return pick(train, "training part"), pick(held, "held-out part")


def score_package(path: str | os.PathLike[str], data: Dataset, ref: str | None = None) -> Score:
    """Run the package on ``data`` and score its predictions against the labels.

    Raises:
        ArtifactError: the package cannot be read.
        RuntimeBackendError: no runtime for its format, or the model fails to run.
        InputError / DataError: the samples do not fit the model's inputs or outputs.
    """
    pkg = open_package(path)
    manifest = pkg.manifest
    session = load_session(manifest, pkg.model_bytes())
    primary = manifest.outputs[0].name
    outputs = [session.run(batch)[primary] for batch in data.batches(_BATCH)]
    stacked = np.concatenate(outputs)
    num_classes = len(manifest.labels) if manifest.labels else None
    report = evaluate_outputs(stacked, data.labels, task="classification",
                              num_classes=num_classes)
    head = report.headline()
    return Score(ref or f"{manifest.name}:{manifest.version}", float(head["accuracy"]),
                 float(head["f1"]), len(data))


def _io_layout(manifest: dict[str, Any]) -> tuple[Any, ...]:
    def specs(key: str) -> tuple[Any, ...]:
        return tuple((s.get("name"), s.get("dtype"), tuple(map(str, s.get("shape", []))))
                     for s in manifest.get(key, []))

    labels = manifest.get("labels")
    return specs("inputs"), specs("outputs")[:1], len(labels) if labels else None


def registered_candidates(registry: Registry, current: ModelRecord) -> list[ModelRecord]:
    """Registered versions of the current model's name, newer than it, with the same task,
    inputs, primary output and classes (devices accept only a newer version)."""
    layout = _io_layout(current.manifest)
    return [m for m in registry.list_models(current.name)
            if compare_versions(m.version, current.version) > 0 and m.task == current.task
            and _io_layout(m.manifest) == layout]


def next_version(registry: Registry, name: str) -> str:
    """One more than the highest registered version of ``name`` in its last component."""
    versions = [m.version for m in registry.list_models(name)]
    if not versions:
        return "1.0.0"
    top = list(parse_version(max(versions, key=parse_version)))
    top[-1] += 1
    return ".".join(str(p) for p in top)


def options_from_manifest(manifest: dict[str, Any], *, name: str, version: str) -> Any:
    """The :class:`converters.ConvertOptions` that reproduce a package's conversion: its
    target format, quantization mode and settings from the recipe, its task, labels, golden
    tolerances and the method of its accuracy-estimate map.

    Raises:
        UsageError: the recipe holds a value the converter refuses.
    """
    from converters import ConvertOptions
    from converters.options import CALIBRATION_METHODS, ESTIMATE_METHODS, QUANT_MODES

    recipe = manifest.get("recipe") or {}
    target = (manifest.get("target") or {}).get("format", "onnx")
    options: dict[str, Any] = {"target": target, "name": name, "version": version,
                               "task": manifest.get("task") or "auto",
                               "labels": manifest.get("labels")}
    quantize = recipe.get("quantize")
    if quantize in QUANT_MODES:
        options["quantize"] = quantize
    if isinstance(recipe.get("per_channel"), bool):
        options["per_channel"] = recipe["per_channel"]
    method = recipe.get("calibration_method")
    if method is None and isinstance(recipe.get("calibration"), dict):
        method = recipe["calibration"].get("method")
    if method in CALIBRATION_METHODS:
        options["calibration_method"] = method
    if isinstance(recipe.get("nodes_to_exclude"), list):
        options["nodes_to_exclude"] = [str(n) for n in recipe["nodes_to_exclude"]]
    if target == "onnx" and isinstance(recipe.get("opset"), int) and recipe["opset"] >= 17:
        options["opset"] = recipe["opset"]
    if target == "tflite" and recipe.get("int8_io") is True:
        options["int8_io"] = True
    estimate = (manifest.get("metrics") or {}).get("calibration")
    if isinstance(estimate, dict) and estimate.get("method") in ESTIMATE_METHODS:
        options["estimate_method"] = estimate["method"]
    golden = manifest.get("golden") or {}
    for key, option in (("atol", "golden_atol"), ("rtol", "golden_rtol")):
        if isinstance(golden.get(key), int | float):
            options[option] = float(golden[key])
    return ConvertOptions(**options).validate()


@dataclass(frozen=True)
class RetrainResult:
    """The package a retraining produced and what it took."""

    package: Path
    name: str
    version: str
    converted: bool  # False when the command wrote an .edgepkg itself
    log: str


def retrain(command: str, *, current: ModelRecord, current_path: Path, train: Dataset,
            holdout: Dataset, workdir: Path, output_name: str, version: str,
            timeout_s: float, sign_key: Any = None) -> RetrainResult:
    """Run the retrain command on ``train`` and turn its output into a package.

    The command's placeholders are filled with shell-quoted paths: ``{data}`` (an .npz of
    the training part, inputs by name and labels under ``y``), ``{model}`` (the current
    package), ``{output}`` (the file to write) and ``{workdir}``. A source model is converted
    with the current package's recipe, calibrated on ``train`` and evaluated on ``holdout``.

    Raises:
        ModelError: the command failed, timed out, or wrote nothing.
        ConversionError / ValidationError / DataError: the conversion failed.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    data_path = workdir / "train.npz"
    assert train.labels is not None
    save_npz(data_path, train.inputs, train.labels)
    output = workdir / output_name
    output.unlink(missing_ok=True)
    values = {"data": data_path, "model": current_path, "output": output, "workdir": workdir}
    line = command.format(**{k: shlex.quote(str(v)) for k, v in values.items()})
    env = {**os.environ, "EDGEKIT_RETRAIN_DATA": str(data_path),
           "EDGEKIT_RETRAIN_MODEL": str(current_path), "EDGEKIT_RETRAIN_OUTPUT": str(output),
           "EDGEKIT_RETRAIN_WORKDIR": str(workdir)}
    log.info("retraining: %s", line)
    try:
        done = subprocess.run(shlex.split(line), cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ModelError(f"the retrain command ran longer than {timeout_s:g} s",
                         hint="raise policy.retrain_timeout_s or make training faster") from exc
    except OSError as exc:
        raise ModelError(f"the retrain command could not start: {exc}",
                         hint="check policy.retrain_command") from exc
    text = (done.stdout + done.stderr)[-_LOG_TAIL:]
    (workdir / "retrain.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise ModelError(f"the retrain command exited with {done.returncode}: "
                         f"{text.strip().splitlines()[-1] if text.strip() else 'no output'}",
                         hint=f"see {workdir / 'retrain.log'}")
    if not output.exists():
        raise ModelError(f"the retrain command wrote no {output.name}",
                         hint="it must write the file given as {output}")
    if output.suffix == ".edgepkg":
        manifest = open_package(output).manifest
        return RetrainResult(output, manifest.name, manifest.version, False, text)
    from converters import convert

    opts = options_from_manifest(current.manifest, name=current.name, version=version)
    package = workdir / f"{current.name}-{version}.edgepkg"
    try:
        convert(output, opts, output=package, calibration=train, eval_data=holdout,
                sign_key=sign_key)
    except EdgekitError:
        raise
    except Exception as exc:  # a framework failing inside the converter
        raise DataError(f"converting the retrained model failed: {exc}") from exc
    return RetrainResult(package, current.name, version, True, text)

