"""The topic tree of the device protocol, the ids in it, and the schema of each payload.

Every topic lives under one versioned root::

    edgekit/v1/<fleet>/<device>/<kind>[/<rest>]

``<fleet>`` and ``<device>`` are ids (letters, digits, ``_ . -``; no leading ``_``, so the
reserved level ``_fleet`` can carry documents meant for a whole fleet). docs/protocol.md is
the prose form.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import NamedTuple

from edgekit.errors import UsageError

__all__ = [
    "FLEET_SCOPE",
    "ID_PATTERN",
    "ROOT",
    "Kind",
    "Schema",
    "TopicParts",
    "check_id",
    "fleet_topic",
    "is_valid_id",
    "parse_topic",
    "subscription",
    "topic",
]

ROOT = "edgekit/v1"
FLEET_SCOPE = "_fleet"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)


class Kind(StrEnum):
    """The last fixed level of a topic: what the message is."""

    STATUS = "status"  # device -> host, retained: birth, last will, clean stop
    METRICS = "metrics"  # device -> host, every telemetry interval
    EVENTS = "events"  # device -> host, things that happened (model activated, ...)
    SAMPLES = "samples"  # device -> host, labelled samples (input, label, prediction)
    PREDICT = "predict"  # anyone -> device, an inference request
    FEEDBACK = "feedback"  # anyone -> device, labels for earlier predictions
    REPLY = "reply"  # device -> requester, the suggested home of reply topics
    DESIRED = "desired"  # host -> device (or fleet), retained desired-model document


class Schema(StrEnum):
    """The ``schema`` field (the msgspec tag) of each device document; the number is the
    major version."""

    STATUS = "edgekit.status/1"
    METRICS = "edgekit.metrics/1"
    EVENT = "edgekit.event/1"
    SAMPLE = "edgekit.sample/1"
    PREDICT_REQUEST = "edgekit.predict-request/1"
    PREDICT_REPLY = "edgekit.predict-reply/1"
    FEEDBACK = "edgekit.feedback/1"
    FEEDBACK_REPLY = "edgekit.feedback-reply/1"


class TopicParts(NamedTuple):
    fleet: str
    device: str
    kind: str
    rest: str


def is_valid_id(text: object) -> bool:
    """Whether ``text`` may be a fleet or device id (no MQTT wildcards, no ``/``)."""
    return isinstance(text, str) and bool(_ID_RE.match(text))


def check_id(text: object, what: str) -> str:
    """Return ``text`` if it is a valid id.

    Raises:
        UsageError: it is empty, too long, or holds a character outside ``A-Z a-z 0-9 _ . -``.
    """
    if not is_valid_id(text):
        raise UsageError(
            f"{what} {text!r} is not a valid id",
            hint="use 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return str(text)


def topic(fleet: str, device: str, kind: Kind | str, *rest: str) -> str:
    """The topic of one device's ``kind`` (``rest`` adds levels, e.g. a reply channel)."""
    kind_value = kind.value if isinstance(kind, Kind) else kind
    return "/".join([ROOT, fleet, device, kind_value, *rest])


def fleet_topic(fleet: str, kind: Kind | str) -> str:
    """A fleet-wide topic (the reserved ``_fleet`` device level), e.g. the fleet's desired model."""
    return topic(fleet, FLEET_SCOPE, kind)


def subscription(fleet: str = "+", device: str = "+", kind: Kind | str = "#") -> str:
    """A subscription filter, e.g. ``subscription("f1", kind=Kind.STATUS)`` for a fleet's status."""
    return topic(fleet, device, kind)


def parse_topic(text: str) -> TopicParts | None:
    """Split a topic of the tree; None when it is not one."""
    prefix = ROOT + "/"
    if not text.startswith(prefix):
        return None
    parts = text[len(prefix):].split("/", 3)
    if len(parts) < 3 or not all(parts[:3]):
        return None
    return TopicParts(parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else "")
