"""ONNX sources: an ``.onnx`` file to quantize or re-target.

External data next to the file is folded into ``model_bytes``, so what follows works on
one self-contained model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgekit.artifact import sha256_file
from edgekit.errors import ModelError
from edgekit.manifest import TensorSpec

from .._registry import LoadedSource, SourceLoader, SourceRef, register_source
from ..options import ConvertOptions

__all__ = ["OnnxSource", "onnx_dtype_name", "tensor_specs"]

# protobuf refuses to serialise a message of 2 GiB or more.
_MAX_PROTO_BYTES = 2**31 - 1


class OnnxSource(LoadedSource):
    """A loaded ONNX model.

    Attributes:
        model_bytes: the serialised model with every weight inside (no external data).
        opset: the model's ``ai.onnx`` opset.
    """

    framework: ClassVar[str] = "onnx"

    def __init__(self, ref: SourceRef, model_bytes: bytes, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], opset: int, sha256: str | None) -> None:
        super().__init__(ref, inputs, outputs, sha256)
        self.model_bytes = model_bytes
        self.opset = opset
        self._session: Any = None

    def predict(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model in onnxruntime (CPU) on one batch.

        Raises:
            ModelError: an input is missing or onnxruntime fails on it.
        """
        import onnxruntime as ort

        if self._session is None:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            self._session = ort.InferenceSession(self.model_bytes, so,
                                                 providers=["CPUExecutionProvider"])
        prepared = {}
        for spec in self.inputs:
            arr = feeds.get(spec.name)
            if arr is None and len(self.inputs) == 1 and len(feeds) == 1:
                arr = next(iter(feeds.values()))
            if arr is None:
                raise ModelError(f"input '{spec.name}' is missing (have: {', '.join(feeds)})")
            prepared[spec.name] = np.asarray(arr).astype(spec.dtype, copy=False)
        try:
            out = self._session.run([o.name for o in self.outputs], prepared)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime failed on the source model: {exc}") from exc
        return dict(zip((o.name for o in self.outputs), out, strict=True))

    def framework_version(self) -> dict[str, str]:
        return {"opset": str(self.opset)}


@register_source
class OnnxLoader(SourceLoader):
    """An ``.onnx`` file, with its external data if it has any."""

    KEY: ClassVar[str] = "onnx"

    @classmethod
    def accepts(cls, ref: SourceRef) -> bool:
        return ref.path is not None and ref.path.suffix == ".onnx"

    @classmethod
    def load(cls, ref: SourceRef, opts: ConvertOptions) -> OnnxSource:
        assert ref.path is not None
        path = ref.path
        if not path.is_file():
            raise ModelError(f"model {path} not found", hint="check the path")
        model = read_onnx(path)
        data = model.SerializeToString()
        inputs, outputs = tensor_specs(model)
        if not outputs:
            raise ModelError(f"{path} has no graph outputs")
        return OnnxSource(ref, data, inputs, outputs, onnx_opset(model), sha256_file(path))


def read_onnx(path: Path) -> Any:
    """Load and check an ONNX file, with its external data folded in.

    Raises:
        ModelError: the file is truncated, corrupt, lacks its external data, or is too large
            to hold in one file.
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=True)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise ModelError(f"{path} is not a valid ONNX file (corrupt or truncated: {exc})",
                         hint="export it again; check the copy is complete") from exc
    except (FileNotFoundError, OSError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"{path}: external data could not be read ({exc})",
                         hint="keep the external data files next to the .onnx file") from exc
    if not model.graph.node:
        raise ModelError(f"{path} holds no graph (empty or not an ONNX model)",
                         hint="export it again; check the copy is complete")
    if model.ByteSize() > _MAX_PROTO_BYTES:
        raise ModelError(f"{path} is larger than 2 GiB with its weights inside",
                         hint="models of this size do not fit one self-contained ONNX artifact")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{path} is not a valid ONNX model: {str(exc).splitlines()[0]}",
                         hint="export it again, or check it with onnx.checker") from exc
    return model


def onnx_opset(model: Any) -> int:
    """The default-domain (``ai.onnx``) opset of a model."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def onnx_dtype_name(elem_type: int) -> str:
    """numpy dtype name of an ONNX tensor element type.

    Raises:
        ModelError: the type has no numpy equivalent that edgekit supports.
    """
    import onnx

    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError) as exc:
        raise ModelError(f"ONNX element type {elem_type} is not supported") from exc


def tensor_specs(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of a graph; unnamed dynamic dimensions get a name."""
    initializers = {t.name for t in model.graph.initializer}

    def spec(value: Any, where: str, index: int) -> TensorSpec:
        ttype = value.type.tensor_type
        shape: list[int | str] = []
        for axis, dim in enumerate(ttype.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            elif dim.dim_param:
                shape.append(dim.dim_param)
            else:
                shape.append(f"{where}{index}_d{axis}")
        return TensorSpec(name=value.name, dtype=onnx_dtype_name(ttype.elem_type), shape=shape)

    inputs = [spec(v, "in", i) for i, v in enumerate(model.graph.input)
              if v.name not in initializers]
    outputs = [spec(v, "out", i) for i, v in enumerate(model.graph.output)]
    return inputs, outputs
