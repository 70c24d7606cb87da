"""``edgekit doctor``: which runtimes, converters and services are available here."""

from __future__ import annotations

import importlib

import click

from edgekit.host.cli._app import cli, emit_json
from edgekit.runtimes import availability

_CONVERTER_SDKS = ("torch", "onnx", "onnxscript", "tensorflow", "tf2onnx", "litert_torch",
                   "ai_edge_quantizer")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def doctor(as_json: bool) -> None:
    """Show which runtimes and converter SDKs import on this machine."""
    runtimes = [vars(info) for info in availability()]
    sdks = {}
    for name in _CONVERTER_SDKS:
        try:
            mod = importlib.import_module(name)
            sdks[name] = {"available": True, "version": str(getattr(mod, "__version__", "?"))}
        except Exception as exc:  # a broken native library raises more than ImportError
            sdks[name] = {"available": False, "detail": f"{type(exc).__name__}: {exc}"}
    if as_json:
        emit_json({"runtimes": runtimes, "converter_sdks": sdks})
        return
    click.echo("runtimes:")
    for info in runtimes:
        mark = "ok " if info["available"] else "-- "
        click.echo(f"  {mark}{info['key']:<12} {info['format']:<7} {info['version'] or '':<10} {info['detail']}")
    click.echo("converter SDKs:")
    for name, state in sdks.items():
        mark = "ok " if state["available"] else "-- "
        click.echo(f"  {mark}{name:<18} {state.get('version') or state.get('detail')}")
