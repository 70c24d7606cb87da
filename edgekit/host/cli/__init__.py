"""The ``edgekit`` command line: one click group, one small module per command family.

Exit codes: 0 success, 1 failure, 2 usage error. An :class:`~edgekit.errors.EdgekitError`
is printed once, as ``error: <message>`` with its hint, and mapped to its exit code.
"""

from __future__ import annotations

from edgekit.host.cli import _bundle as _bundle_cmds  # noqa: F401
from edgekit.host.cli import _console as _console_cmds  # noqa: F401
from edgekit.host.cli import _controller as _controller_cmds  # noqa: F401
from edgekit.host.cli import _convert as _convert_cmds  # noqa: F401  (registers commands)
from edgekit.host.cli import _db as _db_cmds  # noqa: F401
from edgekit.host.cli import _demo as _demo_cmds  # noqa: F401
from edgekit.host.cli import _deploy as _deploy_cmds  # noqa: F401
from edgekit.host.cli import _doctor as _doctor_cmds  # noqa: F401
from edgekit.host.cli import _keys as _keys_cmds  # noqa: F401
from edgekit.host.cli import _optimize as _optimize_cmds  # noqa: F401
from edgekit.host.cli import _registry as _registry_cmds  # noqa: F401
from edgekit.host.cli._app import cli, main

__all__ = ["cli", "main"]
