"""Model in, ``.edgepkg`` out: export, quantize and validate PyTorch, Keras and ONNX models.

Heavy frameworks (torch, tensorflow, onnx) are imported inside the backend that needs them,
so importing this package stays cheap.
"""

from __future__ import annotations

from . import sources as _sources  # noqa: F401  (registers the loaders)
from . import targets as _targets  # noqa: F401  (registers the targets)
from ._registry import (
    LoadedSource,
    SourceRef,
    TargetResult,
    onnx_exporters,
    source_loaders,
    target_backends,
)
from .options import ConvertOptions, parse_input_shape
from .pipeline import ConversionResult, convert, load_source, run_batches
from .variants import VariantsResult, convert_variants, parse_variants

__all__ = [
    "ConversionResult",
    "ConvertOptions",
    "LoadedSource",
    "SourceRef",
    "TargetResult",
    "VariantsResult",
    "convert",
    "convert_variants",
    "load_source",
    "onnx_exporters",
    "parse_input_shape",
    "parse_variants",
    "run_batches",
    "source_loaders",
    "supported_pairs",
    "target_backends",
]


def supported_pairs() -> list[tuple[str, str, str]]:
    """Every (source framework, target, quantization mode) the registered backends declare."""
    return sorted(
        (framework, key, mode)
        for key, backend in target_backends().items()
        for framework in backend.SOURCES
        for mode in backend.QUANT_MODES
    )
