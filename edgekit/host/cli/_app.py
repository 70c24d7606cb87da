"""The click group and the error handling every command shares."""

from __future__ import annotations

import functools
import json
from typing import Any

import click

from edgekit import __version__
from edgekit.errors import EdgekitError


class EdgekitClickError(click.ClickException):
    """Carries an :class:`EdgekitError` through click: printed once, with its exit code."""

    def __init__(self, error: EdgekitError) -> None:
        super().__init__(error.message)
        self.error = error

    @classmethod
    def wrap(cls, error: EdgekitError) -> EdgekitClickError:
        """An instance whose class carries the error's exit code (click reads it there)."""
        return _exit_class(error.exit_code)(error)

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.error.format()}", err=True)


@functools.cache
def _exit_class(code: int) -> type[EdgekitClickError]:
    return type(f"EdgekitExit{code}", (EdgekitClickError,), {"exit_code": code})


class EdgekitGroup(click.Group):
    """A group whose commands turn :class:`EdgekitError` into a clean exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgekitError as exc:
            raise EdgekitClickError.wrap(exc) from exc


@click.group(cls=EdgekitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekit")
def cli() -> None:
    """edgekit: convert models for edge devices, deploy them over MQTT, keep them good.

    \b
    Common commands:
      edgekit convert MODEL --to onnx --quantize int8 --calibration c.npz -o m.edgepkg
      edgekit inspect m.edgepkg
      edgekit keys generate signing && edgekit sign m.edgepkg --key signing.key
      edgekit verify m.edgepkg --trusted-key signing.pub
      edgekit doctor
    """


def emit_json(data: Any) -> None:
    """Write a JSON document to stdout (the stable ``--json`` output)."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def progress_printer(quiet: bool = False) -> Any:
    """A progress callback that prints each step to stderr (so --json stdout stays clean)."""

    def _print(step: str) -> None:
        if not quiet:
            click.echo(f"... {step}", err=True)

    return _print


def main() -> None:
    cli(prog_name="edgekit")
