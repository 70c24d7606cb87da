"""Tiny digits classifiers as .edgepkg files, made without the converter.

A ridge classifier (closed form, numpy) on scikit-learn's bundled digits, written as an
ONNX graph with onnx.helper: ``x [batch, 64] float32 -> probs [batch, 10]`` (softmax). An
int8-input variant takes quantized pixels through DequantizeLinear, as an int8 I/O model
from the converter does. Packages carry golden samples like the converter's.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.artifact import golden_to_npz, write_package
from edgekit.manifest import Manifest, QuantParams, TensorSpec

LABELS = [f"digit-{i}" for i in range(10)]
INT8_QUANT = QuantParams(scale=16.0 / 255.0, zero_point=-128)


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data.astype(np.float32), data.target.astype(np.int64)


def ridge_weights(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Least squares onto one-hot targets; the logits are scaled so softmax is confident."""
    xb = np.hstack([x / 16.0, np.ones((len(x), 1), np.float32)]).astype(np.float64)
    onehot = np.eye(10)[y]
    w = np.linalg.solve(xb.T @ xb + alpha * np.eye(xb.shape[1]), xb.T @ onehot) * 12.0
    return (w[:-1] / 16.0).astype(np.float32), w[-1].astype(np.float32)


def onnx_classifier(weights: np.ndarray, bias: np.ndarray, int8_input: bool = False) -> bytes:
    nodes = []
    inits = [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")]
    source = "x"
    in_type = TensorProto.INT8 if int8_input else TensorProto.FLOAT
    if int8_input:
        inits += [numpy_helper.from_array(np.array(INT8_QUANT.scale, np.float32), "qs"),
                  numpy_helper.from_array(np.array(INT8_QUANT.zero_point, np.int8), "qz")]
        nodes.append(helper.make_node("DequantizeLinear", ["x", "qs", "qz"], ["xf"]))
        source = "xf"
    nodes += [
        helper.make_node("MatMul", [source, "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "digits",
        [helper.make_tensor_value_info("x", in_type, ["batch", 64])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def reference_outputs(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["probs"], feeds)[0])


def write_digits_package(path: Path, *, version: str, alpha: float = 1.0, int8: bool = False,
                         sign_key: object = None, name: str = "digits",
                         data: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    x, y = data if data is not None else digits_data()
    w, b = ridge_weights(x[:1200], y[:1200], alpha)
    model = onnx_classifier(w, b, int8_input=int8)
    golden_x = x[1200:1208]
    feed = golden_x
    if int8:
        q = np.clip(np.round(golden_x / INT8_QUANT.scale + INT8_QUANT.zero_point), -128, 127)
        feed = q.astype(np.int8)
    golden_y = reference_outputs(model, {"x": feed})
    manifest = Manifest(
        name=name,
        version=version,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        task="classification",
        source={"framework": "numpy", "reference": "ridge on sklearn digits"},
        target={"format": "onnx", "model_file": "model.onnx", "runtime": "onnxruntime"},
        inputs=[TensorSpec("x", "int8" if int8 else "float32", ["batch", 64],
                           INT8_QUANT if int8 else None)],
        outputs=[TensorSpec("probs", "float32", ["batch", 10])],
        recipe={"quantize": "int8-io" if int8 else "none"},
        tools={"onnx": onnx.__version__},
        golden={"count": 8, "atol": 1e-5, "rtol": 1e-4, "file": "golden.npz"},
        labels=LABELS,
    )
    write_package(path, manifest,
                  {"model.onnx": model, "golden.npz": golden_to_npz({"x": feed}, {"probs": golden_y})},
                  sign_key=sign_key)  # type: ignore[arg-type]
    return path
