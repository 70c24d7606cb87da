"""Where the update protocol's messages travel, built on :mod:`edgekit.protocol`'s tree.

::

    edgekit/v1/<fleet>/_fleet/desired                retained, the fleet's desired model
    edgekit/v1/<fleet>/<device>/desired              retained, one device's (wins over the fleet's)
    edgekit/v1/<fleet>/_artifacts/get/<sha256>       chunk requests for one artifact
    edgekit/v1/<fleet>/<device>/reply/ota            where an agent asks its chunks to be sent

Artifact servers subscribe per artifact (one filter per sha256 they hold), so a request only
reaches servers that have the artifact; several servers of one fleet share the load through
a shared subscription, ``$share/<group>/<filter>`` (MQTT 5 brokers, and Mosquitto for every
protocol version). ``_artifacts`` starts with ``_``, which device ids cannot, so it can never
be a device's level.
"""

from __future__ import annotations

import re

from edgekit.errors import UsageError
from edgekit.protocol import ROOT, Kind, fleet_topic, topic

__all__ = [
    "ARTIFACTS_SCOPE",
    "DEFAULT_SHARE_GROUP",
    "artifact_request_topic",
    "artifact_subscription",
    "desired_topic",
    "ota_reply_topic",
    "shared",
]

ARTIFACTS_SCOPE = "_artifacts"
DEFAULT_SHARE_GROUP = "edgekit-artifacts"
_GET = "get"
_GROUP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def desired_topic(fleet: str, device: str | None = None) -> str:
    """The retained desired-model topic of a fleet (``device`` None) or of one device."""
    if device is None:
        return fleet_topic(fleet, Kind.DESIRED)
    return topic(fleet, device, Kind.DESIRED)


def artifact_request_topic(fleet: str, sha256: str) -> str:
    """The topic an agent publishes chunk requests for the artifact ``sha256`` to."""
    return "/".join([ROOT, fleet, ARTIFACTS_SCOPE, _GET, sha256])


def artifact_subscription(fleet: str, sha256: str = "+", share_group: str | None = None) -> str:
    """The filter a server subscribes to for one artifact (``+``: any), shared or not."""
    return shared(artifact_request_topic(fleet, sha256), share_group)


def ota_reply_topic(fleet: str, device: str) -> str:
    """The topic an agent names as ``reply_to`` in its chunk requests."""
    return topic(fleet, device, Kind.REPLY, "ota")


def shared(topic_filter: str, group: str | None) -> str:
    """``topic_filter`` as a shared subscription of ``group`` (None: a plain subscription).

    Raises:
        UsageError: the group name holds a character MQTT does not allow there.
    """
    if group is None:
        return topic_filter
    if not _GROUP_RE.match(group):
        raise UsageError(f"share group {group!r} is not valid",
                         hint="use 1 to 64 letters, digits, '_', '.' or '-'")
    return f"$share/{group}/{topic_filter}"
