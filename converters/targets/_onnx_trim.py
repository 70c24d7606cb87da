"""Trailing padding trimmed inside the graph of a model with an ``attention_mask`` input.

A text encoder is fed sentences padded to a fixed length (128 tokens for the MiniLM
example, whose sentences have 6 to 15): every layer then computes all 128 positions, and
the padded ones are thrown away by the mask. The rewrite puts a few nodes before the
graph: the last position any row of the mask keeps (at least 1) is found, and every input
of the mask's shape (``input_ids``, ``token_type_ids``, the mask itself) is cut there with
``Slice``. The rest of the graph sees a shorter sequence.

That is exact where the graph's outputs have no sequence axis and the mask keeps each
padded position out of the other positions' results (attention masked, pooling over kept
positions): a sentence embedding or a classifier's logits. It is not where an output is
per token (its shape would change) or where padded positions are read: so the converter
keeps the rewrite only when the trimmed graph gives the untrimmed one's outputs, shapes
included, on a padded example (:func:`check_trim`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MASK_INPUT", "TrimCheck", "batch_is_symbolic", "check_trim", "padded_example",
           "trim_padding"]

MASK_INPUT = "attention_mask"
_PREFIX = "trim_padding"
_INTEGER = (6, 7)  # onnx.TensorProto.INT32, INT64


def _dims(value_info: Any) -> list[Any]:
    tensor = value_info.type.tensor_type
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
            for d in tensor.shape.dim]


def sequence_inputs(proto: Any) -> list[str]:
    """The graph inputs cut with the mask: the mask (a 2-D graph input named
    ``attention_mask``) and every 2-D integer input (token ids, segment ids) whose sequence
    dimension is the mask's. Empty when the graph has no such mask, its sequence dimension
    is unknown, or the graph is trimmed already."""
    inputs = {i.name: i for i in proto.graph.input}
    if MASK_INPUT not in inputs:
        return []
    mask_dims = _dims(inputs[MASK_INPUT])
    if len(mask_dims) != 2 or mask_dims[1] is None:
        return []
    if any(node.name.startswith(f"{_PREFIX}/") for node in proto.graph.node):
        return []  # trimmed already (an ONNX source converted again)
    inits = {t.name for t in proto.graph.initializer}
    shapes = {name: _dims(value) for name, value in inputs.items() if name not in inits}
    return [name for name, dims in shapes.items()
            if (name == MASK_INPUT or inputs[name].type.tensor_type.elem_type in _INTEGER)
            and len(dims) == 2 and dims[1] == mask_dims[1]]


def batch_is_symbolic(proto: Any) -> bool:
    """Whether the mask input's batch dimension is symbolic (rows of several lengths can
    then be checked in one batch)."""
    mask = next((i for i in proto.graph.input if i.name == MASK_INPUT), None)
    return mask is not None and isinstance(_dims(mask)[0], str)


def trim_padding(proto: Any) -> list[str]:
    """Cut the sequence inputs of ``proto`` (an ``onnx.ModelProto``, changed in place)
    after the last position the mask keeps; return the inputs cut (empty: nothing done)."""
    from onnx import TensorProto, helper, numpy_helper

    names = sequence_inputs(proto)
    if not names:
        return []
    p = _PREFIX

    def const(name: str, value: Any) -> Any:
        return numpy_helper.from_array(np.asarray(value, dtype=np.int64), f"{p}/{name}")

    graph = proto.graph
    graph.initializer.extend([const("zero", [0]), const("one", 1), const("axis", [1]),
                              const("min_len", [[1]]), const("flat", [1]),
                              const("seq_axis", 1)])
    nodes = [
        helper.make_node("Cast", [MASK_INPUT], [f"{p}/kept"], to=TensorProto.BOOL,
                         name=f"{p}/kept"),
        helper.make_node("Cast", [f"{p}/kept"], [f"{p}/kept_i64"], to=TensorProto.INT64,
                         name=f"{p}/kept_i64"),
        helper.make_node("Shape", [MASK_INPUT], [f"{p}/shape"], name=f"{p}/shape"),
        helper.make_node("Gather", [f"{p}/shape", f"{p}/seq_axis"], [f"{p}/seq"],
                         name=f"{p}/seq", axis=0),
        helper.make_node("Add", [f"{p}/seq", f"{p}/one"], [f"{p}/seq_end"],
                         name=f"{p}/seq_end"),
        # 1..S: position i (from 1) where the mask keeps it, 0 where it does not
        helper.make_node("Range", [f"{p}/one", f"{p}/seq_end", f"{p}/one"],
                         [f"{p}/positions"], name=f"{p}/positions"),
        helper.make_node("Mul", [f"{p}/kept_i64", f"{p}/positions"], [f"{p}/last_kept"],
                         name=f"{p}/last_kept"),
        helper.make_node("ReduceMax", [f"{p}/last_kept"], [f"{p}/length"], keepdims=1,
                         name=f"{p}/length"),
        helper.make_node("Max", [f"{p}/length", f"{p}/min_len"], [f"{p}/length_1"],
                         name=f"{p}/length_1"),
        helper.make_node("Reshape", [f"{p}/length_1", f"{p}/flat"], [f"{p}/end"],
                         name=f"{p}/end"),
    ]
    renamed = {name: f"{p}/{name}" for name in names}
    nodes += [helper.make_node("Slice", [name, f"{p}/zero", f"{p}/end", f"{p}/axis"],
                               [cut], name=cut) for name, cut in renamed.items()]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    for output in graph.output:
        if output.name in renamed:  # an input passed straight through stays whole
            graph.node.append(helper.make_node("Identity", [renamed[output.name]],
                                               [output.name]))
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *old])
    # shapes recorded inside the graph may hold the input's sequence length: no longer true
    del graph.value_info[:]
    return names


def padded_example(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` with the second half of each mask row cleared (its first position kept),
    so that the check runs on padding even when the example has none."""
    out = dict(feeds)
    mask = np.array(feeds[MASK_INPUT], copy=True)
    mask[:, max(mask.shape[1] // 2, 1):] = 0
    out[MASK_INPUT] = mask
    return out


def _examples(feeds: dict[str, np.ndarray], batched: bool) -> list[dict[str, np.ndarray]]:
    """The example as given (its mask all ones where it keeps nothing: a synthetic one),
    padded, and, when ``batched``, both in one batch of rows of two lengths."""
    base = dict(feeds)
    if not np.any(base[MASK_INPUT]):
        base[MASK_INPUT] = np.ones_like(base[MASK_INPUT])
    padded = padded_example(base)
    examples = [base, padded]
    if batched:
        examples.append({k: np.concatenate([padded[k], base[k]]) for k in base})
    return examples


@dataclass(frozen=True)
class TrimCheck:
    """The trimmed graph against the untrimmed one on padded examples."""

    ok: bool
    max_rel_diff: float | None
    detail: str


def check_trim(before: bytes, after: bytes, feeds: dict[str, np.ndarray], *,
               batched: bool, rtol: float = 1e-4) -> TrimCheck:
    """Run both graphs on the examples :func:`_examples` makes of ``feeds`` (``batched``:
    :func:`batch_is_symbolic` of the graph); the rewrite is
    kept when every output has the same shape and differs by at most ``rtol`` of the
    output's largest magnitude (at least 1)."""
    import onnxruntime as ort

    worst = 0.0
    try:
        sessions = []
        for model in (before, after):
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.intra_op_num_threads = 1
            sessions.append(ort.InferenceSession(model, so,
                                                 providers=["CPUExecutionProvider"]))
        runs = [[s.run(None, example) for s in sessions]
                for example in _examples(feeds, batched)]
    except Exception as exc:  # onnxruntime raises its own exception types
        line = str(exc).splitlines()[0][:200] if str(exc) else repr(exc)
        return TrimCheck(False, None, f"onnxruntime failed on the graphs: {line}")
    for ref_out, got_out in runs:
        for ref, got in zip(ref_out, got_out, strict=True):
            ref, got = np.asarray(ref), np.asarray(got)
            if ref.shape != got.shape:
                return TrimCheck(False, None, f"an output's shape changed ({ref.shape} to"
                                              f" {got.shape}): it is per position")
            if not ref.size:
                continue
            scale = max(1.0, float(np.max(np.abs(ref))))
            worst = max(worst, float(np.max(np.abs(ref.astype(np.float64) - got))) / scale)
    if worst > rtol:
        return TrimCheck(False, worst, f"outputs differ by {worst:.3g} (> {rtol:g}) of their"
                                       " magnitude: the graph reads padded positions")
    return TrimCheck(True, worst, "outputs unchanged on padded examples")
