"""PyTorch sources to TFLite with litert-torch, quantized with the AI Edge Quantizer.

litert-torch converts at the example's batch (1 for modules and TorchScript; a ``.pt2``
keeps its own fixed batch): its lowering does not keep a symbolic batch through reshapes,
so the model has a fixed batch and the LiteRT runtime runs larger batches in slices.
litert-torch ignores converter quantization flags, so the float model is quantized
afterwards with the AI Edge Quantizer recipes:

- ``dynamic``: int8 weights (per channel or per tensor), activations quantized at run time;
- ``fp16``: float16 weights, dequantized to float32 at load (``float_casting``);
- ``int8``: int8 weights and activations with min/max calibration on the representative
  data; float32 model inputs and outputs unless ``int8_io``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from edgekit.data import Dataset
from edgekit.errors import ConversionError, UsageError

from .._registry import LoadedSource, Progress, TargetResult
from ..options import ConvertOptions
from .tflite_target import (
    ARG_PREFIX,
    MAX_CALIBRATION_SAMPLES,
    load_interpreter,
    make_result,
    match_names,
    representative,
    signature_keys,
)

_PROGRESS_ENV = "LITERT_TORCH_SHOW_PROGRESS"


@contextmanager
def _quiet_litert_torch() -> Iterator[None]:
    """litert-torch prints a progress tree to stdout; keep the CLI's output (and --json) clean."""
    before = os.environ.get(_PROGRESS_ENV)
    os.environ[_PROGRESS_ENV] = "n"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_PROGRESS_ENV, None)
        else:
            os.environ[_PROGRESS_ENV] = before


def _named_outputs(source: Any) -> Any:
    """The source module wrapped to return a dict keyed by the source's output names, so the
    TFLite signature's output keys are those names."""
    import torch

    from ..sources.torch_source import _flatten_outputs

    names = list(source.output_names)

    class NamedOutputs(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any) -> dict[str, Any]:
            flat, _ = _flatten_outputs(self.inner(*args))
            return dict(zip(names, flat, strict=True))

    wrapper = NamedOutputs(source.module)
    # Only the wrapper's own flag: the source module is in eval mode already, and the module
    # of a torch.export program refuses train()/eval() calls.
    wrapper.training = False
    return wrapper


def _float_model(source: Any, progress: Progress) -> tuple[bytes, dict[str, str]]:
    try:
        import litert_torch
    except ImportError as exc:
        raise ConversionError(f"PyTorch to TFLite needs litert-torch ({exc})",
                              hint="pip install litert-torch") from exc
    progress("litert-torch: exporting and lowering to TFLite")
    try:
        with _quiet_litert_torch():
            model = litert_torch.convert(_named_outputs(source), tuple(source.example_args))
            data = bytes(model.model_content())
    except Exception as exc:  # torch.export and the lowering raise many types
        text = str(exc).strip().splitlines()
        raise ConversionError(
            f"litert-torch could not convert the model: {text[0] if text else repr(exc)}",
            hint="the model must be traceable by torch.export; try --to onnx",
        ) from exc
    return data, {"litert-torch": _version("litert-torch")}


def _global_min_max(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    return {**new, "min": np.minimum(old["min"], new["min"]),
            "max": np.maximum(old["max"], new["max"])}


def _recipe(opts: ConvertOptions) -> tuple[Any, dict[str, Any]]:
    """The AI Edge Quantizer recipe manager for the mode, and what the manifest records."""
    from ai_edge_quantizer import qtyping, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    ops = qtyping.TFLOperationName
    granularity = (qtyping.QuantGranularity.CHANNELWISE if opts.per_channel
                   else qtyping.QuantGranularity.TENSORWISE)
    manager = recipe_manager.RecipeManager()
    info: dict[str, Any] = {"quantizer": "ai_edge_quantizer"}
    if opts.quantize == "fp16":
        manager.add_weight_only_config(regex=".*", operation_name=ops.ALL_SUPPORTED,
                                       num_bits=16, algorithm_key=AlgorithmName.FLOAT_CASTING)
        info.update({"recipe": "weight_only_wf16_afp32", "weights": "float16"})
    elif opts.quantize == "dynamic":
        manager.add_dynamic_config(regex=".*", operation_name=ops.ALL_SUPPORTED, num_bits=8,
                                   granularity=granularity)
        info.update({"recipe": "dynamic_wi8_afp32", "weights": "int8",
                     "per_channel": opts.per_channel,
                     "activations": "float32, quantized at run time"})
        if not opts.per_channel:
            # LiteRT's hybrid depthwise kernel reads garbage from per-tensor weights (measured:
            # accuracy falls to chance); depthwise convolutions keep per-channel scales.
            manager.add_dynamic_config(regex=".*", operation_name=ops.DEPTHWISE_CONV_2D,
                                       num_bits=8,
                                       granularity=qtyping.QuantGranularity.CHANNELWISE)
            info["per_channel_ops"] = ["DEPTHWISE_CONV_2D"]
    else:
        manager.add_static_config(regex=".*", operation_name=ops.ALL_SUPPORTED,
                                  activation_num_bits=8, weight_num_bits=8,
                                  weight_granularity=granularity)
        if not opts.int8_io:
            # The static recipe quantizes the graph's inputs and outputs too; keeping them in
            # float inserts the quantize/dequantize ops inside the model instead.
            for op in (ops.INPUT, ops.OUTPUT):
                manager.add_quantization_config(".*", op, algorithm_key=AlgorithmName.NO_QUANTIZE)
        info.update({"recipe": "static_wi8_ai8", "weights": "int8", "activations": "int8",
                     "per_channel": opts.per_channel, "int8_io": opts.int8_io})
    return manager, info


def _quantize(model: bytes, source: LoadedSource, opts: ConvertOptions,
              calibration: Dataset | None, progress: Progress) -> tuple[bytes, dict[str, Any]]:
    try:
        from ai_edge_quantizer import quantizer
    except ImportError as exc:
        raise ConversionError(f"quantizing a PyTorch TFLite model needs ai-edge-quantizer ({exc})",
                              hint="pip install ai-edge-quantizer") from exc
    from ai_edge_quantizer import calibrator

    manager, info = _recipe(opts)
    step = "setup"
    try:
        with warnings.catch_warnings():
            # The calibrator and the quantizer's checks keep every tensor on purpose; LiteRT
            # warns that this is meant for debugging.
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
            q = quantizer.Quantizer(model, manager.get_quantization_recipe())
            calibrated = None
            if manager.need_calibration():
                assert calibration is not None
                step = "calibration"
                progress("AI Edge Quantizer: calibrating")
                key, ins, _ = signature_keys(load_interpreter(model))
                names = match_names([s.name for s in source.inputs], list(ins),
                                    ARG_PREFIX, "inputs")
                # The quantizer's default update is a moving average of per-sample ranges,
                # which on batch-1 samples clips the extremes; take the global min/max.
                calib = calibrator.Calibrator(model, qsv_update_func=_global_min_max)
                dtypes = {k: d["dtype"] for k, d in ins.items()}
                calib.calibrate({key: list(representative(calibration, names, dtypes))},
                                manager)
                calibrated = calib.get_model_qsvs()
                info["calibration"] = {"method": "minmax", "data": calibration.source,
                                       "samples": min(len(calibration), MAX_CALIBRATION_SAMPLES)}
            step = "quantization"
            progress(f"AI Edge Quantizer: {info['recipe']}")
            out = q.quantize(calibrated, enable_progress_report=False).quantized_model
    except ConversionError:
        raise
    except Exception as exc:  # the quantizer raises ValueError/RuntimeError and others
        raise ConversionError(f"the AI Edge Quantizer failed during {step} ({opts.quantize}):"
                              f" {exc}") from exc
    if out is None:
        raise ConversionError(f"the AI Edge Quantizer returned no model ({opts.quantize})")
    return bytes(out), info


def convert_torch(source: LoadedSource, opts: ConvertOptions, calibration: Dataset | None,
                  progress: Progress) -> TargetResult:
    """Convert a :class:`TorchSource` to TFLite in ``opts.quantize`` mode.

    Raises:
        UsageError: the source is not a PyTorch source.
        ConversionError: litert-torch or the AI Edge Quantizer failed; the message says which.
    """
    from ..sources.torch_source import TorchSource

    if not isinstance(source, TorchSource):
        raise UsageError(f"expected a PyTorch source, got {type(source).__name__}")
    model, tools = _float_model(source, progress)
    recipe: dict[str, Any] = {"converter": "litert_torch.convert", "quantize": opts.quantize}
    if opts.quantize != "none":
        model, info = _quantize(model, source, opts, calibration, progress)
        recipe.update(info)
        tools["ai-edge-quantizer"] = _version("ai-edge-quantizer")
    notes = list(source.notes)
    return make_result(model, source, recipe, tools, notes)


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
