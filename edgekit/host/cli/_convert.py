"""``edgekit convert`` and ``edgekit inspect``."""

from __future__ import annotations

from typing import Any

import click

from edgekit.artifact import open_package
from edgekit.calibration import METHODS as ESTIMATE_METHODS
from edgekit.errors import EdgekitError
from edgekit.host.cli._app import cli, emit_json, progress_printer
from edgekit.host.naming import Naming, registry_records, resolve_naming
from edgekit.signing import load_private_key


@cli.command()
@click.argument("source")
@click.option("--to", "target", type=click.Choice(["onnx", "tflite"]), default="onnx",
              show_default=True, help="Artifact format.")
@click.option("--quantize", type=click.Choice(["none", "fp16", "dynamic", "int8"]),
              default="none", show_default=True,
              help="none; fp16 weights; dynamic int8 weights; int8 static (needs --calibration).")
@click.option("--per-tensor", is_flag=True, help="int8 weights per tensor (default: per channel).")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]),
              default="minmax", show_default=True, help="ONNX static int8 calibration.")
@click.option("--int8-io", is_flag=True, help="TFLite int8: int8 model inputs and outputs.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
              help=".npz with one array per input (or x), used for int8 calibration.")
@click.option("--eval", "eval_path", type=click.Path(exists=True, dir_okay=False),
              help=".npz with inputs and labels (y) for parity and accuracy.")
@click.option("--estimate-data", "estimate_path", type=click.Path(exists=True, dir_okay=False),
              help="Labelled .npz the accuracy estimate is fitted on (default: --eval); it"
                   " should hold the variation the field will show, each sample's condition"
                   " (clean, each drift) under the key group.")
@click.option("--estimate-method", type=click.Choice(list(ESTIMATE_METHODS)),
              default="logistic", show_default=True,
              help="How the accuracy estimate is fitted: a logistic model of the output row,"
                   " or a map of confidence (atc, isotonic).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="state_dict for a package.module:factory source.")
@click.option("--input-shape", "input_shapes", multiple=True,
              help="NAME:1x3x32x32[:DTYPE] example input (repeatable); else taken from the data.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (>= 17).")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto",
              show_default=True, help="PyTorch ONNX exporter; auto measures both, keeps the faster.")
@click.option("--keep-padding", is_flag=True,
              help="ONNX: compute every position of a text model's input. By default a graph"
                   " with an attention_mask input stops after the last position the mask"
                   " keeps, when its outputs do not change by it (recipe: padding_trim).")
@click.option("--task", type=click.Choice(["auto", "classification", "regression", "embedding"]),
              default="auto", show_default=True)
@click.option("--labels", "labels_csv", help="Comma-separated class names.")
@click.option("--name", help="Model name (default: the registry's name for this source, else"
                             " the file stem, with a notice).")
@click.option("--version", "version",
              help="Dotted version (default: the next patch after the registry's highest"
                   " version of the name; 0.1.0 for a new name).")
@click.option("--db", "db_url", metavar="URL",
              help="Registry database the default name and version come from (default:"
                   " $EDGEKIT_DB or ~/.edgekit/edgekit.db when it exists).")
@click.option("--sign-key", type=click.Path(exists=True, dir_okay=False),
              help="Private key to sign the package with.")
@click.option("--atol", type=float, default=1e-3, show_default=True,
              help="Parity: max abs error allowed without quantization.")
@click.option("--min-cosine", type=float, default=0.99, show_default=True,
              help="Parity: least mean cosine similarity between source and artifact outputs.")
@click.option("--min-top1", type=float, default=0.97, show_default=True,
              help="Parity (classifiers): least share of samples whose top class agrees.")
@click.option("--strict", is_flag=True, help="A parity failure is an error (exit 1, no output).")
@click.option("--variants", "variants_csv", metavar="TARGET:QUANTIZE,...",
              help="Write one package of several artifacts (e.g. onnx:none,onnx:int8,"
                   "tflite:int8) in place of --to/--quantize; the device serves the fastest"
                   " within --max-accuracy-drop.")
@click.option("--max-accuracy-drop", type=float, default=1.0, show_default=True,
              help="With --variants: the largest accuracy drop, in points, a variant may have"
                   " to be served.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="Threads for the latency figure.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the .edgepkg.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def convert(source: str, target: str, quantize: str, per_tensor: bool, calibration_method: str,
            int8_io: bool, calibration: str | None, eval_path: str | None,
            estimate_path: str | None, estimate_method: str, weights: str | None,
            input_shapes: tuple[str, ...], opset: int, exporter: str, keep_padding: bool,
            task: str,
            labels_csv: str | None, name: str | None, version: str | None,
            db_url: str | None, sign_key: str | None, atol: float, min_cosine: float, min_top1: float,
            strict: bool, variants_csv: str | None, max_accuracy_drop: float, threads: int,
            output: str, as_json: bool) -> None:
    """Convert SOURCE into one signed, validated .edgepkg.

    SOURCE is a torch.export program (.pt2), a TorchScript file (.pt), a
    package.module:factory returning an nn.Module (with --weights), a Keras .keras file,
    a TensorFlow SavedModel folder, or an .onnx file.
    """
    from converters import ConvertOptions, parse_input_shape
    from converters import convert as run_convert

    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    for text in input_shapes:
        in_name, dims, dtype = parse_input_shape(text)
        shapes[in_name] = dims
        if dtype:
            dtypes[in_name] = dtype
    naming = resolve_cli_naming(source, name, version, db_url)
    name, version = naming.name, naming.version
    opts = ConvertOptions(
        target=target, quantize=quantize, per_channel=not per_tensor,
        calibration_method=calibration_method, int8_io=int8_io, opset=opset, exporter=exporter,
        task=task, labels=labels_csv.split(",") if labels_csv else None, name=name,
        version=version, input_shapes=shapes, input_dtypes=dtypes, atol=atol,
        min_cosine=min_cosine, min_top1=min_top1, strict=strict, threads=threads,
        estimate_method=estimate_method, trim_padding=not keep_padding,
    ).validate()
    key = load_private_key(sign_key) if sign_key else None
    if variants_csv is not None:
        _convert_variants(source, variants_csv, opts, max_accuracy_drop, output=output,
                          calibration=calibration, eval_path=eval_path, weights=weights,
                          key=key, as_json=as_json)
        return
    result = run_convert(source, opts, output=output, calibration=calibration,
                         eval_data=eval_path, estimate_data=estimate_path, weights=weights,
                         sign_key=key,
                         progress=progress_printer(as_json))
    if as_json:
        emit_json({"output": str(result.path), "name": result.manifest.name,
                   "version": result.manifest.version, "recipe": result.manifest.recipe,
                   "report": result.report, "warnings": result.warnings,
                   "signed": key is not None})
    else:
        click.echo(format_report(result.manifest.name, result.manifest.version,
                                 result.manifest.recipe, result.report))
        for warning in result.warnings:
            click.echo(f"warning: {warning}", err=True)
        click.echo(f"wrote {result.path}{' (signed)' if key else ' (unsigned)'}")


def _convert_variants(source: str, variants_csv: str, opts: Any, max_accuracy_drop: float, *,
                      output: str, calibration: str | None, eval_path: str | None,
                      weights: str | None, key: Any, as_json: bool) -> None:
    """``convert --variants``: one package of several artifacts, a report per variant."""
    from converters import convert_variants, parse_variants

    result = convert_variants(source, parse_variants(variants_csv), opts, output=output,
                              max_accuracy_drop=max_accuracy_drop / 100.0,
                              calibration=calibration, eval_data=eval_path, weights=weights,
                              sign_key=key, progress=progress_printer(as_json))
    m = result.manifest
    if as_json:
        emit_json({"output": str(result.path), "name": m.name, "version": m.version,
                   "max_accuracy_drop": m.max_accuracy_drop, "default": m.variants[0].id,
                   "variants": [{"id": v.id, "recipe": v.recipe,
                                 "report": result.reports[v.id]} for v in m.variants],
                   "warnings": result.warnings, "signed": key is not None})
        return
    for v in m.variants:
        click.echo(f"[{v.id}] " + format_report(m.name, m.version, v.recipe, result.reports[v.id]))
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {result.path} with {len(m.variants)} variants (default {m.variants[0].id},"
               f" accuracy budget {max_accuracy_drop:g} points)"
               f"{' (signed)' if key else ' (unsigned)'}")


def resolve_cli_naming(source: str, name: str | None, version: str | None,
                       db_url: str | None) -> Naming:
    """The name and version of the package: given, else from the registry (see
    :mod:`edgekit.host.naming`); each choice made is printed as a ``notice:`` on stderr.

    Raises:
        EdgekitError: ``db_url`` was given and the registry cannot be read.
    """
    from pathlib import Path

    from converters.pipeline import default_name, make_ref, source_sha256

    if name is not None and version is not None:
        return Naming(name, version)
    ref = make_ref(source)
    try:
        records = registry_records(db_url)
    except EdgekitError as exc:
        if db_url:
            raise
        # The default registry is a convenience: one that cannot be read (a full disk, a
        # database of a newer edgekit) must not stop a conversion.
        click.echo(f"notice: the registry was not read ({exc.message}); naming without it",
                   err=True)
        records = []
    sha = source_sha256(ref.path) if ref.path is not None and records else None
    reference = str(Path(source)) if ref.path is not None else source
    naming = resolve_naming(name=name, version=version, stem=default_name(ref),
                            source_sha256=sha, source_ref=reference, records=records)
    for notice in naming.notices:
        click.echo(f"notice: {notice}", err=True)
    return naming


def format_report(name: str, version: str, recipe: dict[str, Any], report: dict[str, Any]) -> str:
    """The human conversion report: one table of source against artifact."""
    lat = report.get("latency", {})
    size = report.get("size", {})
    par = report.get("parity", {})
    acc = report.get("accuracy")
    rows = [("", "source", "artifact")]
    if size:
        rows.append(("size", _kb(size.get("source_bytes")), _kb(size.get("artifact_model_bytes"))))
    if lat:
        rows.append((f"latency p50 (batch 1, {lat.get('threads')} thr)",
                     f"{lat['source']['p50_ms']:.3f} ms", f"{lat['artifact']['p50_ms']:.3f} ms"))
        rows.append(("latency p95", f"{lat['source']['p95_ms']:.3f} ms",
                     f"{lat['artifact']['p95_ms']:.3f} ms"))
    if acc:
        for key in ("accuracy", "precision", "recall", "f1"):
            rows.append((key, f"{acc['source'][key]:.4f}", f"{acc['artifact'][key]:.4f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{name} {version}: {recipe.get('format', '')} "
             f"quantize={recipe.get('quantize')} exporter={recipe.get('exporter', '-')}"]
    for r in rows:
        lines.append(f"  {r[0]:<{width}}  {r[1]:>14}  {r[2]:>14}")
    top1 = par.get("top1_agreement")
    lines.append(
        f"  parity on {par.get('samples')} samples: max abs err {par.get('max_abs_error', 0):.3g},"
        f" cosine {par.get('mean_cosine', 0):.5f}"
        + (f", top-1 agreement {top1:.4f}" if top1 is not None else "")
        + (" [ok]" if par.get("passed") else " [FAILED]")
    )
    if acc:
        lines.append(f"  accuracy drop: {acc['drop'] * 100:+.2f} points")
    return "\n".join(lines)


def format_recipe(recipe: dict[str, Any]) -> str:
    """The recipe for people (``--json`` has it as an object): the format and the plain
    settings on one line, then one indented line per nested setting; unset ones left out."""
    head = [str(recipe.get("format", "-"))]
    nested = []
    for key, value in recipe.items():
        if key == "format" or value is None or value == []:
            continue
        label = key.replace("_", " ")
        if isinstance(value, dict):
            nested.append(f"    {label}: {_plain(value)}")
        elif isinstance(value, (list, tuple)):
            nested.append(f"    {label}: {', '.join(_scalar(v) for v in value)}")
        else:
            head.append(f"{label} {_scalar(value)}")
    return "\n".join([", ".join(head), *nested])


def _plain(value: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_plain(v) if isinstance(v, dict) else _scalar(v)}"
                     for k, v in value.items())


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _kb(n: int | None) -> str:
    return "-" if not n else f"{n / 1024:.1f} KiB"


@cli.command()
@click.argument("package", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def inspect(package: str, as_json: bool) -> None:
    """Show a package's manifest: model, inputs, outputs, recipe, metrics, signature."""
    pkg = open_package(package)
    m = pkg.manifest
    if as_json:
        doc = m.to_dict()
        doc["signature"] = pkg.signature
        emit_json(doc)
        return
    click.echo(f"{m.name} {m.version}  ({m.task}, {m.target['format']} for {m.target.get('runtime')})")
    click.echo(f"created {m.created} from {m.source.get('framework')} {m.source.get('reference', '')}")
    click.echo(f"recipe: {format_recipe(m.recipe)}")
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for spec in specs:
            q = f" q(scale={spec.quantization.scale:g}, zp={spec.quantization.zero_point})" if spec.quantization else ""
            click.echo(f"  {kind:<6} {spec.name}: {spec.dtype}{spec.shape}{q}")
    for member, entry in m.files.items():
        click.echo(f"  file   {member}: {entry.size} bytes sha256 {entry.sha256[:16]}...")
    sig = pkg.signature
    click.echo(f"signature: {'key ' + str(sig.get('key_id')) if sig else 'none'}")
    if m.metrics:
        click.echo(format_report(m.name, m.version, m.recipe, m.metrics))
    for v in m.variants:
        drop = v.accuracy_drop
        click.echo(f"variant {v.id}: {v.model_file}, {format_recipe(v.recipe).splitlines()[0]};"
                   f" p50 {v.metrics.get('latency', {}).get('artifact', {}).get('p50_ms', 0):.3f}"
                   f" ms here, accuracy drop"
                   f" {'-' if drop is None else f'{drop * 100:+.2f} points'}")
    if m.variants:
        budget = m.max_accuracy_drop
        click.echo("the device serves the fastest variant it measures within the accuracy"
                   f" budget of {'-' if budget is None else f'{budget * 100:g} points'}")
