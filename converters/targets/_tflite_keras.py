"""Keras and SavedModel sources to TFLite with ``tf.lite.TFLiteConverter.from_saved_model``.

Keras 3 models do not convert with ``from_keras_model``; the source exports a SavedModel
whose serving signature is keyed by the source's input and output names, and that folder
is converted. Only TFLite builtin ops are allowed, so the model runs on a plain LiteRT
interpreter (no TensorFlow "flex" delegate on the device).
"""

from __future__ import annotations

import re
from typing import Any

from edgekit.data import Dataset
from edgekit.errors import ConversionError, UsageError

from .._registry import LoadedSource, Progress, TargetResult
from ..options import ConvertOptions
from .tflite_target import MAX_CALIBRATION_SAMPLES, make_result, representative


def _configure(conv: Any, tf: Any, opts: ConvertOptions, calibration: Dataset | None,
               names: dict[str, str]) -> dict[str, Any]:
    """Set the converter up for the mode; return the recipe that records it."""
    recipe: dict[str, Any] = {"converter": "tf.lite.TFLiteConverter.from_saved_model",
                              "quantize": opts.quantize}
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if opts.quantize == "none":
        return recipe
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    recipe["optimizations"] = ["DEFAULT"]
    if opts.quantize == "fp16":
        conv.target_spec.supported_types = [tf.float16]
        recipe["weights"] = "float16"
        return recipe
    recipe["weights"] = "int8"
    recipe["per_channel"] = opts.per_channel
    if not opts.per_channel:
        # The converter has no public switch for per-tensor weights.
        conv._experimental_disable_per_channel = True
    if opts.quantize == "dynamic":
        recipe["activations"] = "float32, quantized at run time"
        return recipe
    assert calibration is not None
    conv.representative_dataset = lambda: representative(calibration, names)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    recipe.update({
        "activations": "int8",
        "calibration": {"method": "minmax", "data": calibration.source,
                        "samples": min(len(calibration), MAX_CALIBRATION_SAMPLES)},
        "int8_io": opts.int8_io,
    })
    if opts.int8_io:
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    return recipe


def convert_keras(source: LoadedSource, opts: ConvertOptions, calibration: Dataset | None,
                  progress: Progress) -> TargetResult:
    """Convert a :class:`KerasSource` to TFLite in ``opts.quantize`` mode.

    Raises:
        UsageError: the source is not a Keras source.
        ConversionError: the TFLite converter failed (for example on ops outside the TFLite
            builtins).
    """
    from ..sources.keras_source import KerasSource

    if not isinstance(source, KerasSource):
        raise UsageError(f"expected a Keras source, got {type(source).__name__}")
    import tensorflow as tf

    names = {s.name: s.name for s in source.inputs}
    with source.saved_model() as saved:
        progress(f"TFLite converter on SavedModel signature '{saved.signature}'")
        try:
            conv = tf.lite.TFLiteConverter.from_saved_model(
                str(saved.path), signature_keys=[saved.signature])
            recipe = _configure(conv, tf, opts, calibration, names)
            model = bytes(conv.convert())
        except Exception as exc:  # the converter raises ConverterError and others
            raise ConversionError(
                f"the TFLite converter failed ({opts.quantize}): {_explain(exc)}",
                hint="ops outside the TFLite builtins are not supported; try --to onnx",
            ) from exc
    return make_result(model, source, recipe, {"tensorflow": str(tf.__version__)}, [])


def _explain(exc: Exception) -> str:
    """The converter's error in one line: the ops it could not map, else its first line."""
    text = str(exc)
    ops = sorted(set(re.findall(r"'([\w.]+)' op is neither a custom op nor a flex op", text)))
    if ops:
        return f"the model uses ops outside the TFLite builtins: {', '.join(ops)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:500] if lines else type(exc).__name__
