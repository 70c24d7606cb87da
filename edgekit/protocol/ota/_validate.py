"""Field checks for OTA payloads; every error names the key that is wrong (``desired.model.size``).

Each check takes the object, the key and where the object sits in the document. A field with
a ``default`` may be absent; a ``nullable`` field may be JSON null.
"""

from __future__ import annotations

import math
import re
from typing import Any

from edgekit.errors import ProtocolError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class _Required:
    """Marks a field without a default."""


REQUIRED: Any = _Required()


def kind_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "integer",
            float: "number"}.get(type(value), type(value).__name__)


def obj(value: Any, where: str) -> dict[str, Any]:
    """Raises: ProtocolError: ``value`` is not a JSON object."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: expected an object, found {kind_name(value)}")
    return value


def _present(doc: dict[str, Any], key: str, where: str, default: Any,
             nullable: bool) -> tuple[bool, Any]:
    """(whether to check the value, the value or the default)."""
    if key not in doc:
        if default is REQUIRED:
            raise ProtocolError(f"{where}.{key}: missing")
        return False, default
    value = doc[key]
    if value is None:
        if not nullable:
            raise ProtocolError(f"{where}.{key}: must not be null")
        return False, None
    return True, value


def field(doc: dict[str, Any], key: str, where: str) -> Any:
    """Raises: ProtocolError: ``key`` is missing."""
    if key not in doc:
        raise ProtocolError(f"{where}.{key}: missing")
    return doc[key]


def strings(doc: dict[str, Any], key: str, where: str, *, nullable: bool = False,
            max_items: int = 10_000) -> Any:
    """A list of non-empty strings.

    Raises:
        ProtocolError: missing, not a list, longer than ``max_items``, or an entry that is not
            a non-empty string.
    """
    check, value = _present(doc, key, where, REQUIRED, nullable)
    if not check:
        return value
    if not isinstance(value, list) or len(value) > max_items:
        raise ProtocolError(f"{where}.{key}: expected a list of at most {max_items} strings,"
                            f" found {kind_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise ProtocolError(f"{where}.{key}[{i}]: expected a non-empty string,"
                                f" found {kind_name(item)}")
    return list(value)


def text(doc: dict[str, Any], key: str, where: str, *, default: Any = REQUIRED,
         nullable: bool = False, max_len: int = 1024) -> Any:
    """Raises: ProtocolError: missing, not a string, empty or longer than ``max_len``."""
    check, value = _present(doc, key, where, default, nullable)
    if check and (not isinstance(value, str) or not value or len(value) > max_len):
        raise ProtocolError(f"{where}.{key}: expected a non-empty string of at most {max_len}"
                            f" characters, found {kind_name(value)}")
    return value


def integer(doc: dict[str, Any], key: str, where: str, *, low: int = 0, high: int | None = None,
            default: Any = REQUIRED, nullable: bool = False) -> Any:
    """Raises: ProtocolError: missing, not an integer, or outside ``[low, high]``."""
    check, value = _present(doc, key, where, default, nullable)
    if not check:
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{where}.{key}: expected an integer, found {kind_name(value)}")
    _bounds(value, low, high, f"{where}.{key}")
    return value


def number(doc: dict[str, Any], key: str, where: str, *, low: float = 0.0,
           high: float | None = None, default: Any = REQUIRED, nullable: bool = False) -> Any:
    """Raises: ProtocolError: missing, not a finite number, or outside ``[low, high]``."""
    check, value = _present(doc, key, where, default, nullable)
    if not check:
        return value
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ProtocolError(f"{where}.{key}: expected a finite number, found {kind_name(value)}")
    _bounds(value, low, high, f"{where}.{key}")
    return float(value)


def boolean(doc: dict[str, Any], key: str, where: str, *, default: Any = REQUIRED) -> Any:
    """Raises: ProtocolError: missing, or not true/false."""
    check, value = _present(doc, key, where, default, False)
    if check and not isinstance(value, bool):
        raise ProtocolError(f"{where}.{key}: expected true or false, found {kind_name(value)}")
    return value


def sha256(doc: dict[str, Any], key: str, where: str, *, nullable: bool = False) -> Any:
    """Raises: ProtocolError: missing, or not 64 lowercase hex digits."""
    check, value = _present(doc, key, where, REQUIRED, nullable)
    if check and (not isinstance(value, str) or not SHA256_RE.match(value)):
        shown = repr(value) if isinstance(value, str) else kind_name(value)
        raise ProtocolError(f"{where}.{key}: expected a sha256 (64 lowercase hex digits),"
                            f" found {shown[:80]}")
    return value


def _bounds(value: float, low: float, high: float | None, where: str) -> None:
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ProtocolError(f"{where}: {value} is outside {bound}")
