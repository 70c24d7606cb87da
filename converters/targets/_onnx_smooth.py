"""SmoothQuant-style scaling of the matrix products that follow a layer normalization.

Dynamic int8 quantizes a matrix product's input with one range per tensor. In MiniLM the
feed-forward block's first product reads the attention block's layer normalization, whose
hidden channel 99 reaches 17 to 20 times the median channel's range in every layer: that
range leaves the other channels a handful of int8 steps.

The scaling (SmoothQuant, Xiao et al. 2023) moves part of the spread from the activation to
the weight, where int8 per channel absorbs it: ``x @ W = (x / s) @ (s * W)`` with, per input
channel ``j``, ``s_j = max|x_j| ** alpha / max|W_j| ** (1 - alpha)`` (ranges on the
calibration set, ``W_j`` the weight's row ``j``). ``1 / s`` is folded into the layer
normalization's gamma and beta, so the product reads the scaled output at no cost; the
normalization's other readers (the residual ``Sum``) get the unscaled value back through one
``Mul`` by ``s``, so the residual stream is exactly what it was. The graph computes the same
function in float, up to rounding.

Only inputs whose largest channel range is ``RATIO`` times the median channel's are scaled
(the threshold of :mod:`._onnx_outliers`), so graphs with even ranges are left untouched.
On MiniLM at 128 tokens, alpha 0.65 took those six products' largest-to-median ratio from
12-20 to 2-4, below the outlier split's threshold, so their float products (five nodes each)
are no longer needed: the corrections' nodes went from 9% of the int8 encoder's kernel time
to 3% (onnxruntime profiling, one thread), and the worst held-out cosine to PyTorch rose
from 0.9927 to 0.9948.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.data import Dataset

from ._onnx_outliers import RATIO, channel_ranges

__all__ = ["DEFAULT_ALPHA", "Smoothing", "smooth_products"]

DEFAULT_ALPHA = 0.65


@dataclass
class Smoothing:
    """The scaled graph and, per scaled product, its input's largest channel range over the
    median channel's, before and after."""

    model: bytes
    alpha: float
    products: dict[str, dict[str, float]] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "ratio_to_median": RATIO, "products": self.products}


@dataclass
class _Site:
    """A layer normalization whose output some float-weight ``MatMul`` nodes read."""

    norm: Any
    products: list[Any]
    others: bool  # other nodes or the graph's outputs read it too


def smooth_products(model: bytes, calibration: Dataset, *, alpha: float) -> Smoothing:
    """Scale the input channels of each ``MatMul`` that reads a ``LayerNormalization``
    (gamma and beta initializers of its own, weights of their own) when the largest channel
    range on ``calibration`` is above ``RATIO`` times the median; ``alpha`` in (0, 1) is the
    share of the spread moved to the weights. ``alpha`` 0 returns the model unchanged."""
    import onnx

    result = Smoothing(model, alpha)
    if alpha <= 0:
        return result
    proto = onnx.load_from_string(model)
    sites = _sites(proto)
    if not sites:
        return result
    ranges = channel_ranges(proto, [s.norm.output[0] for s in sites], calibration)
    inits = {t.name: t for t in proto.graph.initializer}
    added = []
    for site in sites:
        amax = ranges[site.norm.output[0]]
        median = max(float(np.median(amax)), 1e-12)
        if float(amax.max()) <= RATIO * median:
            continue
        scale = _scale(amax, [_array(inits[p.input[1]]) for p in site.products], alpha)
        unscale = _apply(proto, site, scale, inits)
        if unscale is not None:
            added.append(unscale)
        after = amax / scale
        for product in site.products:
            result.products[product.name] = {
                "before": round(float(amax.max()) / median, 2),
                "after": round(float(after.max()) / max(float(np.median(after)), 1e-12), 2)}
    if not result.products:
        return result
    nodes = []
    for node in proto.graph.node:
        nodes.append(node)
        nodes.extend(m for m in added if m.input[0] == node.output[0])
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    result.model = bytes(proto.SerializeToString())
    return result


def _sites(proto: Any) -> list[_Site]:
    """Layer normalizations whose gamma and beta, and whose reading products' weights, are
    initializers no other node uses (so scaling them in place changes nothing else)."""
    import onnx

    inits = {t.name: t for t in proto.graph.initializer}
    uses: dict[str, int] = {}
    readers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in proto.graph.output}

    def own(name: str) -> bool:
        return name in inits and uses.get(name, 0) == 1 and name not in outputs

    sites = []
    for node in proto.graph.node:
        if node.op_type != "LayerNormalization" or len(node.input) < 3:
            continue
        if not (own(node.input[1]) and own(node.input[2])):
            continue
        products = [r for r in readers.get(node.output[0], [])
                    if r.op_type == "MatMul" and r.input[0] == node.output[0]
                    and own(r.input[1]) and len(inits[r.input[1]].dims) == 2
                    and inits[r.input[1]].data_type == onnx.TensorProto.FLOAT]
        if products:
            others = (node.output[0] in outputs
                      or len(readers[node.output[0]]) > len(products))
            sites.append(_Site(node, products, others))
    return sites


def _scale(amax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """``s_j = max|x_j| ** alpha / max|W_j| ** (1 - alpha)`` over every product's rows;
    1 where a channel or a row is all zeros."""
    wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    live = (amax > 0) & (wmax > 0)
    scale = np.ones_like(amax, dtype=np.float64)
    scale[live] = amax[live] ** alpha / wmax[live] ** (1.0 - alpha)
    return scale.astype(np.float32)


def _apply(proto: Any, site: _Site, scale: np.ndarray, inits: dict[str, Any]) -> Any | None:
    """Fold ``1 / scale`` into the normalization and ``scale`` into the products' weight
    rows; the normalization's other readers get a ``Mul`` that undoes the scaling, which is
    returned (None when nothing else reads it)."""
    from onnx import helper, numpy_helper

    norm = site.norm
    out = norm.output[0]
    for name in (norm.input[1], norm.input[2]):
        inits[name].CopyFrom(numpy_helper.from_array(_array(inits[name]) / scale, name))
    for product in site.products:
        name = product.input[1]
        inits[name].CopyFrom(numpy_helper.from_array(
            _array(inits[name]) * scale[:, None], name))
        product.input[0] = f"{out}_smoothed"
    norm.output[0] = f"{out}_smoothed"
    if not site.others:
        return None
    scale_name = f"{norm.name or out}_smooth_scale"
    proto.graph.initializer.append(numpy_helper.from_array(scale, scale_name))
    return helper.make_node("Mul", [f"{out}_smoothed", scale_name], [out],
                            name=f"{norm.name or out}_unsmooth")


def _array(tensor: Any) -> np.ndarray:
    from onnx import numpy_helper

    return np.asarray(numpy_helper.to_array(tensor), dtype=np.float32)
