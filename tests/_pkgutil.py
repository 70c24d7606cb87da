"""Small builders for core tests: a manifest and a package around arbitrary model bytes."""

from __future__ import annotations

from pathlib import Path

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
