"""The runtime interface and registry."""

from __future__ import annotations

import importlib.metadata
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from edgekit.errors import InputError, RuntimeBackendError
from edgekit.manifest import Manifest, TensorSpec

__all__ = [
    "BackendInfo",
    "RuntimeBackend",
    "RuntimeOptions",
    "Session",
    "availability",
    "backend_for",
    "load_session",
    "register",
]


@dataclass
class RuntimeOptions:
    """How a model is run: thread count and, for onnxruntime, execution providers."""

    threads: int = 0
    providers: list[str] = field(default_factory=list)


@dataclass
class BackendInfo:
    key: str
    format: str
    available: bool
    version: str | None
    detail: str
    providers: list[str] = field(default_factory=list)  # execution providers, where they exist


class Session(ABC):
    """A loaded model. ``run`` takes and returns float (or the manifest's) arrays by name;
    int8 input/output quantization from the manifest is applied here."""

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        self.inputs = inputs
        self.outputs = outputs
        # Without quantization a run only checks names and dtypes: the per-request path
        # (the agent's, ~10 us models) skips the general conversion below.
        self._plain = all(s.quantization is None for s in (*inputs, *outputs))
        self._input_dtypes = [(s.name, np.dtype(s.dtype)) for s in inputs]
        self._output_names = [s.name for s in outputs]

    @property
    def providers(self) -> list[str]:
        """The execution providers the session runs on, in order of preference (onnxruntime);
        empty for runtimes without providers."""
        return []

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run on arrays already in the model's own dtypes."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch.

        Raises:
            InputError: a required input is missing.
            RuntimeBackendError: the runtime failed on the inputs.
        """
        if self._plain:
            for name, dtype in self._input_dtypes:
                arr = feeds.get(name)
                if arr is None or arr.__class__ is not np.ndarray or arr.dtype != dtype:
                    break
            else:
                return self.run_checked(feeds if len(feeds) == len(self._input_dtypes) else
                                        {n: feeds[n] for n, _ in self._input_dtypes})
        prepared: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.name not in feeds:
                raise InputError(f"input '{spec.name}' is missing")
            arr = np.asarray(feeds[spec.name])
            if spec.quantization is not None and arr.dtype != np.dtype(spec.dtype):
                q = spec.quantization
                info = np.iinfo(np.dtype(spec.dtype))
                arr = np.clip(np.round(arr / q.scale + q.zero_point), info.min, info.max)
            prepared[spec.name] = arr.astype(spec.dtype, copy=False)
        try:
            raw = self._run(prepared)
        except Exception as exc:  # runtimes raise their own exception types
            raise RuntimeBackendError(f"inference failed: {exc}") from exc
        result: dict[str, np.ndarray] = {}
        for spec, arr in zip(self.outputs, raw, strict=True):
            if spec.quantization is not None:
                q = spec.quantization
                arr = (arr.astype(np.float32) - q.zero_point) * np.float32(q.scale)
            result[spec.name] = arr
        return result


    def run_checked(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:meth:`run` for feeds already checked against the inputs (exactly the model's
        input names, as ndarrays of the manifest's dtypes), as an input validator returns
        them: the per-request path of the agent.

        Raises:
            RuntimeBackendError: the runtime failed on the inputs.
        """
        if not self._plain:
            return self.run(feeds)
        try:
            raw = self._run(feeds)
        except Exception as exc:  # runtimes raise their own exception types
            raise RuntimeBackendError(f"inference failed: {exc}") from exc
        return dict(zip(self._output_names, raw, strict=True))

    def checked_runner(self) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """:meth:`run_checked` as one function, which a runtime may specialise (fewer
        Python calls per request); the agent takes it once per model.

        The function raises: RuntimeBackendError: the runtime failed on the inputs.
        """
        return self.run_checked


class RuntimeBackend(ABC):
    """One runtime: loads model bytes of one format into a :class:`Session`."""

    KEY: ClassVar[str]
    FORMAT: ClassVar[str]
    # The SDK: its importable modules and the pip distributions that install them, in the
    # order ``load`` tries them (``installed`` reads these without importing anything).
    MODULES: ClassVar[tuple[str, ...]] = ()
    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def installed(cls) -> BackendInfo:
        """:meth:`info` without importing the SDK when it is not imported yet: from package
        metadata (a runtime's native libraries cost tens of MB of memory; an agent serving an
        ONNX model need not load LiteRT to say that it is there). A broken installation
        shows up only when a model is loaded."""
        if any(m in sys.modules for m in cls.MODULES):
            return cls.info()
        for dist in cls.DISTRIBUTIONS:
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
            return BackendInfo(cls.KEY, cls.FORMAT, True, version, f"{dist} installed")
        return BackendInfo(cls.KEY, cls.FORMAT, False, None,
                           f"none of {', '.join(cls.DISTRIBUTIONS)} is installed")

    @classmethod
    @abstractmethod
    def info(cls) -> BackendInfo:
        """Whether the SDK imports, its version, and a note."""

    @classmethod
    @abstractmethod
    def load(
        cls, model: bytes, inputs: list[TensorSpec], outputs: list[TensorSpec],
        options: RuntimeOptions,
    ) -> Session:
        """Load a model.

        Raises:
            RuntimeBackendError: the SDK is missing or the model does not load.
        """


_BACKENDS: dict[str, type[RuntimeBackend]] = {}


def register(cls: type[RuntimeBackend]) -> type[RuntimeBackend]:
    """Class decorator: make a backend available under its ``KEY``."""
    _BACKENDS[cls.KEY] = cls
    return cls


def availability(*, import_sdks: bool = True) -> list[BackendInfo]:
    """Every registered runtime and whether it works here; ``import_sdks=False`` reads
    package metadata instead of importing SDKs not imported yet (:meth:`RuntimeBackend.installed`)."""
    return [cls.info() if import_sdks else cls.installed() for cls in _BACKENDS.values()]


def backend_for(fmt: str) -> type[RuntimeBackend]:
    """The first available backend for a model format.

    Raises:
        RuntimeBackendError: no backend for the format is installed.
    """
    notes = []
    for cls in _BACKENDS.values():
        if cls.FORMAT != fmt:
            continue
        info = cls.info()
        if info.available:
            return cls
        notes.append(f"{cls.KEY}: {info.detail}")
    raise RuntimeBackendError(
        f"no runtime for {fmt} models is available ({'; '.join(notes) or 'none registered'})",
        hint="install the agent extra: pip install 'edgekit-fleet[agent]'",
    )


def load_session(
    manifest: Manifest, model: bytes, options: RuntimeOptions | None = None
) -> Session:
    """Load a package's model with the runtime for its format."""
    return backend_for(manifest.format.value).load(
        model, manifest.inputs, manifest.outputs, options or RuntimeOptions()
    )


def optional_import(name: str) -> tuple[Any, str]:
    """Import a module; return (module or None, note)."""
    import importlib

    try:
        return importlib.import_module(name), "ok"
    except Exception as exc:  # broken native libraries raise more than ImportError
        return None, f"{name} not importable ({type(exc).__name__}: {exc})"

