"""``edgekit registry push|list|show|promote`` and ``edgekit data export``.

The database is ``--db`` (else ``$EDGEKIT_DB``, else ``~/.edgekit/edgekit.db``), the artifact
folder ``--store`` (else ``$EDGEKIT_STORE``, else ``~/.edgekit/artifacts``). ``--json`` output
keys are stable: docs/database.md lists them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from edgekit.host.cli._app import cli, emit_json
from edgekit.signing import load_public_key

if TYPE_CHECKING:
    from edgekit.host.db import ModelRecord, Store
    from edgekit.host.registry import Registry

F = TypeVar("F", bound=Callable[..., Any])


def _db_option(fn: F) -> F:
    return click.option("--db", "db_url", metavar="URL",
                        help="Database URL (default: $EDGEKIT_DB or ~/.edgekit/edgekit.db).")(fn)


def _store_option(fn: F) -> F:
    return click.option("--store", "store_dir", type=click.Path(file_okay=False), metavar="DIR",
                        help="Artifact folder (default: $EDGEKIT_STORE or"
                             " ~/.edgekit/artifacts).")(fn)


def _open(db_url: str | None) -> Store:
    # The host side needs SQLAlchemy; import it only when a host command runs.
    from edgekit.host.db import Store

    return Store(db_url)


def _registry(db_url: str | None, store_dir: str | None) -> Registry:
    from edgekit.host.registry import Registry

    return Registry(_open(db_url), store_dir)


def _model_json(reg: Registry, record: ModelRecord, *, full: bool) -> dict[str, Any]:
    from edgekit.host.registry import evaluation_summary

    out = record.to_dict(with_manifest=full)
    if not full:
        out.pop("evaluation")
    out["artifact"] = str(reg.path_of(record))
    out["summary"] = evaluation_summary(record.evaluation)
    if full:
        out["lineage"] = reg.lineage(record)
    return out


@cli.group()
def registry() -> None:
    """Registered models: packages with their evaluation results and lineage."""


@registry.command("push")
@click.argument("package", type=click.Path(dir_okay=False))
@click.option("--parent", metavar="NAME:VERSION", help="The model this one was derived from.")
@click.option("--data", "data_desc", metavar="DESC",
              help="What data the model was trained on (free text, kept as lineage).")
@click.option("--trusted-key", "trusted", multiple=True, type=click.Path(dir_okay=False),
              help="Require a signature by this public key (repeatable).")
@_db_option
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def registry_push(package: str, parent: str | None, data_desc: str | None,
                  trusted: tuple[str, ...], db_url: str | None, store_dir: str | None,
                  as_json: bool) -> None:
    """Verify PACKAGE and add it to the registry (the same package again is a no-op)."""
    keys = [load_public_key(k) for k in trusted]
    reg = _registry(db_url, store_dir)
    try:
        result = reg.push(package, trusted_keys=keys, parent=parent, data=data_desc)
        if as_json:
            emit_json({"created": result.created,
                       "model": _model_json(reg, result.record, full=False)})
            return
    finally:
        reg.store.close()
    rec = result.record
    if not result.created:
        click.echo(f"{rec.ref} is already registered (same package, sha256 {rec.sha256[:12]})")
        return
    click.echo(f"registered {rec.ref}: {rec.format} {rec.task}, {rec.size} bytes,"
               f" {_signed_text(rec)}")
    click.echo(f"  artifact {result.path}")


@registry.command("list")
@click.option("--name", help="Only this model's versions.")
@_db_option
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print the models as JSON.")
def registry_list(name: str | None, db_url: str | None, store_dir: str | None,
                  as_json: bool) -> None:
    """List registered models, by name and version."""
    from edgekit.host.registry import evaluation_summary

    reg = _registry(db_url, store_dir)
    try:
        records = reg.list_models(name)
    finally:
        reg.store.close()
    if as_json:
        emit_json({"models": [_model_json(reg, r, full=False) for r in records]})
        return
    if not records:
        click.echo("no models registered")
        return
    rows = [("MODEL", "FORMAT", "TASK", "SIZE", "ACCURACY", "CHANNELS", "PARENT")]
    for r in records:
        acc = evaluation_summary(r.evaluation)["accuracy"]
        rows.append((r.ref, r.format, r.task, str(r.size),
                     "-" if acc is None else f"{acc:.4f}", ",".join(r.channels) or "-",
                     r.parent or "-"))
    _table(rows)


@registry.command("show")
@click.argument("ref", metavar="NAME[:VERSION]")
@_db_option
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print the full record as JSON.")
def registry_show(ref: str, db_url: str | None, store_dir: str | None, as_json: bool) -> None:
    """Show one model (its highest version without :VERSION): lineage, metrics, recipe."""
    from edgekit.host.registry import evaluation_summary, parse_ref

    name, version = parse_ref(ref)
    reg = _registry(db_url, store_dir)
    try:
        record = reg.get(name, version)
        doc = _model_json(reg, record, full=True)
    finally:
        reg.store.close()
    if as_json:
        emit_json(doc)
        return
    summary = evaluation_summary(record.evaluation)
    lines = [
        ("format", f"{record.format} ({record.task})"),
        ("sha256", record.sha256),
        ("size", f"{record.size} bytes"),
        ("signed", _signed_text(record)),
        ("channels", ", ".join(record.channels) or "-"),
        ("registered", doc["created"]),
        ("artifact", doc["artifact"]),
        ("lineage", " <- ".join([record.ref, *doc["lineage"]])),
        ("data", record.data or "-"),
        ("recipe", json.dumps(record.recipe, sort_keys=True) if record.recipe else "-"),
        ("accuracy", _fmt_accuracy(summary)),
        ("latency", _fmt_latency(summary)),
        ("parity", {True: "passed", False: "FAILED", None: "-"}[summary["parity_passed"]]),
    ]
    click.echo(record.ref)
    for key, value in lines:
        click.echo(f"  {key:<11} {value}")


@registry.command("promote")
@click.argument("ref", metavar="NAME:VERSION")
@click.option("--channel", default="stable", show_default=True,
              help="Channel to point at this version.")
@_db_option
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print the model as JSON.")
def registry_promote(ref: str, channel: str, db_url: str | None, store_dir: str | None,
                     as_json: bool) -> None:
    """Point CHANNEL of the model at this version."""
    from edgekit.host.registry import parse_ref

    name, version = parse_ref(ref, need_version=True)
    assert version is not None
    reg = _registry(db_url, store_dir)
    try:
        record = reg.promote(name, version, channel)
        doc = _model_json(reg, record, full=False)
    finally:
        reg.store.close()
    if as_json:
        emit_json(doc)
        return
    click.echo(f"{channel} -> {record.ref}")


@cli.group("data")
def data_group() -> None:
    """Labelled data collected from the fleet."""


@data_group.command("export")
@click.option("--since", required=True, metavar="ISO|DURATION",
              help="Samples from this time on: 2026-05-01T12:00:00Z, or 30m, 2h, 7d ago.")
@click.option("--fleet", help="Only this fleet.")
@click.option("--device", help="Only this device.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The .npz to write (inputs by name, labels under y).")
@_db_option
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def data_export(since: str, fleet: str | None, device: str | None, output: str,
                db_url: str | None, as_json: bool) -> None:
    """Write the labelled field samples to an .npz that `edgekit convert --eval` reads."""
    from edgekit.data import save_npz
    from edgekit.host.db import parse_since
    from edgekit.host.db._timeutil import iso

    start = parse_since(since)
    store = _open(db_url)
    try:
        dataset = store.export_samples(start, fleet=fleet, device=device)
    finally:
        store.close()
    assert dataset.labels is not None
    save_npz(output, dataset.inputs, dataset.labels)
    arrays = {**dataset.inputs, "y": dataset.labels}
    if as_json:
        emit_json({"output": str(Path(output)), "samples": len(dataset), "since": iso(start),
                   "fleet": fleet, "device": device,
                   "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.name}
                              for k, v in arrays.items()}})
        return
    layout = "; ".join(f"{k} {list(v.shape)} {v.dtype.name}" for k, v in arrays.items())
    click.echo(f"wrote {len(dataset)} samples to {output} ({layout})")


def _signed_text(record: ModelRecord) -> str:
    if not record.signed:
        return "unsigned"
    if record.signature_verified:
        return f"signed by {record.key_id} (verified)"
    return f"signed by {record.key_id or 'unknown key'} (not checked: no --trusted-key)"


def _fmt_accuracy(summary: dict[str, Any]) -> str:
    if summary["accuracy"] is None:
        return "-"
    text = f"{summary['accuracy']:.4f}"
    if summary["f1"] is not None:
        text += f" (macro F1 {summary['f1']:.4f}"
        text += f", {summary['eval_samples']} samples)" if summary["eval_samples"] else ")"
    return text


def _fmt_latency(summary: dict[str, Any]) -> str:
    if summary["latency_p50_ms"] is None:
        return "-"
    return f"p50 {summary['latency_p50_ms']:.3f} ms, p95 {summary['latency_p95_ms']:.3f} ms"


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
