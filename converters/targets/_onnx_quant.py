"""Quantization of float ONNX models with onnxruntime's tools: fp16, dynamic and static int8.

Static int8 writes QDQ (QuantizeLinear / DequantizeLinear pairs around float ops), the
format onnxruntime recommends: the graph stays portable and each device's onnxruntime fuses
the pairs into the int8 kernels its CPU has.

BERT-like transformers are first fused by onnxruntime's transformer optimizer (attention,
embedding and skip layer normalization, bias + GELU), so the quantizer sees one ``Attention``
node per layer and writes its int8 kernel (``QAttention``); two rewrites of the fused graph
(:mod:`._onnx_transformer`) keep its CPU kernels off slow paths. :func:`float_fallback` then
keeps in float the nodes whose int8 version costs output cosine, until every calibration
sample's output agrees with the float model to the asked cosine.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.data import Dataset
from edgekit.errors import ConversionError, DataError, UsageError

__all__ = [
    "PreprocessResult",
    "TransformerShape",
    "check_nodes_to_exclude",
    "float_fallback",
    "fuse_transformer",
    "preprocess",
    "quantizable_nodes",
    "quantize_dynamic_int8",
    "quantize_fp16",
    "quantize_static_int8",
    "sample_cosines",
    "transformer_shape",
]

# Ops whose weights quantization changes; the names of these nodes are what
# ``nodes_to_exclude`` usually lists (the sensitive layers kept in float).
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "Attention", "LSTM",
               "EmbedLayerNormalization")
# transformers model types whose encoder layers onnxruntime's "bert" optimizer fuses.
_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
_CALIBRATION_BATCH = 32
# Static int8 quantizes the ops with weights (embedding tables too: Gather) and the ops
# that only move or clip values (exact in int8). Residual adds, normalisations, softmax and
# activation-by-activation matrix products stay float: quantizing them took the MiniLM
# embedding cosine from 0.94 to 0.43, and a CNN gains nothing from them.
_STATIC_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "MaxPool",
                    "AveragePool", "GlobalAveragePool", "Relu", "Clip", "Flatten", "Reshape",
                    "Transpose", "Squeeze", "Unsqueeze", "Resize", "Pad", "Split", "Slice")


@dataclass
class PreprocessResult:
    """The model after onnxruntime's quantization pre-processing, and what was applied."""

    model: bytes
    outcome: str
    detail: str | None = None


@dataclass(frozen=True)
class TransformerShape:
    """What onnxruntime's transformer optimizer must be told about a BERT-like model."""

    model_type: str
    num_heads: int
    hidden_size: int


def transformer_shape(module: Any) -> TransformerShape | None:
    """Heads and hidden size from the config of a BERT-like transformers model inside
    ``module`` (an ``nn.Module``), or None when it holds none."""
    for sub in getattr(module, "modules", lambda: [])():
        config = getattr(sub, "config", None)
        kind = getattr(config, "model_type", None)
        heads = getattr(config, "num_attention_heads", None)
        hidden = getattr(config, "hidden_size", None)
        if kind in _BERT_LIKE and isinstance(heads, int) and isinstance(hidden, int):
            return TransformerShape(str(kind), heads, hidden)
    return None


def fuse_transformer(model: bytes, shape: TransformerShape
                     ) -> tuple[bytes, dict[str, int], dict[str, Any]]:
    """Fuse attention, embedding / skip layer normalization and bias + GELU with
    onnxruntime's transformer optimizer (model type ``bert``), then apply the CPU rewrites
    of :mod:`._onnx_transformer` (attention mask filter, skip layer normalization written
    back as add + layer normalization); return the model, the count of each fused operator
    and the rewrites' record.

    Only the optimizer's own fusions run (``opt_level=0``): onnxruntime's graph
    optimizations are applied at load on each device, for its CPU.

    Raises:
        ConversionError: the optimizer failed on the graph.
    """
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    from ._onnx_transformer import cpu_rewrites

    try:
        with _no_stdout():
            optimized = optimize_model(onnx.load_from_string(model), model_type="bert",
                                       num_heads=shape.num_heads, hidden_size=shape.hidden_size,
                                       opt_level=0)
            stats = optimized.get_fused_operator_statistics()
    except Exception as exc:  # the optimizer raises anything
        raise ConversionError(f"transformer fusion failed: {_first_line(exc)}",
                              hint="convert with --exporter torchscript, whose graph the"
                                   " optimizer's patterns match") from exc
    fused = {str(op): int(n) for op, n in stats.items() if n}
    rewrites = cpu_rewrites(optimized.model)
    return bytes(optimized.model.SerializeToString()), fused, rewrites


def sample_cosines(reference: bytes, model: bytes, data: Dataset) -> np.ndarray:
    """Per-sample cosine between the first output of ``model`` and of ``reference`` (one
    thread, batches of 16)."""
    import onnxruntime as ort

    outputs = []
    for graph in (reference, model):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        session = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        parts = [session.run(None, {k: v for k, v in feeds.items() if k in names})[0]
                 for feeds in data.batches(16)]
        outputs.append(np.concatenate(parts).reshape(len(data), -1).astype(np.float64))
    ref, out = outputs
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    same = np.all(ref == out, axis=1)
    return np.where(same, 1.0, (ref * out).sum(axis=1) / np.maximum(norms, 1e-30))


def float_fallback(model: bytes, quantize: Callable[[list[str]], bytes], data: Dataset, *,
                   min_cosine: float, excluded: list[str]) -> tuple[bytes, dict[str, Any]]:
    """Quantize ``model``; when a calibration sample's output cosine to the float model is
    below ``min_cosine``, keep the most costly nodes in float (see
    :func:`converters.compress.sensitivity.keep_nodes_in_float`).

    ``quantize`` takes the names to keep in float (on top of ``excluded``, the user's).
    Returns the model and the record for the recipe.

    Raises:
        ConversionError: the quantizer failed.
    """
    from ..compress.sensitivity import keep_nodes_in_float

    candidates = [n for group in quantizable_nodes(model).values() for n in group
                  if n not in excluded]

    def worst(kept: list[str]) -> tuple[bytes, float, float]:
        quantized = quantize([*excluded, *kept])
        cos = sample_cosines(model, quantized, data)
        return quantized, float(cos.min()), float(cos.mean())

    return keep_nodes_in_float(worst, candidates, min_cosine=min_cosine, samples=len(data))


def preprocess(model: bytes) -> PreprocessResult:
    """Run ``quant_pre_process`` (graph optimization and shape inference) before quantizing.

    Symbolic shape inference fails on some graphs with dynamic dimensions (transformer
    exports); then it is skipped, and if pre-processing still fails, the model goes to the
    quantizer as it is. The outcome says which: ``full``, ``skip_symbolic_shape`` or ``none``.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgekit-pre-") as tmp:
        src = Path(tmp) / "in.onnx"
        dst = Path(tmp) / "out.onnx"
        src.write_bytes(model)
        for outcome, skip_symbolic in (("full", False), ("skip_symbolic_shape", True)):
            try:
                # When symbolic shape inference gives up, onnxruntime saves what it got to
                # sym_shape_infer_temp.onnx in the working directory: keep that in tmp.
                with _no_stdout(), contextlib.chdir(tmp):
                    quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
                detail = "; ".join(errors) if errors else None
                return PreprocessResult(dst.read_bytes(), outcome, detail)
            except Exception as exc:  # shape inference raises bare Exception
                errors.append(f"{outcome}: {_first_line(exc)}")
    return PreprocessResult(model, "none", "; ".join(errors))


def quantizable_nodes(model: bytes) -> dict[str, list[str]]:
    """Names of the nodes that carry float weights, by op type (candidates to exclude)."""
    import onnx

    proto = onnx.load_from_string(model)
    weights = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    found: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if node.op_type in _WEIGHT_OPS and any(i in weights for i in node.input):
            found.setdefault(node.op_type, []).append(node.name)
    return found


def check_nodes_to_exclude(model: bytes, names: list[str]) -> None:
    """Every name in ``nodes_to_exclude`` must be a node of the graph that is quantized.

    Raises:
        UsageError: names the unknown nodes and lists some that exist.
    """
    import onnx

    if not names:
        return
    present = {n.name for n in onnx.load_from_string(model).graph.node}
    unknown = [n for n in names if n not in present]
    if unknown:
        known = [n for group in quantizable_nodes(model).values() for n in group]
        raise UsageError(
            f"nodes_to_exclude: {', '.join(unknown)} not in the graph being quantized",
            hint="use names from the recipe's quantizable_nodes of a conversion with the same"
                 f" exporter, for example: {', '.join(known[:6]) or '(none)'}",
        )


def quantize_fp16(model: bytes) -> bytes:
    """Weights and compute in float16; inputs and outputs stay float32.

    Raises:
        ConversionError: the converter failed on the graph.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        converted = convert_float_to_float16(onnx.load_from_string(model), keep_io_types=True)
    except Exception as exc:  # the converter raises on graphs it cannot type
        raise ConversionError(f"float16 conversion failed: {_first_line(exc)}",
                              hint="try --quantize dynamic, or keep --quantize none") from exc
    return bytes(converted.SerializeToString())


def quantize_dynamic_int8(model: bytes, *, per_channel: bool,
                          nodes_to_exclude: list[str]) -> bytes:
    """int8 weights, activations quantized at run time per batch.

    Raises:
        ConversionError: the quantizer failed.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The dynamic quantizer rewrites Gemm into MatMul + Add named "<gemm>_MatMul" before it
    # matches nodes_to_exclude, so a Gemm is excluded under that name too.
    excluded = [*nodes_to_exclude, *(f"{name}_MatMul" for name in nodes_to_exclude)]
    with tempfile.TemporaryDirectory(prefix="edgekit-dyn-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(model)
        try:
            with _no_stdout():
                quantize_dynamic(str(src), str(dst), per_channel=per_channel,
                                 weight_type=QuantType.QInt8,
                                 nodes_to_exclude=excluded or None,
                                 # Ops from other domains have no inferred type: float.
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        except Exception as exc:  # the quantizer raises anything
            raise ConversionError(f"dynamic int8 quantization failed: {_first_line(exc)}",
                                  hint="try --quantize int8 with --calibration, or fp16") from exc
        return dst.read_bytes()


def quantize_static_int8(model: bytes, calibration: Dataset, *, method: str, per_channel: bool,
                         nodes_to_exclude: list[str]) -> tuple[bytes, dict[str, Any]]:
    """int8 weights and activations in QDQ format, activation ranges from the calibration set.

    The ranges are computed here and handed to ``quantize_static`` as a calibration cache:
    ``quantize_static`` gives the entropy calibrator as many histogram bins as quantized
    bins, which leaves it no threshold to search, so entropy would equal min-max.

    Returns the model and the recipe entries (calibration method, samples, types).

    Raises:
        ConversionError: calibration or quantization failed.
        DataError: fewer calibration samples than the graph's fixed batch.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    batch = _calibration_batch(model, len(calibration))
    # Only full batches: a graph with a fixed batch takes no other, and the histogram
    # calibrators (entropy, percentile) cannot stack batches of different sizes.
    used = len(calibration) // batch * batch
    with tempfile.TemporaryDirectory(prefix="edgekit-int8-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        cache = Path(tmp) / "ranges.json"
        src.write_bytes(model)
        try:
            with _no_stdout():
                ranges = _calibrate(src, Path(tmp), calibration.take(used), batch, method)
                save_tensors_data(ranges, cache)
                # uint8 activations with int8 weights (U8S8): onnxruntime ran MiniLM's
                # S8S8 matrix products 2.6x slower on an x86 CPU (AVX512-VNNI); on ARM
                # both have fast kernels.
                quantize_static(str(src), str(dst), None, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=list(_STATIC_OP_TYPES),
                                per_channel=per_channel, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8,
                                nodes_to_exclude=list(nodes_to_exclude) or None,
                                calibrate_method=ranges.calibration_method,
                                calibration_cache_path=str(cache),
                                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT,
                                               "MatMulConstBOnly": True})
        except Exception as exc:  # calibration and quantization raise anything
            raise ConversionError(
                f"static int8 quantization ({method} calibration) failed: {_first_line(exc)}",
                hint="try another --calibration-method, or --quantize dynamic") from exc
        data = dst.read_bytes()
    recipe = {"calibration_samples": used, "calibration_batch": batch,
              "calibration_settings": _CALIBRATION_SETTINGS[method],
              "activation_type": "uint8", "weight_type": "int8", "quant_format": "QDQ",
              "op_types": list(_STATIC_OP_TYPES)}
    return data, recipe


# Entropy searches clipping thresholds between 128 quantized bins (int8's half range) and
# the whole 512-bin histogram: a threshold step of 1/256 of the range, and a search that
# stays quick (its cost grows with the square of the bins).
_CALIBRATION_SETTINGS: dict[str, dict[str, Any]] = {
    "minmax": {},
    "entropy": {"num_bins": 512, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.999},
}


def _calibrate(model: Path, tmp: Path, data: Dataset, batch: int, method: str) -> Any:
    """Activation ranges of the quantizable ops' tensors over the calibration batches."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    class Reader(CalibrationDataReader):
        """Feeds the calibration set to the calibrator in batches."""

        def __init__(self) -> None:
            self._batches: Iterator[dict[str, np.ndarray]] = iter(data.batches(batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    calibrator = create_calibrator(
        model, list(_STATIC_OP_TYPES),
        augmented_model_path=str(tmp / "augmented.onnx"), calibrate_method=methods[method],
        extra_options=dict(_CALIBRATION_SETTINGS[method]))
    calibrator.collect_data(Reader())
    return calibrator.compute_data()


def _calibration_batch(model: bytes, samples: int) -> int:
    """The batch to calibrate with: the graph's fixed batch, else a moderate one.

    Raises:
        DataError: fewer calibration samples than the graph's fixed batch.
    """
    import onnx

    proto = onnx.load_from_string(model)
    inits = {t.name for t in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            fixed = int(dims[0].dim_value)
            if samples < fixed:
                raise DataError(f"the graph takes batches of {fixed}; the calibration set has"
                                f" only {samples} samples")
            return fixed
    return min(_CALIBRATION_BATCH, samples)


@contextlib.contextmanager
def _no_stdout() -> Iterator[None]:
    """onnxruntime's quantization tools print progress to stdout, which ``--json`` keeps
    for the report alone, and log routine warnings on the root logger (one per LayerNorm
    weight that has no channel axis); what matters is in the recipe and the notes."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
