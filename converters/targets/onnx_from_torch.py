"""PyTorch sources to float ONNX, with the exporter that gives the faster graph.

Two exporters ship with torch: ``torch.onnx.export(dynamo=True)`` (torch.export and
onnxscript) and the legacy TorchScript exporter (``dynamo=False``). They emit different
graphs for the same weights, and onnxruntime does not always run them equally fast. With
``exporter="auto"`` both are exported, checked against PyTorch on the example input and
timed in onnxruntime with the same thread count; the faster one is kept and both timings go
into the recipe. An exporter that fails is noted and the other one is used.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from edgekit.errors import ConversionError, UsageError

from .._registry import LoadedSource, OnnxExport, Progress, register_onnx_exporter
from ..options import ConvertOptions
from ..sources.torch_source import quiet_logs as _quiet_logs

__all__ = ["export_torch_onnx", "time_onnx_models"]

# The dynamo exporter's own operator set starts at 18; asking it for less makes it
# convert down afterwards, which can fail, so it exports at 18 or newer.
_DYNAMO_MIN_OPSET = 18
_TIMING_ROUNDS = 30
_TIMING_WARMUP = 3
# Timings closer than this are a tie (noise on a shared machine is about this size).
_TIE_MARGIN = 0.03


@register_onnx_exporter("pytorch")
def export_torch_onnx(source: LoadedSource, opts: ConvertOptions,
                      progress: Progress) -> OnnxExport:
    """Export a :class:`TorchSource` to float ONNX with ``opts.exporter``.

    Raises:
        UsageError: the source is not a PyTorch source.
        ConversionError: every exporter tried failed; the message gives each one's error.
    """
    from ..sources.torch_source import TorchSource

    if not isinstance(source, TorchSource):
        raise UsageError(f"expected a PyTorch source, got {type(source).__name__}")
    names = ["torchscript", "dynamo"] if opts.exporter == "auto" else [opts.exporter]
    exports: dict[str, bytes] = {}
    failures: dict[str, str] = {}
    for name in names:
        progress(f"exporting to ONNX with the {name} exporter")
        try:
            exports[name] = _EXPORTERS[name](source, opts)
        except Exception as exc:  # exporters raise anything on ops they cannot map
            failures[name] = _first_line(exc)
    if not exports:
        raise ConversionError(
            "the PyTorch model could not be exported to ONNX:\n  - "
            + "\n  - ".join(f"{n} exporter: {msg}" for n, msg in failures.items()),
            hint="try " + ", ".join([*(f"--exporter {n}" for n in _EXPORTERS if n not in names),
                                     "another --opset", "--to tflite"]),
        )
    notes = list(source.notes)
    notes += [f"the {n} exporter failed ({msg}); used the other one" for n, msg in failures.items()]
    recipe: dict[str, Any] = {"exporters_tried": names}
    if failures:
        recipe["exporter_failures"] = failures
    feeds = {n: t.detach().numpy()
             for n, t in zip(source.input_names, source.example_args, strict=True)}
    if len(exports) > 1:
        exports, rejected = _drop_mismatching(exports, source, feeds, opts.atol)
        notes += rejected
        progress("timing the exported graphs in onnxruntime")
        timings = time_onnx_models(exports, feeds, opts.threads)
        recipe["exporter_latency_ms"] = timings
        recipe["exporter_timing"] = {"runs": _TIMING_ROUNDS, "threads": opts.threads,
                                     "batch": int(source.example_args[0].shape[0]),
                                     "statistic": "median"}
        chosen = _faster(timings)
    else:
        chosen = next(iter(exports))
    recipe["exporter"] = chosen
    return OnnxExport(model=exports[chosen], exporter=chosen, notes=notes,
                      tools=_tools(chosen), recipe=recipe)


def _export_torchscript(source: Any, opts: ConvertOptions) -> bytes:
    """The legacy exporter: traces the module (or takes a ScriptModule as it is)."""
    import torch

    model = source.scripted if source.scripted is not None else source.module
    axes = _dynamic_axes(source) if source.dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # PRESERVE: the module is already in eval mode, and a torch.export program's
        # module refuses the train()/eval() calls the exporter would otherwise make.
        # The legacy exporter writes to a file object as well; torch's hint names paths only.
        torch.onnx.export(model, source.example_args, buf, dynamo=False,  # type: ignore[arg-type]
                          input_names=source.input_names, output_names=source.output_names,
                          dynamic_axes=axes, opset_version=opts.opset, do_constant_folding=True,
                          training=torch.onnx.TrainingMode.PRESERVE)
    return buf.getvalue()


def _export_dynamo(source: Any, opts: ConvertOptions) -> bytes:
    """The torch.export-based exporter, with a symbolic batch dimension."""
    import torch

    args = source.example_args
    shapes = None
    # A program carries its own dynamic dims; without a dynamic batch its module is traced
    # at the example's batch instead, so both exporters give the same fixed shapes.
    use_program = source.program is not None and source.dynamic_batch
    model = source.program if use_program else source.module
    if not use_program and source.dynamic_batch:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} for _ in args)
        # A batch of 1 would be specialised to a constant; trace with 2.
        args = tuple(t.expand(2, *t.shape[1:]).contiguous() for t in args)
    # torch prints the traced graph to stderr when export fails; the error we raise (or
    # the note, when the other exporter is used) already says what went wrong.
    with warnings.catch_warnings(), _quiet_logs("onnxscript"), _quiet_logs("torch"), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, args, dynamo=True, input_names=source.input_names,
                                    output_names=source.output_names, dynamic_shapes=shapes,
                                    opset_version=max(opts.opset, _DYNAMO_MIN_OPSET),
                                    verbose=False, report=False)
    if program is None:
        raise ConversionError("the dynamo exporter returned no program")
    proto = program.model_proto
    if source.dynamic_batch:
        _name_batch_dim(proto)
    return bytes(proto.SerializeToString())


def _name_batch_dim(proto: Any) -> None:
    """Call the batch dimension ``batch``, as the other exporters do (a program's own
    symbol is a generated name such as ``s77``)."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    symbol = dims[0].dim_param if len(dims) else ""
    if not symbol or symbol == "batch":
        return
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"


def _faster(timings: dict[str, float]) -> str:
    """The faster export; within the margin, the TorchScript one, whose older opset and IR
    version run on older onnxruntime releases and whose choice stays the same run to run."""
    best = min(timings, key=lambda n: timings[n])
    if "torchscript" in timings and timings["torchscript"] <= timings[best] * (1 + _TIE_MARGIN):
        return "torchscript"
    return best


_EXPORTERS: dict[str, Callable[[Any, ConvertOptions], bytes]] = {
    "torchscript": _export_torchscript,
    "dynamo": _export_dynamo,
}


def _dynamic_axes(source: Any) -> dict[str, dict[int, str]]:
    return {name: {0: "batch"} for name in [*source.input_names, *source.output_names]}


def _drop_mismatching(exports: dict[str, bytes], source: Any, feeds: dict[str, np.ndarray],
                      atol: float) -> tuple[dict[str, bytes], list[str]]:
    """Keep the exports whose outputs match PyTorch on the example (all, if none does)."""
    import onnxruntime as ort

    ref = source.predict(feeds)
    kept: dict[str, bytes] = {}
    notes = []
    for name, model in exports.items():
        sess = ort.InferenceSession(model, _session_options(ort, 1),
                                    providers=["CPUExecutionProvider"])
        out = sess.run(source.output_names, feeds)
        err = max(float(np.max(np.abs(np.asarray(o, dtype=np.float64) - ref[n])))
                  for n, o in zip(source.output_names, out, strict=True))
        if err <= atol:
            kept[name] = model
        else:
            notes.append(f"the {name} exporter's graph differs from PyTorch by {err:.3g}"
                         f" (> atol {atol:g}); not used")
    return (kept, notes) if kept else (exports, [])


def time_onnx_models(models: dict[str, bytes], feeds: dict[str, np.ndarray],
                     threads: int) -> dict[str, float]:
    """Median latency (ms) of each model in onnxruntime on the same feeds and thread count.

    Runs are interleaved (one of each model per round), so drift on a busy machine hits
    all of them alike.
    """
    import onnxruntime as ort

    sessions = {}
    for name, model in models.items():
        sess = ort.InferenceSession(model, _session_options(ort, threads),
                                    providers=["CPUExecutionProvider"])
        wanted = {i.name for i in sess.get_inputs()}
        sessions[name] = (sess, {k: v for k, v in feeds.items() if k in wanted})
    samples: dict[str, list[float]] = {name: [] for name in models}
    for sess, f in sessions.values():
        for _ in range(_TIMING_WARMUP):
            sess.run(None, f)
    for _ in range(_TIMING_ROUNDS):
        for name, (sess, f) in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, f)
            samples[name].append((time.perf_counter() - t0) * 1000.0)
    return {name: round(float(np.median(s)), 4) for name, s in samples.items()}


def _session_options(ort: Any, threads: int) -> Any:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def _tools(exporter: str) -> dict[str, str]:
    dists = ["torch", "onnxscript"] if exporter == "dynamo" else ["torch"]
    tools = {}
    for dist in dists:
        try:
            tools[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return tools


def _first_line(exc: BaseException) -> str:
    """The root cause, in one line: the exporters wrap the error that says what is wrong
    (an unsupported op, a data-dependent branch) in ones that only name the failed step."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = _ANSI.sub("", str(exc)).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
