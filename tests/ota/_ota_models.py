"""Test models for the OTA tests, built with onnx.helper and packaged like the converter does
(manifest, golden samples computed by onnxruntime, Ed25519 signature).

Every model takes ``x [batch, 64] float32`` and gives ``probs [batch, 10]`` (softmax), unless
it is the incompatible one. Variants:

- ``classifier``: a random linear layer; ``padding`` adds an incompressible member so the
  package spans many chunks.
- ``nan``: ``Log(x)`` first. Golden inputs are positive, so staging passes; inputs at or
  below zero (what the test clients send) give NaN or infinity, so probation catches it.
- ``slow``: 60 chained 1024x1024 MatMuls (one shared weight, Tanh between), about 120 MFLOP
  a sample: orders of magnitude over the latency budget the test sets.
- ``wide``: takes ``x [batch, 32]``: an incompatible interface.
- ``broken``: the model file is not ONNX, the package is otherwise fine: the runtime cannot
  load it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.artifact import golden_to_npz, write_package
from edgekit.manifest import Manifest, TensorSpec

__all__ = ["build_package", "client_batch"]


def _graph(kind: str, seed: int, features: int) -> bytes:
    rng = np.random.default_rng(seed)
    inits = [] if kind == "slow" else [
        numpy_helper.from_array((rng.normal(size=(features, 10)) * 0.3).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=10).astype(np.float32), "B")]
    nodes = []
    source = "x"
    if kind == "nan":
        nodes.append(helper.make_node("Log", ["x"], ["logx"]))
        source = "logx"
    if kind == "slow":
        for name, shape, scale in (("In", (features, 1024), 8), ("H", (1024, 1024), 32),
                                   ("Out", (1024, 10), 32)):
            weights = (rng.normal(size=shape) / scale).astype(np.float32)
            inits.append(numpy_helper.from_array(weights, name))
        nodes.append(helper.make_node("MatMul", ["x", "In"], ["h0"]))
        for i in range(60):
            nodes.append(helper.make_node("MatMul", [f"h{i}", "H"], [f"m{i}"]))
            nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
        nodes.append(helper.make_node("MatMul", ["h60", "Out"], ["logits"]))
    else:
        nodes += [helper.make_node("MatMul", [source, "W"], ["mm"]),
                  helper.make_node("Add", ["mm", "B"], ["logits"])]
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes, f"ota-{kind}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def build_package(path: Path, *, version: str, kind: str = "classifier", seed: int = 0,
                  sign_key: Any = None, padding: int = 0, name: str = "ota-model",
                  breaking: bool = False) -> Path:
    """Write one package; see the module docstring for ``kind``. ``breaking`` declares an
    interface change in the manifest (``extra.breaking``)."""
    import onnxruntime as ort

    features = 32 if kind == "wide" else 64
    model = _graph("classifier" if kind == "broken" else kind, seed, features)
    rng = np.random.default_rng(1000 + seed)
    golden_x = rng.uniform(1.0, 2.0, size=(4, features)).astype(np.float32)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    golden_y = session.run(["probs"], {"x": golden_x})[0]
    if kind == "broken":
        model = b"this is not an onnx model" * 10
    manifest = Manifest(
        name=name, version=version, created="2026-01-01T00:00:00+00:00",
        task="classification", source={"framework": "onnx", "sha256": None},
        target={"format": "onnx", "model_file": "model.onnx", "runtime": "onnxruntime"},
        inputs=[TensorSpec("x", "float32", ["batch", features])],
        outputs=[TensorSpec("probs", "float32", ["batch", 10])],
        recipe={"quantize": "none"}, tools={"edgekit": "test"},
        golden={"atol": 1e-4, "rtol": 1e-3, "samples": 4},
        labels=[str(i) for i in range(10)],
        extra={"breaking": True} if breaking else {},
    )
    members = {"model.onnx": model, "golden.npz": golden_to_npz({"x": golden_x},
                                                                 {"probs": golden_y})}
    if padding:
        members["padding.bin"] = os.urandom(padding)
    write_package(path, manifest, members, sign_key=sign_key)
    return path


def client_batch(rng: np.random.Generator, rows: int = 2) -> list[list[float]]:
    """What the test clients send: values in [-1, 1], so a ``Log`` model meets zeros and
    negatives."""
    return rng.uniform(-1.0, 1.0, size=(rows, 64)).astype(np.float32).round(3).tolist()
