"""SmoothQuant-style scaling (``converters.targets._onnx_smooth``) on a small real graph run
by onnxruntime: layer normalization -> matrix product + bias -> residual sum with the
normalization's output, the shape of a transformer's feed-forward block."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from converters.targets._onnx_outliers import RATIO, channel_ranges
from converters.targets._onnx_smooth import DEFAULT_ALPHA, smooth_products
from edgekit.data import Dataset

HIDDEN, SEQ, OUTLIER = 32, 16, 5


def _block(gamma: np.ndarray, rng: np.random.Generator) -> onnx.ModelProto:
    """``y = LayerNorm(x) @ W + b + LayerNorm(x)``; the normalization's output is also a
    graph output, so the test can read the product's input."""
    weight = (rng.standard_normal((HIDDEN, HIDDEN)) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(gamma.astype(np.float32), "gamma"),
             numpy_helper.from_array((rng.standard_normal(HIDDEN) * 0.1).astype(np.float32),
                                     "beta"),
             numpy_helper.from_array(weight, "w"),
             numpy_helper.from_array((rng.standard_normal(HIDDEN) * 0.1).astype(np.float32),
                                     "b")]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="norm",
                         axis=-1, epsilon=1e-12),
        helper.make_node("MatMul", ["ln", "w"], ["h"], name="dense/MatMul"),
        helper.make_node("Add", ["h", "b"], ["hb"], name="dense/bias"),
        helper.make_node("Sum", ["hb", "ln"], ["y"], name="residual"),
    ]
    value = [None, SEQ, HIDDEN]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, value)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, value)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def _data(rng: np.random.Generator, count: int = 24) -> Dataset:
    return Dataset({"x": rng.standard_normal((count, SEQ, HIDDEN)).astype(np.float32)}, None,
                   "synthetic")


def test_smoothing_keeps_outputs_and_evens_the_product_input() -> None:
    rng = np.random.default_rng(0)
    gamma = np.ones(HIDDEN)
    gamma[OUTLIER] = 50.0  # one channel of the normalization's output 50x the others
    raw = _block(gamma, rng).SerializeToString()
    data = _data(rng)
    before = channel_ranges(onnx.load_from_string(raw), ["ln"], data)["ln"]
    assert before.max() > 40 * np.median(before)

    smoothed = smooth_products(raw, data, alpha=DEFAULT_ALPHA)

    assert list(smoothed.products) == ["dense/MatMul"]
    proto = onnx.load_from_string(smoothed.model)
    onnx.checker.check_model(proto)
    product = next(n for n in proto.graph.node if n.name == "dense/MatMul")
    residual = next(n for n in proto.graph.node if n.name == "residual")
    # The product reads the scaled output; the residual sum reads the unscaled one.
    assert product.input[0] == "ln_smoothed"
    assert residual.input[1] == "ln"
    x = data.inputs["x"][:8]
    np.testing.assert_allclose(_run(smoothed.model, x), _run(raw, x), rtol=1e-4, atol=1e-4)
    after = channel_ranges(proto, ["ln_smoothed"], data)["ln_smoothed"]
    assert after.max() < 5 * np.median(after)
    assert after.max() < 5 * after.min()
    assert smoothed.products["dense/MatMul"]["after"] < RATIO


def test_even_inputs_are_left_untouched() -> None:
    rng = np.random.default_rng(1)
    raw = _block(np.ones(HIDDEN), rng).SerializeToString()
    data = _data(rng)
    smoothed = smooth_products(raw, data, alpha=DEFAULT_ALPHA)
    assert smoothed.products == {}
    assert smoothed.model == raw
    gamma = np.ones(HIDDEN)
    gamma[OUTLIER] = 50.0
    uneven = _block(gamma, rng).SerializeToString()
    assert smooth_products(uneven, data, alpha=0.0).model == uneven
