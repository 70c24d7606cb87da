"""Several artifacts of one model in one package, for the device to choose from.

Each variant (a target format and a quantization mode) is converted and evaluated on its
own by :func:`converters.pipeline.convert`, with its own evidence and its own golden outputs
(quantization changes outputs); one manifest pins every member and one signature covers
them all (docs/artifact-format.md, "Variants"). The device measures the variants it can run
and serves the fastest one within the package's accuracy budget (docs/devices.md).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.artifact import write_package
from edgekit.data import Dataset, load_npz
from edgekit.errors import EdgekitError, UsageError, ValidationError
from edgekit.manifest import MAX_VARIANTS, VARIANTS_SCHEMA_VERSION, Manifest, Variant

from .options import QUANT_MODES, TARGETS, ConvertOptions
from .pipeline import ConversionResult, Progress, convert

__all__ = ["DEFAULT_MAX_ACCURACY_DROP", "VariantsResult", "convert_variants", "parse_variants",
           "variant_id"]

# One point of accuracy (a fraction, as metrics.accuracy.drop).
DEFAULT_MAX_ACCURACY_DROP = 0.01
_EXTENSIONS = {"onnx": "onnx", "tflite": "tflite"}


def _quiet(_: str) -> None:
    return None


@dataclass
class VariantsResult:
    """The package written and each variant's evidence, by variant id (default first)."""

    path: Path | None
    manifest: Manifest
    reports: dict[str, dict[str, Any]]
    warnings: list[str] = field(default_factory=list)


def variant_id(target: str, quantize: str) -> str:
    """The id of a variant: ``onnx-int8``."""
    return f"{target}-{quantize}"


def parse_variants(text: str) -> list[tuple[str, str]]:
    """Parse ``onnx:none,onnx:int8,tflite:int8`` into (target, quantize) pairs.

    Raises:
        UsageError: an entry is not TARGET:QUANTIZE with known values, repeats, or there
            are fewer than two or more than the package limit.
    """
    pairs: list[tuple[str, str]] = []
    for entry in (e.strip() for e in text.split(",")):
        match = re.fullmatch(r"(\w+):(\w+)", entry)
        if not match or match.group(1) not in TARGETS or match.group(2) not in QUANT_MODES:
            raise UsageError(
                f"--variants entry {entry!r} is not TARGET:QUANTIZE",
                hint=f"targets: {', '.join(TARGETS)}; quantize: {', '.join(QUANT_MODES)};"
                     " for example --variants onnx:none,onnx:int8,tflite:int8")
        pair = (match.group(1), match.group(2))
        if pair in pairs:
            raise UsageError(f"--variants names {entry} twice")
        pairs.append(pair)
    if not 2 <= len(pairs) <= MAX_VARIANTS:
        raise UsageError(f"--variants needs 2 to {MAX_VARIANTS} entries, got {len(pairs)}",
                         hint="for one artifact use --to and --quantize")
    return pairs


def convert_variants(
    source: Any,
    specs: list[tuple[str, str]],
    opts: ConvertOptions | None = None,
    *,
    output: str | os.PathLike[str] | None,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    calibration: str | os.PathLike[str] | Dataset | None = None,
    eval_data: str | os.PathLike[str] | Dataset | None = None,
    weights: str | os.PathLike[str] | None = None,
    sign_key: Ed25519PrivateKey | None = None,
    progress: Progress = _quiet,
    extra_manifest: dict[str, Any] | None = None,
) -> VariantsResult:
    """Convert ``source`` once per (target, quantize) pair and write one package.

    The default variant (the top-level fields of the manifest, what a reader that does not
    choose reads) is the first one that passed parity within the accuracy budget.

    Raises:
        UsageError: fewer than two variants, or a budget below 0.
        ModelError, DataError, ConversionError: as :func:`converters.convert`.
        ValidationError: no variant passes parity within the accuracy budget (nothing is
            written), or a parity failure with ``opts.strict``.
        OutputWriteError: the package could not be written.
    """
    base = (opts or ConvertOptions()).validate()
    if len(specs) < 2:
        raise UsageError("a package of variants needs at least two", hint="use convert()")
    if not max_accuracy_drop >= 0:
        raise UsageError(f"max accuracy drop {max_accuracy_drop} must be >= 0")
    if output is not None and not Path(output).parent.exists():
        raise UsageError(f"output folder {Path(output).parent} does not exist")
    calib = load_npz(calibration) if isinstance(calibration, (str, os.PathLike)) else calibration
    evald = load_npz(eval_data) if isinstance(eval_data, (str, os.PathLike)) else eval_data
    results: dict[str, ConversionResult] = {}
    warnings: list[str] = []
    for target, quantize in specs:
        vid = variant_id(target, quantize)
        progress(f"variant {vid}")
        try:
            result = convert(source, base.replace(target=target, quantize=quantize),
                             output=None, calibration=calib, eval_data=evald, weights=weights,
                             progress=progress, extra_manifest=extra_manifest)
        except EdgekitError as exc:
            exc.message = f"variant {vid}: {exc.message}"
            raise
        results[vid] = result
        warnings.extend(f"{vid}: {w}" for w in result.warnings)
    variants, members = _variants(results)
    eligible = [v for v in variants if _eligible(v, max_accuracy_drop, warnings)]
    if not eligible:
        raise ValidationError(
            "no variant passes parity within the accuracy budget, so no device could serve"
            " the package: " + "; ".join(warnings),
            hint="raise --max-accuracy-drop, loosen the parity tolerances, or add a variant"
                 " without quantization; nothing was written")
    default = eligible[0]
    ordered = [default, *(v for v in variants if v is not default)]
    manifest = _package_manifest(results[default.id].manifest, ordered, results,
                                 max_accuracy_drop)
    path = None
    if output is not None:
        progress("writing package")
        write_package(output, manifest, members, sign_key=sign_key)
        path = Path(output)
    return VariantsResult(path, manifest, {v.id: results[v.id].report for v in ordered},
                          warnings)


def _variants(results: dict[str, ConversionResult]) -> tuple[list[Variant], dict[str, bytes]]:
    """Each result as a variant whose members are named after it (``model-onnx-int8.onnx``,
    ``golden-onnx-int8.npz``), and the members."""
    variants: list[Variant] = []
    members: dict[str, bytes] = {}
    for vid, result in results.items():
        m = result.manifest
        model_file = f"model-{vid}.{_EXTENSIONS[m.format.value]}"
        golden_file = f"golden-{vid}.npz"
        members[model_file] = result.members[m.model_file]
        members[golden_file] = result.members[str(m.golden["file"])]
        variants.append(Variant(id=vid, target={**m.target, "model_file": model_file},
                                inputs=m.inputs, outputs=m.outputs, recipe=m.recipe,
                                metrics=m.metrics, golden={**m.golden, "file": golden_file}))
    return variants, members


def _eligible(variant: Variant, budget: float, warnings: list[str]) -> bool:
    """Whether a device may serve the variant by its evidence; a note in ``warnings`` when not."""
    if not variant.metrics.get("parity", {}).get("passed", True):
        warnings.append(f"{variant.id}: failed parity; devices will not serve it")
        return False
    drop = variant.accuracy_drop
    if drop is not None and drop > budget:
        warnings.append(f"{variant.id}: accuracy drop {drop * 100:.2f} points is over the budget"
                        f" of {budget * 100:.2f}; devices will not serve it")
        return False
    return True


def _package_manifest(first: Manifest, variants: list[Variant],
                      results: dict[str, ConversionResult], budget: float) -> Manifest:
    """The default variant's manifest, with every variant and the tools of all of them."""
    default = variants[0]
    tools: dict[str, str] = {}
    for result in results.values():
        tools.update(result.manifest.tools)
    return replace(first.for_variant(default), tools=tools, variants=variants,
                   max_accuracy_drop=budget, schema_version=VARIANTS_SCHEMA_VERSION)
