"""``edgekit evaluate``, ``bench``, ``optimize``, ``prune`` and ``distill``.

``--json`` prints one document on stdout (progress goes to stderr); its keys are those of
the ``to_dict()`` of :class:`converters.evaluate.Evaluation`,
:class:`converters.bench.BenchReport`, :class:`converters.compress.OptimizeResult`,
:class:`converters.compress.PruneReport` and :class:`converters.compress.DistillReport`.
"""

from __future__ import annotations

from typing import Any

import click

from edgekit.host.cli._app import cli, emit_json, progress_printer
from edgekit.host.cli._convert import resolve_cli_naming
from edgekit.signing import load_private_key

_DATA = click.Path(exists=True, dir_okay=False)


@cli.command()
@click.argument("model")
@click.option("--data", required=True, type=_DATA, help=".npz with inputs and labels (y).")
@click.option("--task", type=click.Choice(["auto", "classification", "regression"]),
              default="auto", show_default=True,
              help="auto: the package's task, else classification for integer labels.")
@click.option("--weights", type=_DATA, help="state_dict for a package.module:factory source.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Runtime threads for a package (0: the runtime's default).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def evaluate(model: str, data: str, task: str, weights: str | None, batch: int, threads: int,
             as_json: bool) -> None:
    """Score MODEL (a .edgepkg or a source model) on labelled data.

    Classification: accuracy, macro precision / recall / F1, per-class scores and the
    confusion matrix. Regression: MAE and RMSE. A package runs in its device runtime, a
    source model in its framework; both are scored by the same functions.
    """
    from converters.evaluate import evaluate as run_evaluate
    from edgekit.evaluation import format_evaluation

    result = run_evaluate(model, data, task=task, weights=weights, batch=batch, threads=threads)
    if as_json:
        emit_json(result.to_dict())
        return
    click.echo(format_evaluation(result.report,
                                 title=f"{result.model} ({result.kind}) on {result.data}"))


@cli.command()
@click.argument("package", type=_DATA)
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Intra-op threads (0: the runtime's default).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True,
              help="Timed runs after the warm-up.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Warm-up runs, timed apart and left out of the percentiles.")
@click.option("--data", type=_DATA, help=".npz inputs (default: the package's golden samples).")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
def bench(package: str, threads: int, batch: int, runs: int, warmup: int, data: str | None,
          as_json: bool) -> None:
    """Load time, latency p50/p95/p99, throughput and memory of PACKAGE in its runtime."""
    from converters.bench import bench as run_bench

    rep = run_bench(package, threads=threads, batch=batch, runs=runs, warmup=warmup, data=data)
    if as_json:
        emit_json(rep.to_dict())
        return
    lat, mem = rep.latency, rep.memory
    click.echo(f"{rep.name} {rep.version} on {rep.runtime} {rep.runtime_version or ''}"
               f" ({rep.threads} thread(s), batch {rep.batch}, inputs: {rep.inputs})")
    click.echo(f"  load           {rep.load['total_ms']:9.2f} ms  (read {rep.load['read_ms']:.2f},"
               f" session {rep.load['session_ms']:.2f})")
    click.echo(f"  first run      {rep.first_run_ms:9.3f} ms")
    click.echo(f"  warm-up        {lat['warmup_ms']:9.3f} ms  over {lat['warmup_runs']} runs"
               " (not in the percentiles)")
    for key in ("p50", "p95", "p99", "mean"):
        click.echo(f"  latency {key:<6} {lat[key + '_ms']:9.3f} ms  ({lat['runs']} runs)")
    click.echo(f"  throughput     {rep.throughput_per_s:9.1f} samples/s")
    if mem["rss_peak_mb"] is not None:
        click.echo(f"  memory         {mem['rss_peak_mb']:9.1f} MiB peak resident"
                   f" (+{mem['rss_increase_mb']:.1f} MiB), Python peak"
                   f" {mem['python_peak_mb']:.2f} MiB")


@cli.command()
@click.argument("source")
@click.option("--eval", "eval_path", required=True, type=_DATA,
              help=".npz evaluation data (labels under y for accuracy/f1).")
@click.option("--calibration", type=_DATA, help=".npz for static int8 calibration"
              " (default: the evaluation data).")
@click.option("--metric", type=click.Choice(["accuracy", "f1", "cosine"]), default="accuracy",
              show_default=True, help="cosine: agreement with the source model's outputs.")
@click.option("--max-drop", type=float, default=0.01, show_default=True,
              help="Largest allowed metric drop from the source model (0 <= d < 1).")
@click.option("--target", type=click.Choice(["onnx", "tflite", "both"]), default="onnx",
              show_default=True)
@click.option("--objective", type=click.Choice(["latency", "size"]), default="latency",
              show_default=True, help="What the best candidate within the budget minimises.")
@click.option("--candidates", help="Comma-separated recipes, 'quick' or 'all' (default all),"
              " e.g. fp32,fp16,int8-per-channel-minmax.")
@click.option("--quick", is_flag=True, help="Same as --candidates quick.")
@click.option("--weights", type=_DATA, help="state_dict for a package.module:factory source.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Threads for every latency figure.")
@click.option("--latency-runs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--sensitivity-samples", type=click.IntRange(min=1), default=200,
              show_default=True, help="Evaluation samples per sensitivity probe.")
@click.option("--max-probes", type=click.IntRange(min=1), default=24, show_default=True,
              help="Most sensitivity probes (nodes are grouped beyond this).")
@click.option("--name", help="Model name (default: the registry's name for this source, else"
                             " the file stem, with a notice).")
@click.option("--version", "version",
              help="Dotted version (default: the next patch after the registry's highest"
                   " version of the name; 0.1.0 for a new name).")
@click.option("--db", "db_url", metavar="URL",
              help="Registry database the default name and version come from (default:"
                   " $EDGEKIT_DB or ~/.edgekit/edgekit.db when it exists).")
@click.option("--sign-key", type=_DATA, help="Private key to sign the package with.")
@click.option("--no-plot", is_flag=True, help="Do not write the PNG plot.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the chosen .edgepkg (the plot goes beside it).")
@click.option("--json", "as_json", is_flag=True, help="Print the decision and table as JSON.")
def optimize(source: str, eval_path: str, calibration: str | None, metric: str,
             max_drop: float, target: str, objective: str, candidates: str | None,
             quick: bool, weights: str | None, threads: int, latency_runs: int,
             sensitivity_samples: int, max_probes: int, name: str | None,
             version: str | None, db_url: str | None, sign_key: str | None, no_plot: bool,
             output: str, as_json: bool) -> None:
    """Convert SOURCE with every candidate recipe and keep the best within the budget.

    Each candidate is measured on the metric, latency (same threads, same run) and size;
    when no int8 candidate meets the budget, the most sensitive nodes are kept in float.
    The table and the reason go into the package's manifest (extra.optimize).
    """
    from converters import ConvertOptions
    from converters.compress import optimize as run_optimize

    names = ["quick"] if quick else (
        [c.strip() for c in candidates.split(",") if c.strip()] if candidates else None)
    targets = ("onnx", "tflite") if target == "both" else (target,)
    naming = resolve_cli_naming(source, name, version, db_url)
    opts = ConvertOptions(name=naming.name, version=naming.version, threads=threads).validate()
    key = load_private_key(sign_key) if sign_key else None
    result = run_optimize(
        source, eval_data=eval_path, output=output, calibration=calibration, metric=metric,
        max_drop=max_drop, targets=targets, objective=objective, candidates=names,
        weights=weights, options=opts, latency_runs=latency_runs,
        sensitivity_samples=sensitivity_samples, max_probes=max_probes, sign_key=key,
        plot=not no_plot, progress=progress_printer(as_json))
    if as_json:
        emit_json(result.to_dict())
        return
    click.echo(result.table)
    click.echo(f"\nchosen: {result.chosen['name']}\nreason: {result.reason}")
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {result.output}{' (signed)' if key else ' (unsigned)'}"
               + (f" and {result.plot}" if result.plot else ""))


def _figures_table(before: dict[str, Any], after: dict[str, Any], labels: tuple[str, str]
                   ) -> str:
    rows = [("", *labels),
            ("parameters", f"{before['parameters']:,}", f"{after['parameters']:,}"),
            ("non-zero parameters", f"{before['nonzero_parameters']:,}",
             f"{after['nonzero_parameters']:,}"),
            (".pt2 size", f"{before['program_bytes'] / 1024:.1f} KiB",
             f"{after['program_bytes'] / 1024:.1f} KiB"),
            ("latency p50 (eager)", f"{before['latency_p50_ms']:.3f} ms",
             f"{after['latency_p50_ms']:.3f} ms")]
    for key in ("accuracy", "f1"):
        if before.get(key) is not None and after.get(key) is not None:
            rows.append((key, f"{before[key]:.4f}", f"{after[key]:.4f}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {r[0]:<{width}}  {r[1]:>14}  {r[2]:>14}" for r in rows)


@cli.command()
@click.argument("source")
@click.option("--sparsity", type=float, required=True,
              help="Fraction to remove: of all weights, or of each layer's channels.")
@click.option("--structured", is_flag=True,
              help="Remove whole channels (smaller and faster), not single weights.")
@click.option("--finetune", type=_DATA, help="Labelled .npz to fine-tune on after pruning.")
@click.option("--epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fine-tuning epochs (with --finetune).")
@click.option("--eval", "eval_path", type=_DATA, help="Labelled .npz for accuracy before/after.")
@click.option("--weights", type=_DATA, help="state_dict for a package.module:factory source.")
@click.option("--input-shape", "input_shapes", multiple=True,
              help="NAME:1x1x8x8[:DTYPE] example input (repeatable); else taken from the data.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Threads for the latency figures.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the pruned torch.export program (.pt2).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def prune(source: str, sparsity: float, structured: bool, finetune: str | None, epochs: int,
          eval_path: str | None, weights: str | None, input_shapes: tuple[str, ...],
          lr: float, batch: int, seed: int, threads: int, output: str, as_json: bool) -> None:
    """Magnitude-prune a PyTorch SOURCE and write a .pt2 that `edgekit convert` takes."""
    import numpy as np

    from converters import parse_input_shape
    from converters.compress import prune as run_prune

    example = None
    if input_shapes:
        example = {}
        for text in input_shapes:
            in_name, dims, dtype = parse_input_shape(text)
            example[in_name] = np.zeros(dims, dtype=dtype or "float32")
    rep = run_prune(source, sparsity=sparsity, structured=structured, output=output,
                    weights=weights, finetune=finetune, epochs=epochs, eval_data=eval_path,
                    lr=lr, batch=batch, seed=seed, threads=threads, example=example,
                    progress=progress_printer(as_json))
    if as_json:
        emit_json(rep.to_dict())
        return
    click.echo(f"{rep.mode} pruning at sparsity {rep.sparsity:g}")
    click.echo(_figures_table(rep.before.to_dict(), rep.after.to_dict(), ("before", "after")))
    click.echo(f"  {'compressed .pt2':<19}  {rep.compressed_bytes['before'] / 1024:>10.1f} KiB"
               f"  {rep.compressed_bytes['after'] / 1024:>10.1f} KiB")
    for layer in rep.layers:
        if "kept" in layer:
            click.echo(f"  {layer['layer']}: {layer['kept']} of {layer['channels']} channels")
        else:
            click.echo(f"  {layer['layer']}: {layer['zeros']:.1%} of {layer['weights']} weights"
                       " zero")
    for skipped, why in rep.skipped.items():
        click.echo(f"  {skipped}: kept whole ({why})")
    for note in rep.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {rep.output}")


@cli.command()
@click.option("--teacher", required=True, help="Teacher model (any source convert takes).")
@click.option("--student", required=True, help="package.module:factory building the student.")
@click.option("--data", required=True, type=_DATA, help="Labelled .npz to train on.")
@click.option("--eval", "eval_path", type=_DATA, help="Labelled .npz for the accuracies"
              " (default: the training data).")
@click.option("--temperature", type=float, default=4.0, show_default=True)
@click.option("--alpha", type=float, default=0.7, show_default=True,
              help="Weight of the soft-target loss (1 - alpha for the labels).")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--teacher-weights", type=_DATA, help="state_dict for a factory teacher.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Threads for the latency figures (training runs on one).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the student's torch.export program (.pt2).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def distill(teacher: str, student: str, data: str, eval_path: str | None, temperature: float,
            alpha: float, epochs: int, seed: int, lr: float, batch: int,
            teacher_weights: str | None, threads: int, output: str, as_json: bool) -> None:
    """Train STUDENT on the TEACHER's softened outputs and the labels; write a .pt2."""
    from converters.compress import distill as run_distill

    rep = run_distill(teacher, student, data=data, output=output, eval_data=eval_path,
                      temperature=temperature, alpha=alpha, epochs=epochs, seed=seed, lr=lr,
                      batch=batch, teacher_weights=teacher_weights, threads=threads,
                      progress=progress_printer(as_json))
    if as_json:
        emit_json(rep.to_dict())
        return
    t, s = rep.teacher, rep.student
    click.echo(f"distilled {t['reference']} into {rep.settings['student']}"
               f" (T={temperature:g}, alpha={alpha:g}, {epochs} epochs, seed {seed})")
    click.echo(f"  {'':<12}  {'teacher':>12}  {'student':>12}")
    if t.get("parameters"):
        click.echo(f"  {'parameters':<12}  {t['parameters']:>12,}  {s.parameters:>12,}"
                   f"  ({rep.parameter_ratio:.1f}x fewer)")
    if t.get("bytes"):
        click.echo(f"  {'size':<12}  {t['bytes'] / 1024:>8.1f} KiB  "
                   f"{s.program_bytes / 1024:>8.1f} KiB")
    click.echo(f"  {'latency p50':<12}  {t['latency_p50_ms']:>9.3f} ms  {s.latency_p50_ms:>9.3f} ms")
    if t.get("accuracy") is not None and s.accuracy is not None:
        click.echo(f"  {'accuracy':<12}  {t['accuracy']:>12.4f}  {s.accuracy:>12.4f}"
                   f"  on {rep.settings['eval']}")
    click.echo(f"wrote {rep.output}")
