"""The artifact server answers only on reply topics the protocol gives requesters, and drops
oversized requests unparsed (real mosquitto, real server).

Attack of issue 9 (item 9): the server sent 1 MiB to any reply topic a requester named.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import pytest
from _limits_support import (  # noqa: F401  (fixtures)
    LimitsPackages,
    MqttBroker,
    broker,
    limits_pkgs,
    wait_until,
)

import edgekit.protocol.ota as ota
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.server import ArtifactServer, probe_artifact, reply_topic_allowed
from edgekit.host.ota.store import ArtifactStore

FLEET = "lim-srv"


class Inbox:
    def __init__(self, client: HostClient, topic_filter: str) -> None:
        self.topics: list[str] = []
        self._lock = threading.Lock()
        client.subscribe(topic_filter, self._on, wait=10)

    def _on(self, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.topics.append(msg.topic)

    def count(self, topic: str) -> int:
        with self._lock:
            return self.topics.count(topic)


@pytest.mark.parametrize(("reply_to", "allowed"), [
    (ota.ota_reply_topic(FLEET, "d1"), True),
    (ota.ota_reply_topic("other-fleet", "d1"), False),
    (f"edgekit/v1/{FLEET}/d1/status", False),
    (f"edgekit/v1/{FLEET}/d1/reply/other", False),
    (f"edgekit/v1/{FLEET}/_fleet/desired", False),
    (f"edgekit/v1/{FLEET}/_host/probe/0123456789abcdef", True),
    (f"edgekit/v1/{FLEET}/_host/controller", False),
    ("victim/topic", False),
])
def test_reply_topics_a_chunk_may_go_to(reply_to: str, allowed: bool) -> None:
    request_topic = ota.artifact_request_topic(FLEET, "a" * 64)
    assert reply_topic_allowed(request_topic, reply_to) is allowed


def test_server_sends_nothing_to_a_topic_the_requester_chose(
        broker: MqttBroker, limits_pkgs: LimitsPackages, tmp_path: Path) -> None:
    host = HostClient(broker.url).connect()
    attacker = HostClient(broker.url).connect()
    try:
        server = ArtifactServer(host, ArtifactStore(), fleets=[FLEET], share_group=None)
        info = server.serve(limits_pkgs.ota.v1)
        assert probe_artifact(host, FLEET, info.sha256, timeout=10)
        inbox = Inbox(attacker, "#")
        request_topic = ota.artifact_request_topic(FLEET, info.sha256)
        victims = ["victim/topic", f"edgekit/v1/{FLEET}/d2/status",
                   ota.ota_reply_topic("other-fleet", "d1")]
        for i, victim in enumerate(victims):
            request = ota.make_request(f"r{i}", info.sha256, 0, 1024 * 1024, victim)
            attacker.publish(request_topic, ota.encode_request(request), wait=10)
        big = ota.make_request("big", info.sha256, 0, 1024, ota.ota_reply_topic(FLEET, "d1"))
        oversized = json.dumps({**msgspec.to_builtins(big), "pad": "x" * 8192})
        attacker.publish(request_topic, oversized, wait=10)
        good = ota.ota_reply_topic(FLEET, "d1")
        attacker.publish(request_topic, ota.encode_request(
            ota.make_request("ok", info.sha256, 0, 1024, good)), wait=10)
        # The requests are handled in order: once the good one is answered, so were the rest.
        wait_until(lambda: inbox.count(good) == 1, 30, "the answer to the valid request")
        assert all(inbox.count(victim) == 0 for victim in victims), inbox.topics
        assert server.stats.errors >= len(victims) + 1
    finally:
        attacker.close()
        host.close()
