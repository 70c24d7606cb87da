"""How a device may use a thin link for one update: the ``transfer`` of a desired document.

::

    "transfer": {"max_kbps": 256, "window": "01:00-05:00"}

``max_kbps`` caps the rate at which the device asks for chunks (kilobits per second of
artifact bytes; null: no cap); ``window`` is the maintenance window, ``HH:MM-HH:MM`` in the
device's local time (a window whose end is not after its start runs over midnight; null:
any time), outside which the device asks for no chunk. Both are optional and the whole
object may be absent (older devices ignore it). :class:`Transfer` is the field's type; it is
decoded with the desired document, which then checks the window (:func:`check_transfer`). A device combines them with its own
``ota.max_kbps`` and ``ota.maintenance_window`` (docs/ota.md, *Thin links*).
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
from msgspec import Meta

from edgekit.errors import ProtocolError

__all__ = ["MAX_KBPS", "Transfer", "check_transfer", "make_transfer", "parse_window"]

MAX_KBPS = 10_000_000  # 10 Gbit/s: anything above is no cap at all
_WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


class Transfer(msgspec.Struct, kw_only=True, frozen=True):
    """The ``transfer`` of a desired document; both fields are always encoded."""

    # chunk requests at most this many kbit/s of artifact bytes; None: no cap
    max_kbps: Annotated[int, Meta(ge=1, le=MAX_KBPS)] | None = None
    # HH:MM-HH:MM, the device's local time; None: any time
    window: Annotated[str, Meta(min_length=1, max_length=16)] | None = None


def parse_window(text: str, where: str = "window") -> tuple[int, int] | None:
    """``HH:MM-HH:MM`` as (start, end) minutes after midnight; None for an empty text.

    Raises:
        ProtocolError: not two 24-hour times, or both the same (an empty window).
    """
    if not text:
        return None
    match = _WINDOW_RE.match(text)
    if match is None:
        raise ProtocolError(f"{where}: {text!r} is not HH:MM-HH:MM",
                            hint="for example 01:00-05:00 (local time; 22:00-06:00 runs over"
                                 " midnight)")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        raise ProtocolError(f"{where}: {text!r} opens and closes at the same time",
                            hint="leave the window out for any time of the day")
    return start, end


def make_transfer(max_kbps: int | None, window: str | None, where: str = "window"
                  ) -> Transfer | None:
    """The ``transfer`` of a document from a host's options; None when neither is given.

    Raises:
        ProtocolError: ``window`` is not HH:MM-HH:MM (the message names ``where``), or
            ``max_kbps`` is outside 1..:data:`MAX_KBPS`.
    """
    if max_kbps is None and not window:
        return None
    if max_kbps is not None and not 1 <= max_kbps <= MAX_KBPS:
        raise ProtocolError(f"max_kbps: {max_kbps} is outside 1..{MAX_KBPS}")
    parse_window(window or "", where)
    return Transfer(max_kbps=max_kbps, window=window or None)


def check_transfer(transfer: Transfer, where: str = "desired.transfer") -> None:
    """The check decoding cannot make: ``window`` is a real window.

    Raises:
        ProtocolError: ``window`` is not HH:MM-HH:MM, or empty (``<where>.window``).
    """
    if transfer.window is not None:
        parse_window(transfer.window, f"{where}.window")
