"""TFLite target: Keras / SavedModel sources through the TFLite converter, PyTorch sources
through litert-torch and the AI Edge Quantizer.

Modes: ``none`` (float32), ``dynamic`` (int8 weights, float activations quantized on the fly),
``fp16`` (float16 weights) and ``int8`` (weights and activations, calibrated on a
representative dataset; ``int8_io`` also makes the model's inputs and outputs int8, and the
manifest then records their scale and zero point so the runtime can quantize and dequantize).

TFLite names its tensors after the serving signature (``serving_default_image:0``). The
specs returned here keep the source's names and are listed in the order of the model's own
input and output tensors, matched through the serving signature; the LiteRT runtime matches
them the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from edgekit.data import Dataset
from edgekit.errors import ConversionError, DataError, UsageError
from edgekit.manifest import QuantParams, TensorSpec

from .._registry import LoadedSource, Progress, TargetBackend, TargetResult, register_target
from ..options import ConvertOptions

__all__ = [
    "ARG_PREFIX",
    "MAX_CALIBRATION_SAMPLES",
    "OUT_PREFIX",
    "TFLiteTarget",
    "describe_io",
    "load_interpreter",
    "make_result",
    "match_names",
    "representative",
    "signature_keys",
]

# How exporters name signature entries they were given no names for (litert-torch: args_0,
# output_0); such entries are matched to the source's by position.
ARG_PREFIX = "args_"
OUT_PREFIX = "output_"

MAX_CALIBRATION_SAMPLES = 500
"""Representative samples fed to the calibrator; more add time and rarely change ranges."""


def load_interpreter(model: bytes) -> Any:
    """A LiteRT interpreter for the model bytes, tensors allocated, without the default
    (XNNPACK) delegate, so its operators are the model's own.

    Raises:
        ConversionError: no LiteRT interpreter is installed, or the model does not load.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        try:
            from tensorflow.lite import Interpreter
            from tensorflow.lite.experimental import OpResolverType
        except ImportError as exc:
            raise ConversionError("no LiteRT interpreter to inspect the TFLite model",
                                  hint="pip install ai-edge-litert") from exc
    try:
        interp = Interpreter(
            model_content=bytes(model),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        interp.allocate_tensors()
    except Exception as exc:  # the interpreter raises RuntimeError/ValueError by version
        raise ConversionError(f"the converted TFLite model does not load: {exc}") from exc
    return interp


def signature_keys(interp: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The model's only signature: its key, and input and output details by signature name.

    Raises:
        ConversionError: the model has no signature or more than one.
    """
    signatures = interp.get_signature_list()
    if len(signatures) != 1:
        raise ConversionError(
            f"the TFLite model has {len(signatures)} signatures"
            f" ({', '.join(sorted(signatures)) or 'none'}); one serving signature is needed")
    key = next(iter(signatures))
    runner = interp.get_signature_runner(key)
    return key, runner.get_input_details(), runner.get_output_details()


def match_names(wanted: list[str], keys: list[str], prefix: str, what: str) -> dict[str, str]:
    """Map source names to signature keys: by name, else by position for keys
    ``<prefix>0 .. <prefix>N`` (exporters that number their arguments or results).

    Raises:
        ConversionError: neither way matches every name.
    """
    if set(wanted) <= set(keys):
        return {n: n for n in wanted}
    numbered = [f"{prefix}{i}" for i in range(len(wanted))]
    if sorted(keys) == sorted(numbered):
        return dict(zip(wanted, numbered, strict=True))
    raise ConversionError(
        f"cannot match the source's {what} ({', '.join(wanted)}) to the TFLite signature's"
        f" ({', '.join(sorted(keys))})")


def _spec(name: str, detail: dict[str, Any], shape: list[int | str]) -> TensorSpec:
    dtype = np.dtype(detail["dtype"]).name
    quant = None
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if dtype in ("int8", "uint8", "int16") and scale:
        quant = QuantParams(scale=float(scale), zero_point=int(zero_point))
    return TensorSpec(name, dtype, list(shape), quant)


def describe_io(model: bytes,
                source: LoadedSource) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, Any]]:
    """Specs of the converted model's inputs and outputs under the source's names.

    They keep the source's shapes (symbolic batch), take the model's dtypes and int8
    quantization, and come in the order of the model's own input and output tensors.
    The third value is what a device needs to know: the signature, the TFLite operators the
    model uses and whether it can be resized to another batch.

    Raises:
        ConversionError: the model's signature does not match the source.
    """
    interp = load_interpreter(model)
    key, ins, outs = signature_keys(interp)
    in_map = match_names([s.name for s in source.inputs], list(ins), ARG_PREFIX, "inputs")
    out_map = match_names([s.name for s in source.outputs], list(outs), OUT_PREFIX, "outputs")
    inputs = sorted(
        (_spec(s.name, ins[in_map[s.name]], s.shape) for s in source.inputs),
        key=lambda spec: ins[in_map[spec.name]]["index"],
    )
    outputs = sorted(
        (_spec(s.name, outs[out_map[s.name]], s.shape) for s in source.outputs),
        key=lambda spec: outs[out_map[spec.name]]["index"],
    )
    fixed = [int(d["shape_signature"][0]) for d in interp.get_input_details()
             if len(d["shape_signature"]) and d["shape_signature"][0] != -1]
    ops = sorted({str(op["op_name"]) for op in interp._get_ops_details()})
    runtime: dict[str, Any] = {"signature": key, "ops": ops,
                               "batch": fixed[0] if fixed else "dynamic"}
    return inputs, outputs, runtime


def representative(data: Dataset, names: dict[str, str],
                   dtypes: dict[str, Any] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One sample at a time, keyed by signature input name, at most
    :data:`MAX_CALIBRATION_SAMPLES` of them, cast to the model's input dtypes when given
    (litert-torch turns int64 inputs such as token ids into int32)."""
    count = min(len(data), MAX_CALIBRATION_SAMPLES)
    for i in range(count):
        yield {names[k]: v[i : i + 1] if dtypes is None else
               v[i : i + 1].astype(dtypes[names[k]], copy=False)
               for k, v in data.inputs.items()}


@register_target
class TFLiteTarget(TargetBackend):
    """TFLite flatbuffers run by LiteRT (``ai_edge_litert``, ``tflite_runtime``)."""

    KEY: ClassVar[str] = "tflite"
    FORMAT: ClassVar[str] = "tflite"
    MODEL_FILE: ClassVar[str] = "model.tflite"
    SOURCES: ClassVar[frozenset[str]] = frozenset({"keras", "pytorch"})
    QUANT_MODES: ClassVar[frozenset[str]] = frozenset({"none", "dynamic", "fp16", "int8"})

    @classmethod
    def convert(cls, source: LoadedSource, opts: ConvertOptions, calibration: Dataset | None,
                progress: Progress) -> TargetResult:
        """Convert (and quantize) a Keras, SavedModel or PyTorch source to TFLite.

        Raises:
            UsageError: the source framework or calibration method is not supported here.
            DataError: ``int8`` without calibration data.
            ConversionError: the converter or quantizer failed; the message says which.
        """
        if opts.quantize not in cls.QUANT_MODES:
            raise UsageError(f"--quantize {opts.quantize} is not supported for --to tflite")
        if opts.quantize == "int8":
            if calibration is None:
                raise DataError("--quantize int8 needs calibration data",
                                hint="pass --calibration calib.npz (a few hundred samples)")
            if opts.calibration_method != "minmax":
                raise UsageError(
                    f"--calibration-method {opts.calibration_method} is not available for"
                    " --to tflite: the TFLite calibrators use min/max ranges",
                    hint="use --calibration-method minmax, or --to onnx for entropy/percentile",
                )
        if source.framework == "keras":
            from ._tflite_keras import convert_keras

            return convert_keras(source, opts, calibration, progress)
        if source.framework == "pytorch":
            from ._tflite_torch import convert_torch

            return convert_torch(source, opts, calibration, progress)
        raise UsageError(f"{source.framework} models cannot be converted to tflite"
                         f" (this target takes: {', '.join(sorted(cls.SOURCES))})")


def make_result(model: bytes, source: LoadedSource, recipe: dict[str, Any],
                tools: dict[str, str], notes: list[str]) -> TargetResult:
    """Package the converted bytes with specs matched to the source.

    Raises:
        ConversionError: the model does not load or its signature does not match the source.
    """
    inputs, outputs, runtime = describe_io(model, source)
    if runtime["batch"] != "dynamic":
        notes.append(
            f"the TFLite model has a fixed batch of {runtime['batch']}; the runtime runs larger"
            " batches in slices of that size")
    quantized = [s.name for s in inputs + outputs if s.quantization is not None]
    if quantized:
        recipe["quantized_io"] = quantized
    return TargetResult(model=model, inputs=inputs, outputs=outputs, recipe=recipe,
                        runtime=runtime, notes=notes, tools=tools)
