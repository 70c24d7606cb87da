"""The ONNX target: float ONNX from a framework exporter, then opset, optimization and
quantization, into one self-contained ``model.onnx`` for onnxruntime.

Steps, each recorded in the recipe:

1. export: the exporter registered for the source framework (PyTorch: the faster of the
   dynamo and TorchScript exporters; ONNX: the model as given; Keras: tf2onnx);
2. opset: raised to ``opts.opset`` when the model is older;
3. mode: ``none`` keeps float32, ``fp16`` converts weights and compute to float16 (I/O stay
   float32), ``dynamic`` quantizes weights to int8, ``int8`` quantizes weights and
   activations to int8 in QDQ format with ranges from the calibration set. The int8 modes
   run onnxruntime's pre-processing first (see :mod:`._onnx_quant`);
4. offline graph optimization (``none`` and ``dynamic``): onnxruntime's basic and extended
   levels are saved, checked to load in a plain session and timed against the input; the
   fastest is kept, extended only when clearly faster because it uses onnxruntime-only
   operators.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgekit.data import Dataset
from edgekit.errors import ConversionError, DataError, UsageError

from .._registry import (
    LoadedSource,
    OnnxExport,
    Progress,
    TargetBackend,
    TargetResult,
    onnx_exporters,
    register_onnx_exporter,
    register_target,
)
from ..options import QUANT_MODES, ConvertOptions
from . import _onnx_quant as Q
from . import onnx_from_torch as _onnx_from_torch  # noqa: F401  (registers the exporter)
from .onnx_from_torch import time_onnx_models

__all__ = ["OnnxTarget", "min_onnxruntime"]

# Oldest onnxruntime release that implements each ONNX opset and IR version
# (onnxruntime's compatibility table).
_ORT_FOR_OPSET = {17: (1, 13), 18: (1, 14), 19: (1, 15), 20: (1, 17), 21: (1, 18),
                  22: (1, 20), 23: (1, 22)}
_ORT_FOR_IR = {7: (1, 10), 8: (1, 13), 9: (1, 15), 10: (1, 18), 11: (1, 22)}
# Extended optimization must beat the portable graph by this much to be kept.
_EXTENDED_MIN_GAIN = 0.03


@register_onnx_exporter("onnx")
def export_onnx_source(source: LoadedSource, opts: ConvertOptions,
                       progress: Progress) -> OnnxExport:
    """An ONNX source is already ONNX: its self-contained bytes are the float model.

    Raises:
        UsageError: the source is not an ONNX source.
    """
    from ..sources.onnx_source import OnnxSource

    if not isinstance(source, OnnxSource):
        raise UsageError(f"expected an ONNX source, got {type(source).__name__}")
    return OnnxExport(model=source.model_bytes, exporter="onnx-source",
                      recipe={"source_opset": source.opset})


@register_target
class OnnxTarget(TargetBackend):
    """ONNX models for onnxruntime, float or quantized."""

    KEY: ClassVar[str] = "onnx"
    FORMAT: ClassVar[str] = "onnx"
    MODEL_FILE: ClassVar[str] = "model.onnx"
    SOURCES: ClassVar[frozenset[str]] = frozenset({"pytorch", "onnx", "keras"})
    QUANT_MODES: ClassVar[frozenset[str]] = frozenset(QUANT_MODES)

    @classmethod
    def convert(cls, source: LoadedSource, opts: ConvertOptions, calibration: Dataset | None,
                progress: Progress) -> TargetResult:
        """Export, convert the opset, quantize and optimize.

        Raises:
            ConversionError: no exporter for the framework, or a step failed.
            DataError: ``int8`` without calibration data.
            UsageError: ``nodes_to_exclude`` names nodes the graph does not have.
        """
        import onnx

        from ..sources.onnx_source import onnx_opset, tensor_specs

        exporter = onnx_exporters().get(source.framework)
        if exporter is None:
            raise ConversionError(
                f"no ONNX exporter is registered for {source.framework} models",
                hint="install the converter extra (pip install 'edgekit-fleet[convert]') or use"
                     " --to tflite")
        if opts.quantize == "int8" and calibration is None:
            raise DataError("--quantize int8 needs calibration data",
                            hint="pass --calibration calib.npz (a few hundred samples)")
        export = exporter(source, opts, progress)
        notes = list(export.notes)
        model, opset_from = _with_opset(export.model, opts.opset)
        if opset_from is not None:
            notes.append(f"opset converted from {opset_from} to {opts.opset}")
        feeds = _example_feeds(source, model)
        recipe: dict[str, Any] = {
            "format": "onnx",
            "quantize": opts.quantize,
            "per_channel": opts.per_channel if opts.quantize in ("dynamic", "int8") else None,
            "calibration_method": opts.calibration_method if opts.quantize == "int8" else None,
            "calibration_samples": None,
            **export.recipe,
            "exporter": export.exporter,
            "nodes_to_exclude": list(opts.nodes_to_exclude),
        }
        model = cls._apply_mode(model, source, opts, calibration, feeds, recipe, notes,
                                progress)
        proto = onnx.load_from_string(model)
        _check_self_contained(proto)
        _check_loads(model)
        inputs, outputs = tensor_specs(proto)
        recipe["opset"] = onnx_opset(proto)
        runtime = {"opset": recipe["opset"], "ir_version": int(proto.ir_version),
                   "min_runtime_version": min_onnxruntime(proto)}
        tools = {**export.tools, **_tool_versions()}
        return TargetResult(model=model, inputs=inputs, outputs=outputs, recipe=recipe,
                            runtime=runtime, notes=notes, tools=tools)

    @classmethod
    def _apply_mode(cls, model: bytes, source: LoadedSource, opts: ConvertOptions,
                    calibration: Dataset | None,
                    feeds: dict[str, np.ndarray], recipe: dict[str, Any], notes: list[str],
                    progress: Progress) -> bytes:
        mode = opts.quantize
        if mode not in ("dynamic", "int8"):  # the int8 modes trim after their fusion
            model = _trim_padding(model, feeds, opts, recipe, notes, progress)
        if mode == "fp16":
            progress("converting to float16")
            recipe["graph_optimization"] = {
                "applied": False,
                "reason": "float16 graphs are left to each device's onnxruntime, whose CPU"
                          " kernels for float16 differ"}
            return Q.quantize_fp16(model)
        fixed: list[str] = []
        if mode in ("dynamic", "int8"):
            model = _prepare_int8(model, source, opts, feeds, recipe, notes, progress)
            if mode == "dynamic":
                model = _smooth(model, opts, calibration, recipe, progress)
                model, fixed = _split_outliers(model, opts, calibration, recipe, progress)
            Q.check_nodes_to_exclude(model, opts.nodes_to_exclude)
            recipe["quantizable_nodes"] = Q.quantizable_nodes(model)
        if mode == "dynamic":
            progress("quantizing weights to int8 (dynamic)")
            model = _with_fallback(model, lambda kept: Q.quantize_dynamic_int8(
                model, per_channel=opts.per_channel, nodes_to_exclude=kept),
                opts, calibration, recipe, notes, progress, fixed=fixed)
        elif mode == "int8":
            assert calibration is not None
            progress(f"calibrating ({opts.calibration_method}) and quantizing to int8 (QDQ)")
            quant: dict[str, Any] = {}

            def static(kept: list[str]) -> bytes:
                data, quant_recipe = Q.quantize_static_int8(
                    model, calibration, method=opts.calibration_method,
                    per_channel=opts.per_channel, nodes_to_exclude=kept)
                quant.update(quant_recipe)
                return data

            model = _with_fallback(model, static, opts, calibration, recipe, notes, progress)
            recipe.update(quant)
            recipe["graph_optimization"] = {
                "applied": False,
                "reason": "the QDQ graph is kept so each device's onnxruntime fuses it into"
                          " the int8 kernels its CPU has"}
            return model
        if not opts.optimize_graph:
            recipe["graph_optimization"] = {"applied": False, "reason": "disabled"}
            return model
        progress("optimizing the graph offline (onnxruntime)")
        model, record = _optimize(model, feeds, opts.threads)
        recipe["graph_optimization"] = record
        return model


def _prepare_int8(model: bytes, source: LoadedSource, opts: ConvertOptions,
                  feeds: dict[str, np.ndarray], recipe: dict[str, Any], notes: list[str],
                  progress: Progress) -> bytes:
    """Fuse a BERT-like transformer (heads and hidden size from its config), trim its
    padding (:func:`_trim_padding`, after the fusion, whose patterns start at the graph
    inputs), then run the quantization pre-processing; record all three.

    Raises:
        ConversionError: the transformer optimizer failed.
    """
    shape = Q.transformer_shape(getattr(source, "module", None))
    recipe["transformer_fusion"] = None
    if shape is not None:
        progress(f"fusing the transformer ({shape.num_heads} heads, hidden {shape.hidden_size})")
        model, fused, rewrites = Q.fuse_transformer(model, shape)
        recipe["transformer_fusion"] = {"optimizer": "onnxruntime.transformers (bert)",
                                        "config_model_type": shape.model_type,
                                        "num_heads": shape.num_heads,
                                        "hidden_size": shape.hidden_size, "fused_ops": fused,
                                        "cpu_rewrites": rewrites}
        if not fused:
            notes.append("the transformer optimizer fused nothing in this export (try"
                         " --exporter torchscript)")
    model = _trim_padding(model, feeds, opts, recipe, notes, progress)
    progress("pre-processing for quantization")
    pre = Q.preprocess(model)
    recipe["preprocess"] = {"outcome": pre.outcome, "detail": pre.detail}
    if pre.outcome != "full":
        notes.append(f"quantization pre-processing: {pre.outcome} ({pre.detail})")
    return pre.model


def _trim_padding(model: bytes, feeds: dict[str, np.ndarray], opts: ConvertOptions,
                  recipe: dict[str, Any], notes: list[str], progress: Progress) -> bytes:
    """For a graph with an ``attention_mask`` input, cut the inputs after the last position
    the mask keeps (:mod:`._onnx_trim`), kept only when the outputs do not change on a
    padded example; record what was done and why not."""
    import onnx

    from ._onnx_trim import batch_is_symbolic, check_trim, trim_padding

    if not opts.trim_padding:
        recipe["padding_trim"] = {"applied": False, "reason": "disabled"}
        return model
    proto = onnx.load_from_string(model)
    cut = trim_padding(proto)
    if not cut:
        recipe["padding_trim"] = None
        return model
    progress(f"trimming padding after the attention mask ({', '.join(cut)})")
    trimmed = bytes(proto.SerializeToString())
    check = check_trim(model, trimmed, feeds, batched=batch_is_symbolic(proto))
    recipe["padding_trim"] = {"applied": check.ok, "inputs": cut, "check": check.detail,
                              "max_rel_diff": check.max_rel_diff}
    if not check.ok:
        notes.append(f"padding not trimmed: {check.detail}")
        return model
    return trimmed


def _smooth(model: bytes, opts: ConvertOptions, calibration: Dataset | None,
            recipe: dict[str, Any], progress: Progress) -> bytes:
    """For a fused transformer with calibration data, scale the uneven input channels of
    the matrix products after its layer normalizations (:mod:`._onnx_smooth`), before the
    outlier split looks for what is left."""
    from ._onnx_smooth import smooth_products

    recipe["smoothing"] = None
    if recipe.get("transformer_fusion") is None or calibration is None:
        return model
    if opts.smooth_alpha == 0:
        return model
    progress(f"smoothing uneven input channels (SmoothQuant, alpha {opts.smooth_alpha:g})")
    smoothed = smooth_products(model, calibration, alpha=opts.smooth_alpha)
    recipe["smoothing"] = smoothed.record()
    return smoothed.model


def _split_outliers(model: bytes, opts: ConvertOptions, calibration: Dataset | None,
                    recipe: dict[str, Any], progress: Progress) -> tuple[bytes, list[str]]:
    """For a fused transformer with calibration data, move the outlier input channels of
    its matrix products to float products (:mod:`._onnx_outliers`); return the model and
    the float products' names, which every quantization of it keeps in float."""
    from ._onnx_outliers import split_outlier_channels

    recipe["outlier_split"] = None
    if recipe.get("transformer_fusion") is None or calibration is None:
        return model, []
    if opts.outlier_channels == 0:
        return model, []
    progress(f"splitting outlier input channels (up to {opts.outlier_channels} per product)")
    # Every product is split, also those the user keeps in float: the split depends on the
    # graph and the calibration data alone, so a conversion that repeats a package's
    # nodes_in_float (a head-only update) finds the same float products.
    split = split_outlier_channels(model, calibration, most=opts.outlier_channels)
    recipe["outlier_split"] = split.record(opts.outlier_channels)
    return split.model, split.float_nodes


def _with_fallback(model: bytes, quantize: Callable[[list[str]], bytes], opts: ConvertOptions,
                   calibration: Dataset | None, recipe: dict[str, Any], notes: list[str],
                   progress: Progress, fixed: list[str] | None = None) -> bytes:
    """``quantize(nodes_in_float)``, with the float fallback when ``opts`` asks for one and
    calibration data are there to measure it; the record goes to ``recipe["float_fallback"]``
    and the nodes kept in float (``fixed`` ones, the user's and the fallback's) to
    ``recipe["nodes_in_float"]``.

    Raises:
        ConversionError: the quantizer failed.
    """
    user = list(dict.fromkeys([*(fixed or []), *opts.nodes_to_exclude]))
    recipe["nodes_in_float"] = user
    if opts.float_fallback_cosine is None:
        return quantize(user)
    if calibration is None:
        notes.append("float fallback skipped: it needs calibration data (--calibration)")
        return quantize(user)
    progress(f"float fallback: every calibration sample to cosine >= {opts.float_fallback_cosine:g}")
    quantized, record = Q.float_fallback(model, quantize, calibration,
                                         min_cosine=opts.float_fallback_cosine, excluded=user)
    recipe["float_fallback"] = record
    recipe["nodes_in_float"] = [*user, *record["kept_in_float"]]
    if not record["met"]:
        notes.append(f"float fallback: {record['outcome']}")
    return quantized


def _with_opset(model: bytes, minimum: int) -> tuple[bytes, int | None]:
    """The model at ``minimum`` opset or newer, and the opset it was converted from.

    Raises:
        ConversionError: the exported bytes are not ONNX, or the version converter failed.
    """
    import onnx
    from google.protobuf.message import DecodeError

    from ..sources.onnx_source import onnx_opset

    try:
        proto = onnx.load_from_string(model)
    except DecodeError as exc:
        raise ConversionError(f"the exporter produced an unreadable ONNX model: {exc}") from exc
    current = onnx_opset(proto)
    if current >= minimum:
        return model, None
    try:
        converted = onnx.version_converter.convert_version(proto, minimum)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises RuntimeError and checker errors
        raise ConversionError(f"converting the model from opset {current} to {minimum} failed:"
                              f" {str(exc).splitlines()[0] if str(exc) else exc!r}",
                              hint="re-export the model at a newer opset") from exc
    return bytes(converted.SerializeToString()), current


def _example_feeds(source: LoadedSource, model: bytes) -> dict[str, np.ndarray]:
    """One batch-1 input for timing: the source's example where it has one, else synthetic."""
    import onnx

    from ..sources.onnx_source import tensor_specs

    specs, _ = tensor_specs(onnx.load_from_string(model))
    example = dict(source.ref.example or {})
    if len(specs) == 1 and len(example) == 1 and specs[0].name not in example:
        example = {specs[0].name: next(iter(example.values()))}
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in specs:
        if spec.name in example:
            arr = np.asarray(example[spec.name])
            fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else 1
            feeds[spec.name] = np.resize(arr[:1], (fixed, *arr.shape[1:])).astype(spec.dtype)
            continue
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        if np.issubdtype(np.dtype(spec.dtype), np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


def _optimize(model: bytes, feeds: dict[str, np.ndarray],
              threads: int) -> tuple[bytes, dict[str, Any]]:
    """Save onnxruntime's basic and extended optimizations offline; keep the fastest.

    Basic rewrites use standard ONNX operators only and run anywhere; extended fuses into
    onnxruntime's own operators (still any CPU), so it must beat basic clearly to be kept.
    A level whose model does not save, or does not load in a plain session, is skipped.
    """
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    candidates = {"none": model}
    failures = {}
    with tempfile.TemporaryDirectory(prefix="edgekit-opt-") as tmp:
        for name, level in levels.items():
            path = Path(tmp) / f"{name}.onnx"
            try:
                so = ort.SessionOptions()
                so.log_severity_level = 3
                so.graph_optimization_level = level
                so.optimized_model_filepath = str(path)
                ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
                data = path.read_bytes()
                ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own exception types
                failures[name] = str(exc).splitlines()[0][:300] if str(exc) else repr(exc)
                continue
            candidates[name] = data
    timings = time_onnx_models(candidates, feeds, threads)
    chosen = "none"
    if "basic" in timings and timings["basic"] <= timings["none"]:
        chosen = "basic"
    if "extended" in timings and timings["extended"] < timings[chosen] * (1 - _EXTENDED_MIN_GAIN):
        chosen = "extended"
    record: dict[str, Any] = {"applied": chosen != "none", "level": chosen,
                              "latency_ms": timings, "threads": threads}
    if failures:
        record["failures"] = failures
    return candidates[chosen], record


def _check_self_contained(proto: Any) -> None:
    import onnx

    def external(tensors: Any) -> bool:
        return any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors)

    if external(proto.graph.initializer):
        raise ConversionError("the ONNX model refers to external data files",
                              hint="the artifact must hold every weight; re-export the model")


def _check_loads(model: bytes) -> None:
    import onnxruntime as ort

    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ConversionError(f"onnxruntime cannot load the converted model: {exc}",
                              hint="try another --quantize mode or --exporter") from exc


def min_onnxruntime(proto: Any) -> str:
    """The oldest onnxruntime that runs the model: from its opset and IR version, or the
    building onnxruntime's minor release when it uses onnxruntime-only operators (whose
    attributes change between releases) or is newer than the table."""
    import onnxruntime as ort

    from ..sources.onnx_source import onnx_opset

    here = tuple(int(p) for p in ort.__version__.split(".")[:2])
    contrib = any(n.domain not in ("", "ai.onnx") for n in proto.graph.node)
    opset, ir = onnx_opset(proto), int(proto.ir_version)
    if contrib or opset > max(_ORT_FOR_OPSET) or ir > max(_ORT_FOR_IR):
        need = here
    else:
        need = max(_ORT_FOR_OPSET.get(opset, (1, 13)), _ORT_FOR_IR.get(ir, (1, 13)))
    return f"{need[0]}.{need[1]}.0"


def _tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime as ort

    return {"onnx": onnx.__version__, "onnxruntime": ort.__version__}
