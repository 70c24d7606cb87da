"""Conversion options, typed and validated in one place; an error names the option."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from edgekit.calibration import METHODS as ESTIMATE_METHODS
from edgekit.errors import UsageError

__all__ = ["CALIBRATION_METHODS", "ESTIMATE_METHODS", "QUANT_MODES", "TASKS", "ConvertOptions",
           "parse_input_shape"]

QUANT_MODES = ("none", "fp16", "dynamic", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
TASKS = ("auto", "classification", "regression", "embedding")
EXPORTERS = ("auto", "dynamo", "torchscript")
TARGETS = ("onnx", "tflite")
_DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")


@dataclass
class ConvertOptions:
    """Every knob of a conversion. Each field has a default; ``validate`` checks them all."""

    target: str = field(default="onnx", metadata={"help": "onnx or tflite"})
    quantize: str = field(default="none", metadata={"help": "none, fp16, dynamic or int8"})
    per_channel: bool = field(default=True, metadata={"help": "int8 weights per channel"})
    calibration_method: str = field(default="minmax", metadata={"help": "minmax, entropy, percentile"})
    int8_io: bool = field(default=False, metadata={"help": "TFLite int8: int8 model inputs/outputs"})
    opset: int = field(default=17, metadata={"help": "ONNX opset (17 or newer)"})
    exporter: str = field(default="auto", metadata={"help": "torch ONNX exporter: auto, dynamo, torchscript"})
    optimize_graph: bool = field(default=True, metadata={"help": "apply onnxruntime graph optimizations offline"})
    nodes_to_exclude: list[str] = field(default_factory=list, metadata={"help": "ONNX nodes kept in float"})
    float_fallback_cosine: float | None = field(default=None, metadata={"help": "ONNX int8: keep nodes in float until every calibration sample's output cosine to the float graph reaches this"})
    outlier_channels: int = field(default=4, metadata={"help": "ONNX dynamic int8 of a fused transformer with calibration data: per matrix product, up to this many input channels whose calibration range is 8x the median channel's stay in a float product (0: off)"})
    smooth_alpha: float = field(default=0.65, metadata={"help": "ONNX dynamic int8 of a fused transformer with calibration data: a matrix product after a layer normalization whose input has a channel 8x the median channel's range gets SmoothQuant scaling, this share of the spread moved to the weights (0: off)"})
    trim_padding: bool = field(default=True, metadata={"help": "ONNX: a graph with an attention_mask input computes only up to the last position the mask keeps (kept when its outputs do not change on a padded example)"})
    name: str | None = field(default=None, metadata={"help": "artifact name (default: source file stem)"})
    version: str | None = field(default=None, metadata={"help": "dotted version (default: 0.1.0; the CLI takes the next patch from the registry)"})
    task: str = field(default="auto", metadata={"help": "auto, classification, regression, embedding"})
    labels: list[str] | None = field(default=None, metadata={"help": "class names"})
    input_shapes: dict[str, list[int]] = field(default_factory=dict, metadata={"help": "name -> shape"})
    input_dtypes: dict[str, str] = field(default_factory=dict, metadata={"help": "name -> dtype"})
    dynamic_batch: bool = field(default=True, metadata={"help": "symbolic batch dimension"})
    atol: float = field(default=1e-3, metadata={"help": "parity: max abs error for unquantized modes"})
    min_cosine: float = field(default=0.99, metadata={"help": "parity: minimum mean cosine"})
    min_top1: float = field(default=0.97, metadata={"help": "parity: minimum top-1 agreement"})
    strict: bool = field(default=False, metadata={"help": "parity failure is an error"})
    golden_count: int = field(default=4, metadata={"help": "golden samples stored in the package"})
    golden_atol: float = field(default=1e-4, metadata={"help": "tolerance for golden checks on device"})
    golden_rtol: float = field(default=1e-3, metadata={"help": "relative tolerance for golden checks"})
    threads: int = field(default=1, metadata={"help": "threads for latency measurement"})
    latency_runs: int = field(default=50, metadata={"help": "timed runs for the latency figure"})
    estimate_method: str = field(default="logistic", metadata={"help": "accuracy estimate: logistic, atc or isotonic"})

    def validate(self) -> ConvertOptions:
        """Check every field and collect all problems into one error.

        Raises:
            UsageError: lists each bad option with its allowed values.
        """
        problems = []
        for key, allowed in (
            ("target", TARGETS), ("quantize", QUANT_MODES),
            ("calibration_method", CALIBRATION_METHODS), ("task", TASKS),
            ("exporter", EXPORTERS), ("estimate_method", ESTIMATE_METHODS),
        ):
            value = getattr(self, key)
            if value not in allowed:
                problems.append(f"{key}: {value!r} is not one of {', '.join(allowed)}")
        if self.opset < 17:
            problems.append(f"opset: {self.opset} is below 17, the oldest supported")
        for key in ("atol", "golden_atol", "golden_rtol"):
            if getattr(self, key) < 0:
                problems.append(f"{key}: must be >= 0")
        for key in ("min_cosine", "min_top1"):
            if not 0 <= getattr(self, key) <= 1:
                problems.append(f"{key}: must be between 0 and 1")
        if self.float_fallback_cosine is not None and not 0 < self.float_fallback_cosine <= 1:
            problems.append("float_fallback_cosine: must be above 0 and at most 1")
        if self.outlier_channels < 0:
            problems.append("outlier_channels: must be >= 0 (0 turns the split off)")
        if not 0 <= self.smooth_alpha < 1:
            problems.append("smooth_alpha: must be >= 0 and below 1 (0 turns the scaling off)")
        if self.golden_count < 1:
            problems.append("golden_count: at least 1 golden sample is needed")
        if self.threads < 0 or self.latency_runs < 1:
            problems.append("threads must be >= 0 and latency_runs >= 1")
        if self.int8_io and not (self.target == "tflite" and self.quantize == "int8"):
            problems.append("int8_io: only for --to tflite --quantize int8")
        for name, dtype in self.input_dtypes.items():
            if dtype not in _DTYPES:
                problems.append(f"input_dtypes.{name}: {dtype!r} is not one of {', '.join(_DTYPES)}")
        if self.version is not None:
            if not re.fullmatch(r"\d+(\.\d+)*", self.version):
                problems.append(f"version: {self.version!r} must be digits and dots, e.g. 1.2.0")
        if problems:
            raise UsageError("invalid conversion options:\n  - " + "\n  - ".join(problems))
        return self

    def replace(self, **changes: Any) -> ConvertOptions:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(data)
        if unknown:
            raise UsageError(f"unknown conversion options: {', '.join(sorted(unknown))}")
        data.update(changes)
        return ConvertOptions(**data).validate()


def parse_input_shape(text: str) -> tuple[str, list[int], str | None]:
    """Parse ``name:1x3x32x32`` or ``name:1x128:int64``.

    Raises:
        UsageError: the text does not follow that form.
    """
    match = re.fullmatch(r"([^:]+):(\d+(?:x\d+)*)(?::(\w+))?", text.strip())
    if not match:
        raise UsageError(
            f"--input-shape {text!r} is not NAME:DxDxD[:DTYPE]",
            hint="for example --input-shape x:1x1x8x8 or input_ids:1x128:int64",
        )
    dims = [int(d) for d in match.group(2).split("x")]
    if any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape {text!r}: dimensions must be positive")
    return match.group(1), dims, match.group(3)
