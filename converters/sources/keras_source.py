"""Keras 3 and TensorFlow sources: ``.keras`` files, SavedModel folders, in-memory models.

All three load into one :class:`KerasSource` (framework ``keras``). Its inputs are named as
the model names them, with a symbolic ``batch`` dimension; its outputs follow the order in
which ``keras.tree.flatten`` lays out the model's outputs (dict outputs by sorted key).
Targets that need a SavedModel (the TFLite converter; Keras 3 breaks
``TFLiteConverter.from_keras_model``) get one from :meth:`KerasSource.saved_model`, whose
serving signature takes and returns tensors keyed by those same names.

TensorFlow and Keras are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import re
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgekit.errors import ModelError
from edgekit.manifest import TensorSpec

from .._registry import LoadedSource, SourceLoader, SourceRef, register_source
from ..options import ConvertOptions

__all__ = [
    "KerasFileLoader",
    "KerasObjectLoader",
    "KerasSource",
    "SavedModelLoader",
    "SavedModelRef",
]

SIGNATURE_KEY = "serving_default"
_KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
_PLACEHOLDER = re.compile(r"keras_tensor(_\d+)?")


def _import_tf() -> tuple[Any, Any]:
    """Import tensorflow and keras.

    Raises:
        ModelError: TensorFlow or Keras is not installed.
    """
    try:
        import keras
        import tensorflow as tf
    except ImportError as exc:
        raise ModelError(
            f"Keras / TensorFlow models need tensorflow and keras ({exc})",
            hint="pip install 'edgekit-fleet[convert]'",
        ) from exc
    return tf, keras


@dataclass
class SavedModelRef:
    """A SavedModel folder and the signature that serves the model."""

    path: Path
    signature: str


def _dims(shape: Any, dynamic_batch: bool) -> list[int | str]:
    dims: list[int | str] = []
    for i, d in enumerate(list(shape)):
        if i == 0 and (d is None or dynamic_batch):
            dims.append("batch")
        elif d is None:
            dims.append(f"dim{i}")
        else:
            dims.append(int(d))
    return dims


def _tf_dtype_name(dtype: Any) -> str:
    return str(getattr(dtype, "name", dtype))


class KerasSource(LoadedSource):
    """A Keras model, or the serving signature of a TensorFlow SavedModel.

    Exactly one of ``model`` (a ``keras.Model``) and ``saved`` (a SavedModel folder whose
    signature ``signature_fn`` runs it) is set. ``owner`` is the object that TensorFlow loaded
    the SavedModel into: the signature's variables live only as long as it does.
    """

    framework: ClassVar[str] = "keras"

    def __init__(self, ref: SourceRef, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 sha256: str | None, *, model: Any = None, saved: SavedModelRef | None = None,
                 signature_fn: Any = None, owner: Any = None) -> None:
        super().__init__(ref, inputs, outputs, sha256)
        self.model = model
        self.saved = saved
        self._signature_fn = signature_fn
        self._owner = owner

    def predict(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on one batch; outputs keyed by output name.

        Raises:
            ModelError: an input is missing or the model fails on the inputs.
        """
        missing = [s.name for s in self.inputs if s.name not in feeds]
        if missing:
            raise ModelError(f"input {', '.join(missing)} is missing (have: {', '.join(feeds)})")
        tf, keras = _import_tf()
        try:
            if self.model is not None:
                args = [np.asarray(feeds[s.name]) for s in self.inputs]
                result = self.model(args[0] if len(args) == 1 else args, training=False)
                flat = keras.tree.flatten(result)
                return {spec.name: np.asarray(arr)
                        for spec, arr in zip(self.outputs, flat, strict=True)}
            out = self._signature_fn(**{s.name: tf.constant(feeds[s.name]) for s in self.inputs})
            return {spec.name: np.asarray(out[spec.name]) for spec in self.outputs}
        except Exception as exc:  # the model's layers raise whatever they raise
            raise ModelError(f"the Keras / TensorFlow model failed on the inputs: {exc}") from exc

    def framework_version(self) -> dict[str, str]:
        tf, keras = _import_tf()
        return {"keras": str(keras.__version__), "tensorflow": str(tf.__version__)}

    def tensor_specs(self, batch: int | None = None) -> list[Any]:
        """``tf.TensorSpec`` of each input, named as the input, batch ``None`` unless given."""
        tf, _ = _import_tf()
        specs = []
        for s in self.inputs:
            shape = [batch if i == 0 else (d if isinstance(d, int) else None)
                     for i, d in enumerate(s.shape)]
            specs.append(tf.TensorSpec(shape, tf.as_dtype(s.dtype), name=s.name))
        return specs

    @contextmanager
    def saved_model(self) -> Iterator[SavedModelRef]:
        """A SavedModel of the source; a Keras model is exported to a temporary folder.

        The exported signature takes inputs and returns outputs keyed by this source's
        input and output names; the folder is removed when the context ends.

        Raises:
            ModelError: the Keras model cannot be exported.
        """
        if self.saved is not None:
            yield self.saved
            return
        tf, keras = _import_tf()
        model = self.model
        in_names = [s.name for s in self.inputs]
        out_names = [s.name for s in self.outputs]

        def serve(*args: Any) -> dict[str, Any]:
            result = model(args[0] if len(args) == 1 else list(args), training=False)
            return dict(zip(out_names, keras.tree.flatten(result), strict=True))

        # Positional tf.function arguments take the TensorSpec names as signature keys.
        fn = tf.function(serve, input_signature=self.tensor_specs())
        with tempfile.TemporaryDirectory(prefix="edgekit-savedmodel-") as tmp:
            path = Path(tmp) / "saved_model"
            try:
                archive = keras.export.ExportArchive()
                archive.track(model)
                archive.add_endpoint(SIGNATURE_KEY, fn)
                archive.write_out(str(path), verbose=False)
            except Exception as exc:  # Keras raises many types for models it cannot trace
                raise ModelError(
                    f"cannot export the Keras model to a SavedModel: {exc}",
                    hint="check that the model runs on inputs named " + ", ".join(in_names),
                ) from exc
            yield SavedModelRef(path, SIGNATURE_KEY)


def _weights_sha256(model: Any) -> str:
    """Digest of the weights in order, by shape, dtype and value (not by variable name: Keras
    numbers layer names per process, so names differ between equal models)."""
    digest = hashlib.sha256()
    for w in model.weights:
        arr = np.ascontiguousarray(np.asarray(w))
        digest.update(f"{arr.dtype.str}{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def _build(model: Any, example: dict[str, np.ndarray] | None, where: str) -> bool:
    """Call a model that has never run once, so its inputs and weights exist.

    Returns whether the example built it.
    """
    if model.built and _functional_inputs(model):
        return False
    if not example:
        if model.built:
            return False
        raise ModelError(
            f"{where} has not been built, so its input shape is unknown",
            hint="call the model once, or pass --input-shape NAME:1x8x8x1 or calibration data",
        )
    arrays = list(example.values())
    try:
        model(arrays[0] if len(arrays) == 1 else arrays, training=False)
    except Exception as exc:  # a model raises whatever its layers raise on a bad input
        raise ModelError(f"{where} fails on the example input: {exc}",
                         hint="check --input-shape against the model") from exc
    return True


def _functional_inputs(model: Any) -> list[Any]:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return []
    return list(inputs or [])


def from_keras_model(ref: SourceRef, model: Any, opts: ConvertOptions, sha256: str | None,
                     where: str) -> KerasSource:
    """Describe a ``keras.Model``'s inputs and outputs and wrap it.

    Raises:
        ModelError: the model is not built and no example input says its shape, or it
            fails on the example.
    """
    _, keras = _import_tf()
    built_here = _build(model, ref.example, where)
    tensors = _functional_inputs(model)
    if tensors:
        # A model built from the example input, or whose inputs carry only the placeholder
        # names Keras makes up (keras_tensor_12), takes the example's names.
        names = [t.name for t in tensors]
        placeholder = all(_PLACEHOLDER.fullmatch(n) for n in names)
        if (built_here or placeholder) and ref.example and len(ref.example) == len(tensors):
            names = list(ref.example)
        inputs = [TensorSpec(n, _tf_dtype_name(t.dtype), _dims(t.shape, opts.dynamic_batch))
                  for n, t in zip(names, tensors, strict=True)]
    elif ref.example:
        inputs = [TensorSpec(name, str(arr.dtype), _dims(arr.shape, True))
                  for name, arr in ref.example.items()]
    else:
        raise ModelError(f"{where} does not declare its inputs",
                         hint="pass --input-shape NAME:1x8x8x1 or calibration data")
    for spec in inputs:
        if spec.dtype not in ("float32", "float16", "int8", "uint8", "int32", "int64", "bool"):
            raise ModelError(f"{where}: input '{spec.name}' has unsupported dtype {spec.dtype}")
    probe = [np.zeros([d if isinstance(d, int) else 1 for d in s.shape], s.dtype) for s in inputs]
    try:
        result = model(probe[0] if len(probe) == 1 else probe, training=False)
    except Exception as exc:  # a model raises whatever its layers raise
        raise ModelError(f"{where} fails on a zero input of its declared shape: {exc}") from exc
    if isinstance(result, dict):
        names = sorted(result)
    else:
        try:
            names = list(model.output_names)
        except (AttributeError, ValueError):
            names = []
    flat = keras.tree.flatten(result)
    if len(names) != len(flat) or len(set(names)) != len(names):
        names = [f"output_{i}" for i in range(len(flat))]
    outputs = [TensorSpec(n, str(np.asarray(a).dtype), _dims(np.shape(a), True))
               for n, a in zip(names, flat, strict=True)]
    return KerasSource(ref, inputs, outputs, sha256, model=model)


@register_source
class KerasFileLoader(SourceLoader):
    """A Keras 3 ``.keras`` file (or a legacy ``.h5``)."""

    KEY: ClassVar[str] = "keras_file"

    @classmethod
    def accepts(cls, ref: SourceRef) -> bool:
        return ref.path is not None and ref.path.suffix.lower() in _KERAS_SUFFIXES

    @classmethod
    def load(cls, ref: SourceRef, opts: ConvertOptions) -> LoadedSource:
        """Load the file with ``keras.models.load_model`` (without compiling).

        Raises:
            ModelError: the file is missing, not a Keras archive, or does not load.
        """
        from ..pipeline import source_sha256

        assert ref.path is not None
        path = ref.path
        if not path.is_file():
            raise ModelError(f"Keras model {path} not found", hint="check the path")
        if path.suffix.lower() == ".keras" and not zipfile.is_zipfile(path):
            raise ModelError(
                f"{path} is not a Keras 3 model archive (a .keras file is a zip archive)",
                hint="save the model with model.save('model.keras')",
            )
        _, keras = _import_tf()
        try:
            model = keras.models.load_model(path, compile=False)
        except Exception as exc:  # Keras raises many types for a damaged archive
            raise ModelError(
                f"cannot load Keras model {path}: {exc}",
                hint="check that the file is complete; custom layers must be registered with"
                " @keras.saving.register_keras_serializable",
            ) from exc
        return from_keras_model(ref, model, opts, source_sha256(path), f"Keras model {path}")


@register_source
class SavedModelLoader(SourceLoader):
    """A TensorFlow SavedModel folder (``saved_model.pb`` plus ``variables/``).

    Any folder is taken, so a folder that is not a SavedModel gets an error that says so.
    """

    KEY: ClassVar[str] = "saved_model"

    @classmethod
    def accepts(cls, ref: SourceRef) -> bool:
        return ref.path is not None and ref.path.is_dir()

    @classmethod
    def load(cls, ref: SourceRef, opts: ConvertOptions) -> LoadedSource:
        """Load the folder's serving signature.

        Raises:
            ModelError: the folder holds no ``saved_model.pb``, the SavedModel does not load,
                or it has no single serving signature.
        """
        from ..pipeline import source_sha256

        assert ref.path is not None
        path = ref.path
        if not (path / "saved_model.pb").is_file():
            found = sorted(p.name for p in path.iterdir())[:8]
            raise ModelError(
                f"folder {path} is not a TensorFlow SavedModel (no saved_model.pb;"
                f" found: {', '.join(found) or 'nothing'})",
                hint="point at the folder written by model.export(...) or tf.saved_model.save",
            )
        tf, _ = _import_tf()
        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as exc:  # TensorFlow raises many types for a damaged SavedModel
            raise ModelError(f"cannot load SavedModel {path}: {exc}",
                             hint="check that saved_model.pb and variables/ are complete") from exc
        signatures = dict(loaded.signatures)
        if SIGNATURE_KEY in signatures:
            key = SIGNATURE_KEY
        elif len(signatures) == 1:
            key = next(iter(signatures))
        else:
            raise ModelError(
                f"SavedModel {path} has no '{SIGNATURE_KEY}' signature"
                f" (signatures: {', '.join(sorted(signatures)) or 'none'})",
                hint="export the model with a single serving signature",
            )
        fn = signatures[key]
        _, kw_specs = fn.structured_input_signature
        inputs = [TensorSpec(name, _tf_dtype_name(spec.dtype), _dims(spec.shape,
                                                                     opts.dynamic_batch))
                  for name, spec in sorted(kw_specs.items())]
        out_specs = fn.structured_outputs
        outputs = [TensorSpec(name, _tf_dtype_name(spec.dtype), _dims(spec.shape, True))
                   for name, spec in sorted(out_specs.items())]
        if not inputs or not outputs:
            raise ModelError(f"SavedModel {path}: signature '{key}' has no named inputs or outputs")
        return KerasSource(ref, inputs, outputs, source_sha256(path),
                           saved=SavedModelRef(path, key), signature_fn=fn, owner=loaded)


@register_source
class KerasObjectLoader(SourceLoader):
    """An in-memory ``keras.Model`` passed to :func:`converters.convert`."""

    KEY: ClassVar[str] = "keras_object"

    @classmethod
    def accepts(cls, ref: SourceRef) -> bool:
        # An object can only be a Keras model if Keras has been imported already.
        if ref.obj is None or "keras" not in sys.modules:
            return False
        import keras

        return isinstance(ref.obj, keras.Model)

    @classmethod
    def load(cls, ref: SourceRef, opts: ConvertOptions) -> LoadedSource:
        """Wrap the model; its sha256 is taken over its weights.

        Raises:
            ModelError: the model is not built and no example input says its shape.
        """
        where = f"Keras model {type(ref.obj).__name__}"
        source = from_keras_model(ref, ref.obj, opts, None, where)
        source.sha256 = _weights_sha256(ref.obj)
        return source
