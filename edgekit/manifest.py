"""The manifest of a ``.edgepkg``: what the model is, how it was made, what it costs.

The manifest is JSON with a ``schema_version``. :class:`Manifest` is its typed form;
:meth:`Manifest.from_dict` validates a parsed document and names the key that is wrong.
docs/artifact-format.md describes every field.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from edgekit.errors import ArtifactError

__all__ = [
    "NAME_RE",
    "SCHEMA_VERSION",
    "MAX_SCHEMA_VERSION",
    "VARIANTS_SCHEMA_VERSION",
    "FileEntry",
    "Manifest",
    "QuantParams",
    "TargetFormat",
    "Task",
    "TensorSpec",
    "Variant",
    "compare_versions",
    "parse_version",
]

SCHEMA_VERSION = 1
# Packages that hold several variants carry schema_version 2, so that a reader which does not
# know variants refuses them ("newer than this edgekit understands") instead of serving the
# top-level artifact without the device's choice. Single-artifact packages stay at 1.
VARIANTS_SCHEMA_VERSION = 2
MAX_SCHEMA_VERSION = VARIANTS_SCHEMA_VERSION
MAX_VARIANTS = 8
# A variant id becomes part of member names and of status documents: short, lower case.
VARIANT_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

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
class Variant:
    """One artifact of a package that holds several: its own model member, I/O, recipe,
    evidence and golden samples (docs/artifact-format.md, "Variants")."""

    id: str
    target: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    recipe: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    golden: dict[str, Any] = field(default_factory=dict)

    @property
    def model_file(self) -> str:
        return str(self.target["model_file"])

    @property
    def format(self) -> TargetFormat:
        return TargetFormat(self.target["format"])

    @property
    def golden_file(self) -> str | None:
        name = self.golden.get("file")
        return name if isinstance(name, str) else None

    @property
    def accuracy_drop(self) -> float | None:
        """The drop in accuracy (a fraction) the converter measured, when it had labels."""
        drop = (self.metrics.get("accuracy") or {}).get("drop")
        return float(drop) if isinstance(drop, (int, float)) else None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "target": self.target,
                "inputs": [spec.to_dict() for spec in self.inputs],
                "outputs": [spec.to_dict() for spec in self.outputs],
                "recipe": self.recipe, "metrics": self.metrics, "golden": self.golden}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Variant:
        """Raises: ArtifactError: a key is missing, has the wrong type, or names an unsafe
        member."""
        obj = _require_dict(data, where)
        vid = _require(obj, "id", str, where)
        if not VARIANT_ID_RE.fullmatch(vid):
            raise ArtifactError(f"manifest {where}.id: {vid[:40]!r} is not a valid variant id"
                                " (lower-case letters, digits, '-', '_'; at most 32)")
        target = _check_target(_require(obj, "target", dict, where), f"manifest {where}.target")
        golden = _require_dict(obj.get("golden") or {}, f"{where}.golden")
        if "file" in golden and not isinstance(golden["file"], str):
            raise ArtifactError(f"manifest {where}.golden.file: expected str")
        return cls(
            id=vid, target=target,
            inputs=[TensorSpec.from_dict(x, f"{where}.inputs[{i}]")
                    for i, x in enumerate(_require(obj, "inputs", list, where))],
            outputs=[TensorSpec.from_dict(x, f"{where}.outputs[{i}]")
                     for i, x in enumerate(_require(obj, "outputs", list, where))],
            recipe=_require(obj, "recipe", dict, where),
            metrics=_require_dict(obj.get("metrics") or {}, f"{where}.metrics"),
            golden=golden,
        )


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
    # Several artifacts in one package (schema_version 2): the top-level target, I/O,
    # recipe, metrics and golden then describe the first variant, the default.
    variants: list[Variant] = field(default_factory=list)
    # The largest accuracy drop (a fraction, as metrics.accuracy.drop) a variant may have
    # to be served; only with variants.
    max_accuracy_drop: float | None = None

    @property
    def model_file(self) -> str:
        return str(self.target["model_file"])

    def variant(self, variant_id: str) -> Variant:
        """Raises: ArtifactError: the package has no variant of that id."""
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise ArtifactError(f"the package has no variant {variant_id!r}"
                            f" (has: {', '.join(v.id for v in self.variants) or 'none'})")

    def for_variant(self, variant: Variant) -> Manifest:
        """This manifest as it reads for one variant: its target, I/O, recipe, evidence and
        golden samples at the top level (what a runtime and the golden check read)."""
        return replace(self, target=variant.target, inputs=variant.inputs,
                       outputs=variant.outputs, recipe=variant.recipe, metrics=variant.metrics,
                       golden=variant.golden)

    @property
    def format(self) -> TargetFormat:
        return TargetFormat(self.target["format"])

    def to_dict(self) -> dict[str, Any]:
        doc = self._common_dict()
        if self.variants:
            doc["schema_version"] = VARIANTS_SCHEMA_VERSION
            doc["variants"] = [v.to_dict() for v in self.variants]
            doc["max_accuracy_drop"] = self.max_accuracy_drop
        return doc

    def _common_dict(self) -> dict[str, Any]:
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
        if version > MAX_SCHEMA_VERSION:
            raise ArtifactError(
                f"manifest schema_version {version} is newer than this edgekit understands"
                f" ({MAX_SCHEMA_VERSION})",
                hint="upgrade edgekit on this machine",
            )
        variants, budget = _variants(obj, version)
        pkg_version = _require(obj, "version", str, "manifest")
        parse_version(pkg_version)
        name = _require(obj, "name", str, "manifest")
        if not NAME_RE.fullmatch(name):
            raise ArtifactError(f"manifest name: {name[:80]!r} is not a valid model name"
                                " (letters, digits, '.', '_', '-'; at most 128)")
        task = _require(obj, "task", str, "manifest")
        if task not in {t.value for t in Task}:
            raise ArtifactError(f"manifest task: unknown task {task!r}")
        target = _check_target(_require(obj, "target", dict, "manifest"), "manifest.target")
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
            variants=variants,
            max_accuracy_drop=budget,
        )


def _check_target(target: dict[str, Any], where: str) -> dict[str, Any]:
    fmt = _require(target, "format", str, where)
    if fmt not in {t.value for t in TargetFormat}:
        raise ArtifactError(f"{where}.format: unknown format {fmt!r}")
    _require(target, "model_file", str, where)
    return target


def _variants(obj: dict[str, Any], version: int) -> tuple[list[Variant], float | None]:
    """The variants and the accuracy budget; schema_version 2 exactly when there are variants.

    Raises:
        ArtifactError: variants under schema_version 1 (or none under 2), too many, ids
            repeated, or a budget that is not a number >= 0.
    """
    raw = obj.get("variants")
    if version < VARIANTS_SCHEMA_VERSION:
        if raw is not None:
            raise ArtifactError(f"manifest variants: need schema_version"
                                f" {VARIANTS_SCHEMA_VERSION}, the manifest says {version}")
        return [], None
    if not isinstance(raw, list) or not raw:
        raise ArtifactError(f"manifest variants: schema_version {version} needs a non-empty"
                            " list of variants")
    if len(raw) > MAX_VARIANTS:
        raise ArtifactError(f"manifest variants: {len(raw)}, more than the limit of {MAX_VARIANTS}")
    variants = [Variant.from_dict(v, f"variants[{i}]") for i, v in enumerate(raw)]
    ids = [v.id for v in variants]
    if len(set(ids)) != len(ids):
        raise ArtifactError(f"manifest variants: ids repeat ({', '.join(ids)})")
    budget = obj.get("max_accuracy_drop")
    if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool)
                               or not budget >= 0):
        raise ArtifactError("manifest max_accuracy_drop: expected a number >= 0 or null")
    return variants, None if budget is None else float(budget)


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
