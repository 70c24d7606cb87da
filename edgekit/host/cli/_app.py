"""The click group and the error handling every command shares."""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

import click

from edgekit import __version__
from edgekit.errors import (
    ArtifactError,
    DataError,
    EdgekitError,
    ModelError,
    SignatureError,
    UsageError,
)

DEBUG_ENV = "EDGEKIT_DEBUG"

# A hint for errors raised without one, so every error tells the user where to look next.
_DEFAULT_HINTS: tuple[tuple[type[EdgekitError], str], ...] = (
    (SignatureError, "sign with `edgekit sign PKG --key KEY` and check with"
                     " `edgekit verify PKG --trusted-key KEY.pub`"),
    (ArtifactError, "check the path; `edgekit inspect PKG` and `edgekit verify PKG"
                    " --trusted-key KEY.pub` show what a package holds"),
    (DataError, "save data with numpy.savez(path, <input name>=array, y=labels);"
                " `edgekit inspect PKG` lists the inputs"),
    (ModelError, "check the path and the model format (see `edgekit convert --help`)"),
    (UsageError, "see the command's --help"),
)


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
        error = self.error
        if error.hint is None:
            error.hint = default_hint(error)
        click.echo(f"error: {error.format()}", err=True)


def default_hint(error: EdgekitError) -> str:
    """The hint printed for an error raised without one."""
    for cls, hint in _DEFAULT_HINTS:
        if isinstance(error, cls):
            return hint
    return "rerun with --debug for the full traceback"


@functools.cache
def _exit_class(code: int) -> type[EdgekitClickError]:
    return type(f"EdgekitExit{code}", (EdgekitClickError,), {"exit_code": code})


class EdgekitGroup(click.Group):
    """The top-level group: every failure below it ends as ``error:`` + ``hint:`` lines.

    An :class:`EdgekitError` keeps its exit code; click's own usage errors (a missing
    option, a file argument that does not exist) exit 2 in the same format; any other
    exception exits 1 with its type and message, and ``--debug`` (or ``EDGEKIT_DEBUG=1``)
    lets its traceback through instead.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgekitError as exc:
            raise EdgekitClickError.wrap(exc) from exc
        except click.exceptions.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "edgekit"
            raise EdgekitClickError.wrap(UsageError(
                exc.format_message(), hint=f"see `{where} --help`")) from exc
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:
            # The reader went away (`edgekit ... | head`): nothing is left to say to it.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise click.exceptions.Exit(1) from None
        except Exception as exc:
            if _debug(ctx):
                raise
            text = (str(exc).strip().splitlines() or [""])[0][:400]
            raise EdgekitClickError.wrap(EdgekitError(
                f"unexpected {type(exc).__name__}: {text}",
                hint="rerun with --debug for the traceback; please report it")) from exc


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.params.get("debug")) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


@click.group(cls=EdgekitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekit")
@click.option("--debug", is_flag=True,
              help=f"Show the traceback of an unexpected error (or set {DEBUG_ENV}=1).")
def cli(debug: bool) -> None:
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
