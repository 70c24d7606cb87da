"""The graph rewrites around dynamic int8 of a fused transformer, on small real graphs run by
onnxruntime: the CPU rewrites (attention mask filter, skip layer normalization written back
as add + layer normalization) compute what the fused nodes did, and the outlier split is
exact in float and brings the int8 product closer to the float one."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from converters.targets._onnx_outliers import split_outlier_channels
from converters.targets._onnx_quant import quantize_dynamic_int8
from converters.targets._onnx_transformer import MASK_FILTER_VALUE, cpu_rewrites
from edgekit.data import Dataset

HIDDEN, HEADS, SEQ = 32, 4, 16


def _run(model: onnx.ModelProto | bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def _fused_block(rng: np.random.Generator) -> onnx.ModelProto:
    """Attention (with a key-length mask) then SkipLayerNormalization with a bias."""
    def init(name: str, *shape: int, scale: float = 0.2) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32),
                                       name)

    nodes = [
        helper.make_node("Attention", ["x", "qkv_w", "qkv_b", "lengths"], ["ctx"],
                         domain="com.microsoft", num_heads=HEADS, name="Attention_0"),
        helper.make_node("SkipLayerNormalization", ["ctx", "x", "gamma", "beta", "bias"], ["y"],
                         domain="com.microsoft", epsilon=1e-12, name="SkipLayerNorm_0"),
    ]
    graph = helper.make_graph(
        nodes, "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, HIDDEN]),
         helper.make_tensor_value_info("lengths", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, HIDDEN])],
        [init("qkv_w", HIDDEN, 3 * HIDDEN), init("qkv_b", 3 * HIDDEN),
         init("gamma", HIDDEN, scale=1.0), init("beta", HIDDEN), init("bias", HIDDEN)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def test_cpu_rewrites_compute_what_the_fused_nodes_did() -> None:
    rng = np.random.default_rng(0)
    model = _fused_block(rng)
    feeds = {"x": rng.standard_normal((1, SEQ, HIDDEN)).astype(np.float32),
             "lengths": np.array([5], dtype=np.int32)}
    before = _run(model, feeds)
    record = cpu_rewrites(model)
    assert record == {"mask_filter_value": MASK_FILTER_VALUE, "attention_masks_set": 1,
                      "skip_layer_norms_unfused": 1}
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Attention", "Add", "Sum", "LayerNormalization"]
    attention = model.graph.node[0]
    assert [helper.get_attribute_value(a) for a in attention.attribute
            if a.name == "mask_filter_value"] == [MASK_FILTER_VALUE]
    onnx.checker.check_model(model)
    np.testing.assert_allclose(_run(model, feeds), before, atol=1e-5)


def _product(rng: np.random.Generator) -> tuple[onnx.ModelProto, Dataset]:
    """One MatMul whose input has two channels 20x the others' range."""
    weight = (rng.standard_normal((HIDDEN, 8)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="dense/MatMul")], "product",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, SEQ, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, SEQ, 8])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((24, SEQ, HIDDEN)).astype(np.float32)
    x[..., [3, 17]] *= 20.0
    return model, Dataset({"x": x}, None, "synthetic")


def test_outlier_split_is_exact_in_float_and_closer_in_int8() -> None:
    rng = np.random.default_rng(1)
    model, data = _product(rng)
    raw = model.SerializeToString()
    split = split_outlier_channels(raw, data, most=4)
    assert split.channels == {"dense/MatMul": [3, 17]}
    assert split.float_nodes == ["dense/MatMul_outliers"]
    feeds = {"x": data.inputs["x"][:8]}
    reference = _run(raw, feeds)
    np.testing.assert_allclose(_run(split.model, feeds), reference, atol=1e-4)
    plain = _run(quantize_dynamic_int8(raw, per_channel=True, nodes_to_exclude=[]), feeds)
    mixed = _run(quantize_dynamic_int8(split.model, per_channel=True,
                                       nodes_to_exclude=split.float_nodes), feeds)
    assert np.abs(mixed - reference).mean() < 0.5 * np.abs(plain - reference).mean()


def test_outlier_split_leaves_products_without_outliers() -> None:
    rng = np.random.default_rng(2)
    model, data = _product(rng)
    even = Dataset({"x": rng.standard_normal((8, SEQ, HIDDEN)).astype(np.float32)}, None, "even")
    raw = model.SerializeToString()
    assert split_outlier_channels(raw, even, most=4).channels == {}
    assert split_outlier_channels(raw, data, most=0).model == raw
    assert split_outlier_channels(raw, data, most=1).channels["dense/MatMul"] in ([3], [17])


def test_outlier_split_before_a_residual_sum_joins_it() -> None:
    """A product read by a bias ``Add`` then a residual ``Sum``: the float part becomes one
    more input of the ``Sum``, no join node."""
    rng = np.random.default_rng(3)
    model, data = _product(rng)
    model.graph.node.extend([
        helper.make_node("Add", ["y", "bias"], ["yb"], name="dense/bias"),
        helper.make_node("Sum", ["yb", "skip"], ["out"], name="residual")])
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bias"),
        numpy_helper.from_array(rng.standard_normal((SEQ, 8)).astype(np.float32), "skip")])
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                            [None, SEQ, 8]))
    raw = model.SerializeToString()
    split = split_outlier_channels(raw, data, most=4)
    assert split.channels == {"dense/MatMul": [3, 17]}
    proto = onnx.load_from_string(split.model)
    onnx.checker.check_model(proto)
    residual = next(n for n in proto.graph.node if n.name == "residual")
    assert list(residual.input) == ["yb", "skip", "dense/MatMul_float_part"]
    assert not [n for n in proto.graph.node if n.name.endswith("_join")]
    feeds = {"x": data.inputs["x"][:8]}
    np.testing.assert_allclose(_run(split.model, feeds), _run(raw, feeds), atol=1e-4)
