"""Small builders for core tests: a manifest and a package around arbitrary model bytes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.artifact import golden_to_npz, write_package
from edgekit.manifest import Manifest, TensorSpec


def make_manifest(name: str = "tiny", version: str = "1.0.0") -> Manifest:
    return Manifest(
        name=name,
        version=version,
        created="2026-01-01T00:00:00+00:00",
        task="classification",
        source={"framework": "onnx", "sha256": None},
        target={"format": "onnx", "model_file": "model.onnx", "runtime": "onnxruntime"},
        inputs=[TensorSpec("x", "float32", ["batch", 4])],
        outputs=[TensorSpec("y", "float32", ["batch", 3])],
        recipe={"quantize": "none"},
        tools={"edgekit": "test"},
    )


def make_package(path: Path, model: bytes = b"model-bytes", **kwargs: object) -> Path:
    golden = golden_to_npz({"x": np.zeros((2, 4), np.float32)}, {"y": np.ones((2, 3), np.float32)})
    write_package(path, make_manifest(), {"model.onnx": model, "golden.npz": golden}, **kwargs)  # type: ignore[arg-type]
    return path


def digits_retrain_packages(folder: Path, key: Any) -> dict[str, Path]:
    """The digits CNN packages of benchmarks/_digits_retrain.py (a base, a last-layer retrain,
    a full retrain), signed by ``key``: the pairs the delta benchmark measures."""
    spec = importlib.util.spec_from_file_location(
        "_digits_retrain", Path(__file__).resolve().parents[1] / "benchmarks" / "_digits_retrain.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    packages: dict[str, Path] = module.digits_packages(folder, key)
    return packages
