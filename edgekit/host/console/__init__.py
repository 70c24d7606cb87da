"""The fleet console: a web UI over the fleet database, live, with operator actions.

Served by ``edgekit controller run --console HOST:PORT`` (or ``[console] listen``), by
``edgekit demo --console HOST:PORT`` and by ``edgekit console``; docs/console.md describes
its pages, login and actions. Needs the ``host`` extra (Starlette, uvicorn).
"""

from __future__ import annotations

from edgekit.host.console._auth import hash_password, verify_password
from edgekit.host.console._server import PASSWORD_ENV, ConsoleServer, parse_listen

__all__ = ["PASSWORD_ENV", "ConsoleServer", "hash_password", "parse_listen", "verify_password"]
