"""Size limits of what the agent accepts over MQTT, checked before anything is parsed.

Each subscription has a cap chosen by the kind of topic (:func:`payload_cap`); a larger
payload is counted, logged (rate-limited) and dropped, or, for a predict request, answered
with an error found by :func:`scan_envelope`, which looks for the reply topic and request id
without parsing the document.
"""

from __future__ import annotations

import re

from edgekit.protocol import Kind
from edgekit.protocol.ota import MAX_CHUNK_BYTES

__all__ = ["DESIRED_MAX_BYTES", "REPLY_MAX_BYTES", "SMALL_MAX_BYTES", "payload_cap",
           "scan_envelope"]

SMALL_MAX_BYTES = 64 * 1024  # status, feedback and anything not named below
DESIRED_MAX_BYTES = 1024 * 1024  # a desired document, device lists and signature included
REPLY_MAX_BYTES = MAX_CHUNK_BYTES + 64 * 1024  # an artifact chunk and its header

_REPLY_TO_RE = re.compile(rb'"reply_to"\s*:\s*"([^"\\\x00-\x1f]{1,512})"')
_REQUEST_ID_RE = re.compile(rb'"request_id"\s*:\s*"([^"\\\x00-\x1f]{1,128})"')


def payload_cap(topic_filter: str, predict_max_bytes: int) -> int:
    """The largest payload accepted on ``topic_filter`` (``edgekit/v1/<fleet>/<x>/<kind>...``)."""
    levels = topic_filter.split("/")
    kind = levels[4] if len(levels) > 4 else ""
    if kind == Kind.PREDICT.value:
        return predict_max_bytes
    if kind == Kind.DESIRED.value:
        return DESIRED_MAX_BYTES
    if kind == Kind.REPLY.value:
        return REPLY_MAX_BYTES
    return SMALL_MAX_BYTES


def scan_envelope(payload: bytes) -> tuple[str, str] | None:
    """(request id, reply topic) of an oversized request, found by a linear scan of the
    bytes (no parse, no copy); None when no reply topic is named.

    The values are unchecked strings; the caller validates the reply topic before use.
    """
    reply = _REPLY_TO_RE.search(payload)
    if reply is None:
        return None
    request = _REQUEST_ID_RE.search(payload)
    try:
        reply_to = reply.group(1).decode("utf-8")
        request_id = request.group(1).decode("utf-8") if request else ""
    except UnicodeDecodeError:
        return None
    return request_id, reply_to
