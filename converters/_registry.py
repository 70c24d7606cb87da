"""Registries of source loaders and target backends, with the interfaces they implement.

A source loader turns what the user names (a file, a factory, an in-memory model) into a
:class:`LoadedSource`. A target backend turns a loaded source into model bytes for one
runtime. Both register by name with an explicit decorator; a backend declares the source
frameworks and quantization modes it supports, and a test checks that every declared
(source, target, mode) triple has a tiny model that converts and runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from edgekit.data import Dataset
from edgekit.errors import ModelError
from edgekit.manifest import TensorSpec

from .options import ConvertOptions

__all__ = [
    "LoadedSource",
    "SourceLoader",
    "SourceRef",
    "TargetBackend",
    "TargetResult",
    "register_source",
    "register_target",
    "source_loaders",
    "target_backends",
]

Progress = Callable[[str], None]


@dataclass
class SourceRef:
    """What the user named as the source: a path, a ``module:factory`` spec, or an object."""

    path: Path | None = None
    factory: str | None = None
    obj: Any = None
    weights: Path | None = None
    example: dict[str, np.ndarray] | None = None
    # Where the example came from ("calibration data c.npz"), for the error when it does
    # not fit the model.
    example_source: str = "the example input"

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        if self.factory is not None:
            return self.factory
        return f"in-memory {type(self.obj).__name__}"


class LoadedSource(ABC):
    """A source model ready to export. ``predict`` is the reference for parity."""

    framework: ClassVar[str]

    def __init__(self, ref: SourceRef, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 sha256: str | None) -> None:
        self.ref = ref
        self.inputs = inputs
        self.outputs = outputs
        self.sha256 = sha256

    @abstractmethod
    def predict(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the source model on one batch, outputs keyed by output name."""

    def framework_version(self) -> dict[str, str]:
        return {}


class SourceLoader(ABC):
    """Recognises and loads one kind of source."""

    KEY: ClassVar[str]

    @classmethod
    @abstractmethod
    def accepts(cls, ref: SourceRef) -> bool:
        """Whether this loader handles the reference (by suffix, folder layout or type)."""

    @classmethod
    @abstractmethod
    def load(cls, ref: SourceRef, opts: ConvertOptions) -> LoadedSource:
        """Load the model.

        Raises:
            ModelError: missing, corrupt or unsupported model, or no example input.
        """


@dataclass
class TargetResult:
    """What a target backend produced."""

    model: bytes
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    recipe: dict[str, Any]
    runtime: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    tools: dict[str, str] = field(default_factory=dict)


class TargetBackend(ABC):
    """Converts a loaded source into one artifact format."""

    KEY: ClassVar[str]
    FORMAT: ClassVar[str]
    MODEL_FILE: ClassVar[str]
    SOURCES: ClassVar[frozenset[str]]
    QUANT_MODES: ClassVar[frozenset[str]]

    @classmethod
    @abstractmethod
    def convert(cls, source: LoadedSource, opts: ConvertOptions, calibration: Dataset | None,
                progress: Progress) -> TargetResult:
        """Export (and quantize) the source.

        Raises:
            ConversionError: the exporter or quantizer failed; the message says which step.
            DataError: the mode needs calibration data that was not given.
        """


_S = TypeVar("_S", bound=type[SourceLoader])
_T = TypeVar("_T", bound=type[TargetBackend])
_SOURCES: dict[str, type[SourceLoader]] = {}
_TARGETS: dict[str, type[TargetBackend]] = {}


def register_source(cls: _S) -> _S:
    """Class decorator: register a source loader under its ``KEY``."""
    _SOURCES[cls.KEY] = cls
    return cls


def register_target(cls: _T) -> _T:
    """Class decorator: register a target backend under its ``KEY``."""
    _TARGETS[cls.KEY] = cls
    return cls


def source_loaders() -> dict[str, type[SourceLoader]]:
    return dict(_SOURCES)


def target_backends() -> dict[str, type[TargetBackend]]:
    return dict(_TARGETS)


def find_loader(ref: SourceRef) -> type[SourceLoader]:
    """The loader that accepts ``ref``.

    Raises:
        ModelError: no loader recognises it.
    """
    for cls in _SOURCES.values():
        if cls.accepts(ref):
            return cls
    raise ModelError(
        f"unsupported model {ref.describe()}",
        hint="give a .pt2, TorchScript .pt, package.module:factory, .keras, SavedModel folder"
        " or .onnx file",
    )


OnnxExporter = Callable[[LoadedSource, ConvertOptions, Progress], "OnnxExport"]


@dataclass
class OnnxExport:
    """A float ONNX model from one framework's exporter, before any quantization."""

    model: bytes
    exporter: str
    notes: list[str] = field(default_factory=list)
    tools: dict[str, str] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    """Entries for the artifact's recipe (what was compared and why this export won)."""


_ONNX_EXPORTERS: dict[str, OnnxExporter] = {}


def register_onnx_exporter(framework: str) -> Callable[[OnnxExporter], OnnxExporter]:
    """Function decorator: the float-ONNX exporter for one source framework."""

    def deco(fn: OnnxExporter) -> OnnxExporter:
        _ONNX_EXPORTERS[framework] = fn
        return fn

    return deco


def onnx_exporters() -> dict[str, OnnxExporter]:
    return dict(_ONNX_EXPORTERS)
