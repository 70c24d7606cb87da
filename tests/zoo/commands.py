"""``edgekit`` commands run in-process, for the evaluation, optimize, prune and distill tests."""

from __future__ import annotations

import json

from click.testing import CliRunner, Result

from edgekit.host.cli import cli


def run_cli(*args: object) -> Result:
    """``edgekit ARGS...`` through click's CliRunner, each argument turned into a string."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def cli_json(result: Result) -> dict:
    """The JSON a command printed; fails the test, showing the output, when it did not succeed."""
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)
