"""The manifest of a ``.edgepkg``: what the model is, how it was made, what it costs.

The manifest is JSON with a ``schema_version``. :class:`Manifest` is its typed form;
:meth:`Manifest.from_dict` validates a parsed document and names the key that is wrong.
docs/artifact-format.md describes every field.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from edgekit.errors import ArtifactError

__all__ = [
    "NAME_RE",
    "SCHEMA_VERSION",
    "FileEntry",
    "Manifest",
    "QuantParams",
    "TargetFormat",
    "Task",
    "TensorSpec",
    "compare_versions",
    "parse_version",
]

SCHEMA_VERSION = 1

_DTYPES = {"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
_VERSION_RE = re.compile(r"[0-9]{1,18}(\.[0-9]{1,18}){0,15}")
# A model name becomes part of file names on devices and hosts: letters, digits, ``.``,
# ``_`` and ``-``, starting with a letter or digit (so never ``..`` or a path).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class TargetFormat(StrEnum):
    ONNX = "onnx"
    TFLITE = "tflite"


class Task(StrEnum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    EMBEDDING = "embedding"


def parse_version(text: str) -> tuple[int, ...]:
    """Parse a dotted numeric version (``1``, ``1.2.3``, ``2026.1129.174801``).

    Raises:
        ArtifactError: the text is not dots and digits.
    """
    if not isinstance(text, str) or not _VERSION_RE.fullmatch(text):
        raise ArtifactError(
            f"version {text!r} is not a dotted number",
            hint="use digits separated by dots, for example 1.4.0",
        )
    return tuple(int(part) for part in text.split("."))


def compare_versions(a: str, b: str) -> int:
    """Return -1, 0 or 1 as version ``a`` is older than, equal to or newer than ``b``."""
    pa, pb = parse_version(a), parse_version(b)
    width = max(len(pa), len(pb))
    pa += (0,) * (width - len(pa))
    pb += (0,) * (width - len(pb))
    return (pa > pb) - (pa < pb)


@dataclass
class QuantParams:
    """Affine quantization of an int8/uint8 model input or output: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int


@dataclass
class TensorSpec:
    """One model input or output. Symbolic dimensions are strings (``batch``)."""

    name: str
    dtype: str
    shape: list[int | str]
    quantization: QuantParams | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.quantization is None:
            data.pop("quantization")
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TensorSpec:
        obj = _require_dict(data, where)
        name = _require(obj, "name", str, where)
        dtype = _require(obj, "dtype", str, where)
        if dtype not in _DTYPES:
            raise ArtifactError(f"manifest {where}.dtype: unknown dtype {dtype!r}")
        shape = _require(obj, "shape", list, where)
        for dim in shape:
            if not isinstance(dim, (int, str)) or isinstance(dim, bool):
                raise ArtifactError(f"manifest {where}.shape: dimension {dim!r} is not int or str")
        quant = obj.get("quantization")
        qp = None
        if quant is not None:
            q = _require_dict(quant, f"{where}.quantization")
            qp = QuantParams(
                scale=float(_require(q, "scale", (int, float), f"{where}.quantization")),
                zero_point=int(_require(q, "zero_point", int, f"{where}.quantization")),
            )
        return cls(name=name, dtype=dtype, shape=list(shape), quantization=qp)


@dataclass
class FileEntry:
    sha256: str
    size: int


@dataclass
class Manifest:
    """The typed manifest. ``extra`` keeps sections that later tools add (optimize tables)."""

    name: str
    version: str
    created: str
    task: str
    source: dict[str, Any]
    target: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    recipe: dict[str, Any]
    tools: dict[str, str]
    files: dict[str, FileEntry] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    golden: dict[str, Any] = field(default_factory=dict)
    labels: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def model_file(self) -> str:
        return str(self.target["model_file"])

    @property
    def format(self) -> TargetFormat:
        return TargetFormat(self.target["format"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "task": self.task,
            "labels": self.labels,
            "source": self.source,
            "target": self.target,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "recipe": self.recipe,
            "tools": self.tools,
            "files": {k: asdict(v) for k, v in sorted(self.files.items())},
            "metrics": self.metrics,
            "golden": self.golden,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Validate a parsed manifest document.

        Raises:
            ArtifactError: a key is missing or has the wrong type; the message names it.
        """
        obj = _require_dict(data, "manifest")
        version = _require(obj, "schema_version", int, "manifest")
        if version > SCHEMA_VERSION:
            raise ArtifactError(
                f"manifest schema_version {version} is newer than this edgekit understands"
                f" ({SCHEMA_VERSION})",
                hint="upgrade edgekit on this machine",
            )
        pkg_version = _require(obj, "version", str, "manifest")
        parse_version(pkg_version)
        name = _require(obj, "name", str, "manifest")
        if not NAME_RE.fullmatch(name):
            raise ArtifactError(f"manifest name: {name[:80]!r} is not a valid model name"
                                " (letters, digits, '.', '_', '-'; at most 128)")
        task = _require(obj, "task", str, "manifest")
        if task not in {t.value for t in Task}:
            raise ArtifactError(f"manifest task: unknown task {task!r}")
        target = _require(obj, "target", dict, "manifest")
        fmt = _require(target, "format", str, "manifest.target")
        if fmt not in {t.value for t in TargetFormat}:
            raise ArtifactError(f"manifest target.format: unknown format {fmt!r}")
        _require(target, "model_file", str, "manifest.target")
        files_raw = _require(obj, "files", dict, "manifest")
        files: dict[str, FileEntry] = {}
        for member, entry in files_raw.items():
            e = _require_dict(entry, f"files.{member}")
            files[member] = FileEntry(
                sha256=_require(e, "sha256", str, f"files.{member}"),
                size=_require(e, "size", int, f"files.{member}"),
            )
        labels = obj.get("labels")
        if labels is not None and (
            not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)
        ):
            raise ArtifactError("manifest labels: must be a list of strings or null")
        return cls(
            schema_version=version,
            name=name,
            version=pkg_version,
            created=_require(obj, "created", str, "manifest"),
            task=task,
            labels=labels,
            source=_require(obj, "source", dict, "manifest"),
            target=target,
            inputs=[
                TensorSpec.from_dict(x, f"inputs[{i}]")
                for i, x in enumerate(_require(obj, "inputs", list, "manifest"))
            ],
            outputs=[
                TensorSpec.from_dict(x, f"outputs[{i}]")
                for i, x in enumerate(_require(obj, "outputs", list, "manifest"))
            ],
            recipe=_require(obj, "recipe", dict, "manifest"),
            tools=_require(obj, "tools", dict, "manifest"),
            files=files,
            metrics=obj.get("metrics") or {},
            golden=obj.get("golden") or {},
            extra=obj.get("extra") or {},
        )


def _require_dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ArtifactError(f"{where}: expected an object, found {type(value).__name__}")
    return value


def _require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise ArtifactError(f"{where}.{key}: missing")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ArtifactError(
            f"{where}.{key}: expected {expected}, found {type(value).__name__}"
        )
    return value
