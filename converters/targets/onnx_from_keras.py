"""Keras and SavedModel sources to float ONNX with Keras' own exporter (tf2onnx underneath).

A ``keras.Model`` is exported with ``model.export(path, format="onnx")``; a SavedModel
folder is wrapped in a Keras model around its serving signature first. The graph's inputs and
outputs are then renamed to the source's names and its batch dimension to ``batch``, so
the ONNX target, the manifest and the data files all use one set of names.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from pathlib import Path
from typing import Any

from edgekit.errors import ConversionError, UsageError

from .._registry import LoadedSource, OnnxExport, Progress, register_onnx_exporter
from ..options import ConvertOptions

__all__ = ["export_keras_onnx"]

EXPORTER = "keras.export(tf2onnx)"


def _export_model(source: Any) -> Any:
    """The Keras model to export: the source's own, or one wrapping its SavedModel."""
    if source.model is not None:
        return source.model
    import keras

    class SignatureLayer(keras.layers.TFSMLayer):  # type: ignore[misc]
        """Calls the serving signature by keyword: its arguments are keyword-only, which
        ``TFSMLayer`` (positional) cannot bind for more than one input."""

        def call(self, inputs: dict[str, Any], training: bool = False) -> Any:
            return self.call_endpoint_fn(**inputs)

    assert source.saved is not None
    layer = SignatureLayer(str(source.saved.path), call_endpoint=source.saved.signature)
    inputs = [keras.Input(shape=tuple(d if isinstance(d, int) else None for d in s.shape[1:]),
                          dtype=s.dtype, name=s.name) for s in source.inputs]
    outputs = layer({i.name: i for i in inputs})
    return keras.Model(inputs, outputs)


def _rename(model: Any, source: LoadedSource, batch_dim: bool) -> None:
    """Give graph inputs and outputs the source's names and the batch dimension ``batch``."""
    graph = model.graph
    renames: dict[str, str] = {}
    # Names that already match are kept; otherwise tf2onnx's order is the source's order
    # (it follows the input signature and the flattened outputs).
    for values, specs in ((graph.input, source.inputs), (graph.output, source.outputs)):
        if {v.name for v in values} != {s.name for s in specs}:
            renames.update((v.name, s.name) for v, s in zip(values, specs, strict=True) if v.name != s.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in list(graph.input) + list(graph.output):
        value.name = renames.get(value.name, value.name)
        dims = value.type.tensor_type.shape.dim
        if batch_dim and len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"


@register_onnx_exporter("keras")
def export_keras_onnx(source: LoadedSource, opts: ConvertOptions,
                      progress: Progress) -> OnnxExport:
    """Export a Keras model or SavedModel to float ONNX at ``opts.opset``.

    The batch dimension stays symbolic unless ``opts.dynamic_batch`` is off (then it is 1).

    Raises:
        UsageError: the source is not a Keras source.
        ConversionError: tf2onnx failed on the model, or the ONNX model does not check.
    """
    from ..sources.keras_source import KerasSource

    if not isinstance(source, KerasSource):
        raise UsageError(f"expected a Keras source, got {type(source).__name__}")
    import onnx

    model = _export_model(source)
    specs = source.tensor_specs(batch=None if opts.dynamic_batch else 1)
    signature = specs if len(specs) == 1 else [specs]
    progress(f"exporting to ONNX with {EXPORTER}, opset {opts.opset}")
    with tempfile.TemporaryDirectory(prefix="edgekit-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            model.export(str(path), format="onnx", input_signature=signature,
                         opset_version=opts.opset, verbose=False)
            proto = onnx.load(str(path))
        except Exception as exc:  # tf2onnx raises many types for ops it cannot map
            raise ConversionError(
                f"{EXPORTER} failed: {str(exc).strip().splitlines()[0] if str(exc) else exc!r}",
                hint="try --to tflite, or a newer --opset",
            ) from exc
    if len(proto.graph.input) != len(source.inputs) or len(proto.graph.output) != len(
            source.outputs):
        raise ConversionError(
            f"{EXPORTER} gave {len(proto.graph.input)} inputs and {len(proto.graph.output)}"
            f" outputs; the source has {len(source.inputs)} and {len(source.outputs)}")
    _rename(proto, source, opts.dynamic_batch)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ConversionError(f"the exported ONNX model does not check: {exc}") from exc
    tools = {"keras": _version("keras"), "tf2onnx": _version("tf2onnx")}
    return OnnxExport(model=proto.SerializeToString(), exporter=EXPORTER, notes=[], tools=tools)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
