"""PyTorch sources: a ``torch.export`` program (``.pt2``), a TorchScript file, a
``package.module:factory`` returning an ``nn.Module`` (with optional ``--weights``), or an
in-memory ``nn.Module``.

Every loader ends in a :class:`TorchSource`, which the ONNX and TFLite backends share:
``module`` is an ``nn.Module`` that ``torch.export`` can trace, ``example_args`` the example
input (batch 1, input order) and ``input_names`` the names the artifact's inputs get.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgekit.artifact import sha256_file
from edgekit.errors import DataError, ModelError
from edgekit.manifest import TensorSpec

from .._registry import LoadedSource, SourceLoader, SourceRef, register_source
from ..options import ConvertOptions
from ._torch_export import (
    BATCH_DIM,
    program_input_specs,
    repeat_batch,
    static_batch_of,
    zeros_for,
)

__all__ = ["TorchSource", "quiet_logs"]

_TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ptl", ".torchscript")


class TorchSource(LoadedSource):
    """A loaded PyTorch model with its example input.

    Attributes:
        module: an ``nn.Module`` in eval mode that ``torch.export`` can trace (for a ``.pt2``
            the program's module, for TorchScript its conversion to a traceable module when
            that succeeds, else the ``ScriptModule`` itself).
        example_args: example tensors in input order, batch 1.
        input_names: one name per input, in order.
        output_names: one name per flattened output.
        kind: ``export``, ``torchscript`` or ``module``.
        program: the ``ExportedProgram`` of a ``.pt2`` source, else None.
        scripted: the ``ScriptModule`` of a TorchScript source, else None.
        dynamic_batch: whether the batch dimension is symbolic in the artifact.
        notes: what the loader had to decide, for the conversion report.
    """

    framework: ClassVar[str] = "pytorch"

    def __init__(self, ref: SourceRef, *, module: Any, reference: Any,
                 example_args: tuple[Any, ...], input_names: list[str], kind: str,
                 dynamic_batch: bool,
                 sha256: str | None, program: Any = None, scripted: Any = None,
                 fixed_batch: int | None = None, notes: list[str] | None = None) -> None:
        import torch

        self.module = module
        self.example_args = example_args
        self.input_names = input_names
        self.kind = kind
        self.program = program
        self.scripted = scripted
        self.dynamic_batch = dynamic_batch
        self.notes = list(notes or [])
        self._reference = reference
        # A program traced with a fixed batch only runs on that batch: feed it in chunks.
        self._fixed_batch = fixed_batch
        try:
            with torch.no_grad():
                out = reference(*example_args)
        except Exception as exc:  # the model's own code raises anything
            raise _example_failed(ref, example_args, exc) from exc
        flat, names = _flatten_outputs(out)
        self.output_names = names
        inputs = [_spec(name, t, dynamic_batch)
                  for name, t in zip(input_names, example_args, strict=True)]
        outputs = [_spec(name, t, dynamic_batch) for name, t in zip(names, flat, strict=True)]
        super().__init__(ref, inputs, outputs, sha256)

    def predict(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the source model under ``torch.no_grad`` on one batch.

        Raises:
            ModelError: an input is missing or the model fails on it.
        """
        import torch

        args = []
        for name, example in zip(self.input_names, self.example_args, strict=True):
            arr = feeds.get(name)
            if arr is None and len(self.input_names) == 1 and len(feeds) == 1:
                arr = next(iter(feeds.values()))
            if arr is None:
                raise ModelError(f"input '{name}' is missing (have: {', '.join(feeds)})")
            args.append(torch.from_numpy(np.ascontiguousarray(arr)).to(example.dtype))
        step = self._fixed_batch or int(args[0].shape[0])
        parts: list[list[np.ndarray]] = []
        try:
            with torch.no_grad():
                for start in range(0, int(args[0].shape[0]), max(step, 1)):
                    chunk = [a[start:start + step] for a in args]
                    flat, _ = _flatten_outputs(self._reference(*chunk))
                    parts.append([t.detach().cpu().numpy() for t in flat])
        except Exception as exc:  # the model's own code raises anything
            raise ModelError(f"the PyTorch model failed on the inputs: {exc}") from exc
        return {name: np.concatenate([p[i] for p in parts])
                for i, name in enumerate(self.output_names)}

    def framework_version(self) -> dict[str, str]:
        import torch

        return {"framework_version": torch.__version__, "kind": self.kind}


def _example_failed(ref: SourceRef, example_args: tuple[Any, ...],
                    exc: Exception) -> DataError:
    """The model cannot run its example: say which data, with which shapes and dtypes."""
    given = ", ".join(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"
                      for t in example_args)
    return DataError(
        f"the model fails on {ref.example_source} ({given}): {_first_line(exc)}",
        hint="check the data's shapes and dtypes against the model's forward(), or give the"
             " example with --input-shape NAME:1x...:DTYPE")


def _torch_loaded() -> Any:
    """The torch module if something already imported it (an ``nn.Module`` implies it)."""
    return sys.modules.get("torch")


@register_source
class TorchExportLoader(SourceLoader):
    """A ``torch.export`` program saved with ``torch.export.save`` (``.pt2``)."""

    KEY: ClassVar[str] = "torch-export"

    @classmethod
    def accepts(cls, ref: SourceRef) -> bool:
        return ref.path is not None and ref.path.suffix == ".pt2"

    @classmethod
    def load(cls, ref: SourceRef, opts: ConvertOptions) -> TorchSource:
        import torch

        path = _existing_file(ref)
        try:
            with quiet_logs("torch.export"):
                program = torch.export.load(str(path))
        except Exception as exc:  # torch raises RuntimeError, ValueError, KeyError, ...
            raise ModelError(
                f"{path} is not a readable torch.export program ({type(exc).__name__}: "
                f"{_first_line(exc)})",
                hint="save it with torch.export.save(torch.export.export(model, args),"
                     " 'model.pt2')",
            ) from exc
        return _from_program(ref, program, opts, sha256_file(path))


@register_source
class TorchScriptLoader(SourceLoader):
    """A TorchScript file (``torch.jit.save``); a state_dict here gets a clear error."""

    KEY: ClassVar[str] = "torchscript"

    @classmethod
    def accepts(cls, ref: SourceRef) -> bool:
        return ref.path is not None and ref.path.suffix in _TORCHSCRIPT_SUFFIXES

    @classmethod
    def load(cls, ref: SourceRef, opts: ConvertOptions) -> TorchSource:
        import torch

        path = _existing_file(ref)
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # a non-TorchScript file fails in many ways
            raise _not_torchscript(path, exc) from exc
        return _from_module(ref, scripted, opts, sha256_file(path))


@register_source
class TorchFactoryLoader(SourceLoader):
    """``package.module:factory`` returning an ``nn.Module``, plus optional state_dict weights."""

    KEY: ClassVar[str] = "torch-factory"

    @classmethod
    def accepts(cls, ref: SourceRef) -> bool:
        return ref.factory is not None

    @classmethod
    def load(cls, ref: SourceRef, opts: ConvertOptions) -> TorchSource:
        import torch

        assert ref.factory is not None
        module_name, _, attr = ref.factory.partition(":")
        if not module_name or not attr:
            raise ModelError(f"{ref.factory!r} is not package.module:factory",
                             hint="for example mypkg.models:build_net")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:  # importing user code can raise anything
            raise ModelError(f"cannot import {ref.factory}: {exc}",
                             hint="make the package importable (pip install -e . or PYTHONPATH)"
                             ) from exc
        try:
            model = factory()
        except Exception as exc:  # user code
            raise ModelError(f"{ref.factory}() failed: {exc}") from exc
        if not isinstance(model, torch.nn.Module):
            raise ModelError(
                f"{ref.factory}() returned {type(model).__name__}, not a torch.nn.Module")
        digest = None
        if ref.weights is not None:
            _load_weights(model, ref.weights)
            digest = sha256_file(ref.weights)
        return _from_module(ref, model, opts, digest)


@register_source
class TorchModuleLoader(SourceLoader):
    """An in-memory ``nn.Module`` (TorchScript ones too) or ``ExportedProgram`` passed to
    :func:`converters.convert`."""

    KEY: ClassVar[str] = "torch-module"

    @classmethod
    def accepts(cls, ref: SourceRef) -> bool:
        torch = _torch_loaded()
        return ref.obj is not None and torch is not None and isinstance(
            ref.obj, (torch.nn.Module, torch.export.ExportedProgram))

    @classmethod
    def load(cls, ref: SourceRef, opts: ConvertOptions) -> TorchSource:
        import torch

        if isinstance(ref.obj, torch.export.ExportedProgram):
            return _from_program(ref, ref.obj, opts, None)
        if ref.weights is not None:
            _load_weights(ref.obj, ref.weights)
        return _from_module(ref, ref.obj, opts, None)


def _from_module(ref: SourceRef, model: Any, opts: ConvertOptions,
                 digest: str | None) -> TorchSource:
    import torch

    model.eval()
    if isinstance(model, torch.jit.ScriptModule):
        names = _script_input_names(model, ref.example)
        example = _example_args(ref, names, opts)
        module, notes = _traceable(model, example)
        return TorchSource(ref, module=module, reference=model, example_args=example,
                           input_names=names, kind="torchscript",
                           dynamic_batch=opts.dynamic_batch, sha256=digest, scripted=model,
                           notes=notes)
    names = _forward_input_names(model.forward, ref.example)
    example = _example_args(ref, names, opts)
    return TorchSource(ref, module=model, reference=model, example_args=example,
                       input_names=names, kind="module", dynamic_batch=opts.dynamic_batch,
                       sha256=digest)


def _from_program(ref: SourceRef, program: Any, opts: ConvertOptions,
                  digest: str | None) -> TorchSource:
    """A program keeps the batch it was exported with: a fixed one stays fixed.

    The program declares its inputs (names, shapes, dtypes): data given as the example is
    checked against them before anything runs, and without data the example is made from
    them (zeros, batch 1).

    Raises:
        DataError: the example data does not fit the program's inputs.
    """
    from edgekit.data import check_inputs

    names = list(program.graph_signature.user_inputs)
    declared = program_input_specs(program)
    if ref.example:
        given = dict(ref.example)
        if len(declared) == 1 and len(given) == 1 and declared[0].name not in given:
            # One input, one array: the array is that input whatever its key (as for
            # modules, whose parameter names the data cannot know).
            given = {declared[0].name: next(iter(given.values()))}
        ref.example = check_inputs(given, declared, f"{ref.example_source} (first sample)")
    else:
        ref.example = zeros_for(declared)
        ref.example_source = "zeros shaped like the program's inputs"
    example = _example_args(ref, names, opts)
    notes = []
    static = static_batch_of(program)
    if static is not None:
        if opts.dynamic_batch:
            notes.append(
                f"the torch.export program has a fixed batch of {static}; the artifact"
                " keeps it (export with dynamic_shapes for a symbolic batch)")
        example = tuple(repeat_batch(t, static) for t in example)
    module = program.module()
    return TorchSource(ref, module=module, reference=module, example_args=example,
                       input_names=names, kind="export",
                       dynamic_batch=opts.dynamic_batch and static is None, sha256=digest,
                       program=program, fixed_batch=static, notes=notes)


def _existing_file(ref: SourceRef) -> Path:
    assert ref.path is not None
    if not ref.path.is_file():
        raise ModelError(f"model {ref.path} not found", hint="check the path")
    return ref.path


def _not_torchscript(path: Path, exc: Exception) -> ModelError:
    """Say what the file is instead: a state_dict, a pickled module, or something broken."""
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        obj = None
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return ModelError(
            f"{path} holds a state_dict (weights only), not a model",
            hint=f"give the code that builds the model and the weights: "
                 f"edgekit convert package.module:factory --weights {path}",
        )
    if obj is None and _is_zip_pickle(path):
        return ModelError(
            f"{path} is a pickled object, not TorchScript; edgekit does not unpickle code",
            hint="save the model with torch.export.save (.pt2) or torch.jit.save, or use"
                 " package.module:factory --weights state_dict.pt",
        )
    return ModelError(
        f"{path} is not a readable TorchScript file ({_first_line(exc)})",
        hint="save it with torch.jit.save(torch.jit.trace(model, args), 'model.pt'),"
             " or as a torch.export program (.pt2)",
    )


def _is_zip_pickle(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("data.pkl") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_weights(model: Any, weights: Path) -> None:
    import torch

    if not weights.is_file():
        raise ModelError(f"weights file {weights} not found")
    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ModelError(f"{weights} is not a readable state_dict ({_first_line(exc)})",
                         hint="save weights with torch.save(model.state_dict(), path)") from exc
    if not isinstance(state, dict):
        raise ModelError(f"{weights} holds {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{weights} does not fit the model: {_first_line(exc)}",
                         hint="use the weights saved from the same architecture") from exc


def _forward_input_names(forward: Any, example: dict[str, np.ndarray] | None) -> list[str]:
    """Required positional parameters of ``forward``, plus optional ones the example names."""
    params = [p for p in inspect.signature(forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    given = set(example or {})
    names = [p.name for p in params if p.default is p.empty or p.name in given]
    if not names and example:
        return list(example)
    return names


def _script_input_names(scripted: Any, example: dict[str, np.ndarray] | None) -> list[str]:
    args = scripted.forward.schema.arguments[1:]
    given = set(example or {})
    return [a.name for a in args if not a.has_default_value() or a.name in given]


def _example_args(ref: SourceRef, names: list[str], opts: ConvertOptions) -> tuple[Any, ...]:
    """The example tensors, batch 1, in input order.

    Raises:
        ModelError: no example was given, or it lacks one of the inputs.
    """
    import torch

    shapes = " ".join(f"--input-shape {n}:1x..." for n in names)
    if not ref.example:
        raise ModelError(
            f"{ref.describe()} needs an example input ({', '.join(names)}) to be exported",
            hint=f"pass {shapes}, or --calibration/--eval data to take a sample from",
        )
    example = dict(ref.example)
    if len(names) == 1 and names[0] not in example and len(example) == 1:
        example = {names[0]: next(iter(example.values()))}
    missing = [n for n in names if n not in example]
    if missing:
        raise ModelError(
            f"the example input lacks {', '.join(missing)} (model inputs: {', '.join(names)};"
            f" given: {', '.join(example)})",
            hint=f"pass {shapes}",
        )
    tensors = []
    for name in names:
        arr = np.asarray(example[name])[:1]
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        tensors.append(torch.from_numpy(np.ascontiguousarray(arr)))
    return tuple(tensors)


def _traceable(scripted: Any, example: tuple[Any, ...]) -> tuple[Any, list[str]]:
    """A ``torch.export``-traceable module for a ScriptModule, when torch can convert it."""
    try:
        from torch._export.converter import TS2EPConverter

        with quiet_logs("torch"):
            program = TS2EPConverter(scripted, example).convert()
        return program.module(), []
    except Exception as exc:  # the converter covers only part of TorchScript
        return scripted, [f"TorchScript could not be converted to a torch.export program"
                          f" ({_first_line(exc)}); exporters that need one will fail"]


def _flatten_outputs(out: Any) -> tuple[list[Any], list[str]]:
    """Tensors of a model's output in export order, and a name for each."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out], ["output"]
    if isinstance(out, dict):
        items = [(str(k), v) for k, v in out.items() if v is not None]
        if items and all(isinstance(v, torch.Tensor) for _, v in items):
            return [v for _, v in items], [k for k, _ in items]
    flat: list[Any] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            flat.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        elif obj is not None:
            raise ModelError(f"the model returns {type(obj).__name__}; only tensors, tuples,"
                             " lists and dicts of tensors can be exported")

    walk(out)
    if not flat:
        raise ModelError("the model returns no tensors")
    return flat, [f"output_{i}" for i in range(len(flat))]


def _spec(name: str, tensor: Any, dynamic_batch: bool) -> TensorSpec:
    dtype = str(tensor.dtype).replace("torch.", "")
    shape: list[int | str] = [int(d) for d in tensor.shape]
    if dynamic_batch and shape:
        shape[0] = BATCH_DIM
    return TensorSpec(name=name, dtype=dtype, shape=shape)


@contextlib.contextmanager
def quiet_logs(name: str) -> Iterator[None]:
    """Silence a library's warnings while we try something whose failure we report ourselves."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
