"""``edgekit doctor``: which runtimes, converters and services are available here."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import os
from collections.abc import Iterator
from typing import Any

import click

from edgekit.host.cli._app import cli, emit_json
from edgekit.runtimes import availability

# Import name -> distribution name (the version comes from the distribution's metadata, so
# nothing heavy is imported unless --deep asks for it).
_CONVERTER_SDKS = {"torch": "torch", "onnx": "onnx", "onnxscript": "onnxscript",
                   "tensorflow": "tensorflow", "tf2onnx": "tf2onnx",
                   "litert_torch": "litert-torch", "ai_edge_quantizer": "ai-edge-quantizer"}
# Some SDKs ship under another distribution name on some platforms.
_ALT_DISTS = {"tensorflow": ("tensorflow-cpu", "tf-nightly"),
              "ai_edge_quantizer": ("ai-edge-quantizer-nightly",)}


@cli.command()
@click.option("--deep", is_flag=True,
              help="Also import each converter SDK to prove it loads (slow: seconds each).")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def doctor(deep: bool, as_json: bool) -> None:
    """Show which runtimes and converter SDKs are installed on this machine.

    Versions come from the installed packages' metadata; --deep imports each SDK too.
    """
    runtimes = [vars(info) for info in availability()]
    sdks = {name: sdk_state(name, deep=deep) for name in _CONVERTER_SDKS}
    if as_json:
        emit_json({"runtimes": runtimes, "converter_sdks": sdks})
        return
    click.echo("runtimes:")
    for info in runtimes:
        mark = "ok " if info["available"] else "-- "
        click.echo(f"  {mark}{info['key']:<12} {info['format']:<7} {info['version'] or '':<10}"
                   f" {info['detail']}")
    click.echo("converter SDKs:" + ("" if deep else " (installed; --deep imports them)"))
    for name, state in sdks.items():
        mark = "ok " if state["available"] else "-- "
        click.echo(f"  {mark}{name:<18} {state.get('version') or state.get('detail')}")


def sdk_state(name: str, *, deep: bool = False) -> dict[str, Any]:
    """``{"available", "version"}`` (or ``"detail"``) of one converter SDK."""
    version = _dist_version(name)
    if version is None or importlib.util.find_spec(name) is None:
        return {"available": False, "detail": "not installed"}
    if deep:
        try:
            with _quiet_native_logs():
                importlib.import_module(name)
        except Exception as exc:  # a broken native library raises more than ImportError
            return {"available": False, "version": version,
                    "detail": f"{type(exc).__name__}: {exc}"}
    return {"available": True, "version": version}


def _dist_version(name: str) -> str | None:
    for dist in (_CONVERTER_SDKS[name], *_ALT_DISTS.get(name, ())):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@contextlib.contextmanager
def _quiet_native_logs() -> Iterator[None]:
    """Keep TF/absl/torchao start-up chatter (C++ logs on fd 2, Python warnings) out of the
    report: it says nothing about whether the SDK works."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import warnings

    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, warnings.catch_warnings(), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
