"""Outlier input channels of a matrix product kept in float, the rest quantized to int8.

Dynamic int8 quantizes a matrix product's input with one range per tensor, taken at run
time. In a transformer's feed-forward block a few hidden channels carry values 5 to 25
times the others' (MiniLM: the largest channel reached 24.5 where the median channel
reached 1.0), so that range leaves the other channels a handful of int8 steps: those
products cost most of the int8 encoder's cosine to the float one.

The split (the mixed-precision decomposition of LLM.int8(), with channels chosen once on the
calibration set): ``x @ W = (x * mask) @ W + x[..., O] @ W[O]`` where ``O`` are the outlier
channels and ``mask`` zeroes them. The first product is quantized as before, over a range
without the outliers; the second is a float product of ``len(O)`` channels (a few hundred
multiply-adds per token). It is exact in float. On MiniLM at 128 tokens it split 10 of 18
products (one to three channels each; hidden channel 99 in every layer) and took the worst
calibration cosine to the float encoder from 0.985 to 0.995, where the float fallback had
kept four whole products in float to reach 0.992 (each about five times slower than its
int8 version); the split costs about a tenth of the int8 encoder's time.

A channel is an outlier when its calibration range is ``RATIO`` times the median
channel's: at 4, MiniLM split 12 products for the same worst cosine; at 12, 8 products and
0.993.

Where the product feeds a residual ``Sum`` through its bias ``Add`` (a transformer's
feed-forward output), the float product's result is one more input of that ``Sum`` instead
of a separate ``Add``: the same sum, one node less. The first feed-forward product's
outliers are scaled away before the split (:mod:`._onnx_smooth`); what is left on MiniLM is a
few post-GELU units of the second product's input (up to 26 times the median) in four
layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.data import Dataset

__all__ = ["RATIO", "OutlierSplit", "channel_ranges", "split_outlier_channels"]

# A channel is an outlier when its calibration range is this many times the median channel's.
RATIO = 8.0
_BATCH = 16


@dataclass
class OutlierSplit:
    """The split graph, the float products it added and the channels kept in float."""

    model: bytes
    float_nodes: list[str] = field(default_factory=list)
    channels: dict[str, list[int]] = field(default_factory=dict)

    def record(self, most: int) -> dict[str, Any]:
        return {"ratio_to_median": RATIO, "max_channels": most,
                "channels": self.channels, "float_nodes": self.float_nodes}


def split_outlier_channels(model: bytes, calibration: Dataset, *, most: int) -> OutlierSplit:
    """Split every ``MatMul`` with a float weight whose input has channels
    above ``RATIO`` times the median channel's range on ``calibration``: up to ``most`` of
    them (largest first) go to a float product, the rest stays for int8."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(model)
    weights = {t.name: t for t in proto.graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2}
    targets = [n for n in proto.graph.node if n.op_type == "MatMul" and n.name
               and n.input[1] in weights]
    if most <= 0 or not targets:
        return OutlierSplit(model)
    ranges = channel_ranges(proto, [n.input[0] for n in targets], calibration)
    joins = _residual_sums(proto)
    split = OutlierSplit(model)
    nodes, added = [], []
    for node in proto.graph.node:
        amax = ranges.get(node.input[0]) if node in targets else None
        chosen = _outliers(amax, most) if amax is not None else []
        if not chosen:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        new_nodes, inits = _split_node(node, weight, chosen, joins.get(node.output[0]))
        nodes.extend(new_nodes)
        added.extend(inits)
        split.channels[node.name] = chosen
        split.float_nodes.append(f"{node.name}_outliers")
    if not split.channels:
        return split
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(added)
    split.model = bytes(proto.SerializeToString())
    return split


def _outliers(amax: np.ndarray, most: int) -> list[int]:
    """Channels above ``RATIO`` times the median range, the largest ``most`` of them."""
    median = float(np.median(amax))
    order = np.argsort(-amax)[:most]
    return sorted(int(c) for c in order if amax[c] > RATIO * max(median, 1e-12))


def _residual_sums(proto: Any) -> dict[str, Any]:
    """For each tensor that only a bias ``Add`` (initializer bias) reads, whose output only
    a ``Sum`` reads, that ``Sum``; graph outputs excluded."""
    inits = {t.name for t in proto.graph.initializer}
    outputs = {o.name for o in proto.graph.output}
    readers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    joins = {}
    for add in proto.graph.node:
        if add.op_type != "Add" or len(add.input) != 2 or add.input[1] not in inits:
            continue
        after = readers.get(add.output[0], [])
        if (len(readers.get(add.input[0], [])) == 1 and len(after) == 1
                and after[0].op_type == "Sum" and not {add.input[0], add.output[0]} & outputs):
            joins[add.input[0]] = after[0]
    return joins


def _split_node(node: Any, weight: np.ndarray, channels: list[int],
                join: Any | None) -> tuple[list[Any], list[Any]]:
    """The nodes and initializers that replace ``node`` (``x @ W``) by the masked int8-bound
    product plus the float product of ``channels``. The int8-bound product keeps the node's
    name and output, so the quantizer's names for it do not change. With ``join`` (the
    residual ``Sum`` the product's bias ``Add`` feeds), the float product becomes one more
    input of it (changed in place); else an ``Add`` sums both parts."""
    from onnx import helper, numpy_helper

    name, x, out = node.name, node.input[0], node.output[0]
    mask = np.ones(weight.shape[0], dtype=np.float32)
    mask[channels] = 0.0
    inits = [numpy_helper.from_array(np.asarray(channels, dtype=np.int64), f"{name}_outlier_idx"),
             numpy_helper.from_array(mask, f"{name}_inlier_mask"),
             numpy_helper.from_array(np.ascontiguousarray(weight[channels]),
                                     f"{name}_outlier_weight")]
    int8_out = out if join is not None else f"{name}_int8_part"
    nodes = [
        helper.make_node("Mul", [x, f"{name}_inlier_mask"], [f"{name}_inliers"],
                         name=f"{name}_mask"),
        helper.make_node("MatMul", [f"{name}_inliers", node.input[1]], [int8_out], name=name),
        helper.make_node("Gather", [x, f"{name}_outlier_idx"], [f"{name}_outlier_in"],
                         name=f"{name}_gather", axis=-1),
        helper.make_node("MatMul", [f"{name}_outlier_in", f"{name}_outlier_weight"],
                         [f"{name}_float_part"], name=f"{name}_outliers"),
    ]
    if join is not None:
        join.input.append(f"{name}_float_part")
    else:
        nodes.append(helper.make_node("Add", [int8_out, f"{name}_float_part"], [out],
                                      name=f"{name}_join"))
    return nodes, inits


def channel_ranges(proto: Any, tensors: list[str], data: Dataset) -> dict[str, np.ndarray]:
    """Largest absolute value of each last-axis channel of ``tensors`` over ``data``."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    present = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(tensors):
        if name not in present:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    wanted = list(dict.fromkeys(tensors))
    ranges: dict[str, np.ndarray] = {}
    for feeds in data.batches(_BATCH):
        outs = session.run(wanted, {k: v for k, v in feeds.items() if k in names})
        for name, value in zip(wanted, outs, strict=True):
            amax = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            ranges[name] = amax if name not in ranges else np.maximum(ranges[name], amax)
    return ranges
