"""Operator login and CSRF protection of the console.

Every visitor gets a session: a random id in an HttpOnly, ``SameSite=Strict`` cookie that
points at a server-side record holding its CSRF token and whether it logged in. A state-
changing request (login, logout, an action) must carry that token in its form field
``csrf_token`` or its ``X-CSRF-Token`` header, and actions also need a logged-in session:
a page on another site can neither send the cookie (same-site) nor read the token.

The operator's password is kept only as an scrypt hash (``[console] password_hash``, made
by :func:`hash_password`), or given as ``$EDGEKIT_CONSOLE_PASSWORD`` and hashed at start;
neither the password nor its hash is ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

from edgekit.errors import ConfigError

__all__ = ["COOKIE", "Session", "Sessions", "check_hash", "hash_password", "verify_password"]

COOKIE = "edgekit_console"
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_SESSION_TTL_S = 12 * 3600.0
_MAX_SESSIONS = 2000


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$<salt hex>$<hash hex>`` of ``password`` (for ``password_hash``)."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT, dklen=32)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def check_hash(stored: str) -> None:
    """Raises: ConfigError: ``stored`` is not what :func:`hash_password` writes."""
    parts = stored.split("$")
    try:
        ok = len(parts) == 6 and parts[0] == "scrypt" and all(int(p) > 0 for p in parts[1:4]) \
            and len(bytes.fromhex(parts[4])) >= 8 and len(bytes.fromhex(parts[5])) == 32
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError("config console.password_hash is not an scrypt hash",
                          hint="make one with `edgekit console --hash-password`")


def verify_password(stored: str, password: str) -> bool:
    """Whether ``password`` matches the hash ``stored`` (constant-time comparison)."""
    try:
        _, n, r, p, salt, digest = stored.split("$")
        found = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r),
                               p=int(p), dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(found.hex(), digest)


@dataclass
class Session:
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    operator: bool = False
    created: float = field(default_factory=time.monotonic)

    def check_csrf(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf, token or "")


class Sessions:
    """Server-side sessions by id; old ones expire, the oldest go first past the cap."""

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, sid: str | None) -> Session | None:
        with self._lock:
            found = self._by_id.get(sid or "")
            if found is not None and time.monotonic() - found.created > _SESSION_TTL_S:
                del self._by_id[sid or ""]
                return None
            return found

    def new(self) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            while len(self._by_id) >= _MAX_SESSIONS:
                del self._by_id[next(iter(self._by_id))]
            self._by_id[sid] = session = Session()
        return sid, session

    def login(self, sid: str) -> tuple[str, Session]:
        """A fresh session id (and token) for a login: an id set before it is not kept."""
        with self._lock:
            self._by_id.pop(sid, None)
        new_sid, session = self.new()
        session.operator = True
        return new_sid, session

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)
