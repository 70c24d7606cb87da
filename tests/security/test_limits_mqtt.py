"""Payload caps before parsing on every topic the agent subscribes to, and a bundle of
malformed payloads on each of them: no crash, bounded memory, counted and logged refusals.

Attack of issue 9 (item 8): the agent parsed a 29 MiB predict request (+320 MiB).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import paho.mqtt.client as mqtt
from _limits_support import (  # noqa: F401  (fixtures)
    LimitsPackages,
    MqttBroker,
    broker,
    limits_pkgs,
    make_agent,
    peak_rss_kib,
    wait_until,
)

import edgekit.protocol.ota as ota
from edgekit.host.mqtt_client import HostClient
from edgekit.protocol import Kind, topic

MIB = 1024 * 1024
# The agent holds a refused payload as paho delivers it, never a parsed copy: paho grows
# its read buffer (a bytearray: old and new block alive while it reallocates), copies it
# to bytes and slices the payload out, up to four or five times the size at the peak,
# depending on when the allocator returns blocks (under 4x on a quiet machine, 4.3x on a loaded
# machine). Parsing 29 MiB of JSON rows cost more than ten times its size (+320 MiB).
HUGE = 29 * MIB
HUGE_BOUND_MIB = 6 * HUGE / MIB


class Replies:
    def __init__(self, client: HostClient, reply_to: str) -> None:
        self.docs: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        client.subscribe(reply_to, self._on, wait=10)

    def _on(self, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.docs.append(json.loads(msg.payload))

    def find(self, request_id: str) -> dict[str, Any] | None:
        with self._lock:
            return next((d for d in self.docs if d.get("request_id") == request_id), None)


def _until_answered(client: HostClient, where: str, payload: str, replies: Replies,
                    request_id: str) -> dict[str, Any]:
    """Publish until the agent answers (it subscribes right after it reports online)."""
    def answered() -> dict[str, Any] | None:
        found = replies.find(request_id)
        if found is None:
            client.publish(where, payload, wait=10)
            found = wait_until(lambda: replies.find(request_id) or True, 1.0, "a reply")
        return found if isinstance(found, dict) else None
    return wait_until(answered, 60, f"the reply to {request_id}", interval=0.5)


def _huge_predict(request_id: str, reply_to: str) -> bytes:
    head = json.dumps({"schema": "edgekit.predict-request/1", "request_id": request_id,
                       "reply_to": reply_to}).encode()[:-1]
    row = b"[" + b",".join([b"0.123456"] * 64) + b"]"
    rows = b",".join([row] * (HUGE // (len(row) + 1)))
    return head + b', "inputs": {"x": [' + rows + b"]}}"


def test_oversized_predict_is_answered_unparsed_with_bounded_memory(
        broker: MqttBroker, make_agent, limits_pkgs: LimitsPackages) -> None:
    agent = make_agent("lim-mqtt", "d1")
    agent.wait_healthy()
    client = HostClient(broker.url).connect()
    try:
        reply_to = topic("lim-mqtt", "d1", Kind.REPLY, "t1")
        replies = Replies(client, reply_to)
        predict = topic("lim-mqtt", "d1", Kind.PREDICT)
        small = json.dumps({"schema": "edgekit.predict-request/1", "request_id": "ok-1",
                            "reply_to": reply_to, "inputs": {"x": [[0.5] * 64]}})
        _until_answered(client, predict, small, replies, "ok-1")
        assert agent.proc is not None
        before = peak_rss_kib(agent.proc.pid)
        client.publish(predict, _huge_predict("huge-1", reply_to), wait=60)
        reply = wait_until(lambda: replies.find("huge-1"), 60, "the huge request's reply")
        growth_mib = (peak_rss_kib(agent.proc.pid) - before) / 1024
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
        assert "requests.max_request_bytes" in reply["error"]["message"]
        print(f"peak RSS growth on a {HUGE // MIB} MiB predict: {growth_mib:.0f} MiB")
        assert growth_mib < HUGE_BOUND_MIB, growth_mib
        assert "refused a" in agent.log() and "over the limit" in agent.log()
        client.publish(predict, small.replace("ok-1", "ok-2"), wait=10)
        assert wait_until(lambda: replies.find("ok-2"), 30, "a reply after the refusal")["ok"]
    finally:
        client.close()


def _bundle() -> list[tuple[str, bytes]]:
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        ("not json", b"{this is not json"),
        ("binary", bytes(range(256)) * 64),
        ("wrong schema", json.dumps({"schema": "edgekit.other/9", "x": 1}).encode()),
        ("wrong types", json.dumps({"schema": "edgekit.predict-request/1", "request_id": 5,
                                    "reply_to": ["a"], "inputs": "x"}).encode()),
        ("array", b"[1, 2, 3]"),
        ("deep nesting", deep),
        ("empty", b""),
        ("huge", b'{"a": "' + b"x" * (9 * MIB) + b'"}'),
    ]


def test_malformed_bundle_on_every_agent_topic(
        broker: MqttBroker, make_agent, limits_pkgs: LimitsPackages) -> None:
    fleet, device = "lim-bundle", "d1"
    agent = make_agent(fleet, device)
    agent.wait_healthy()
    topics = [topic(fleet, device, Kind.PREDICT), topic(fleet, device, Kind.FEEDBACK),
              ota.desired_topic(fleet), ota.desired_topic(fleet, device),
              ota.ota_reply_topic(fleet, device), topic(fleet, device, Kind.STATUS)]
    client = HostClient(broker.url).connect()
    try:
        assert agent.proc is not None
        agent.predict_version()
        before = peak_rss_kib(agent.proc.pid)
        for where in topics:
            for _what, payload in _bundle():
                client.publish(where, payload, wait=30)
        # Every topic logs its refusal of the oversized payload (the rest are logged at most
        # once a second per topic, and counted).
        wait_until(lambda: all(f"message on {where}: over the limit" in agent.log()
                               for where in topics), 60, "a logged refusal on every topic")
        assert agent.alive(), agent.log()
        assert agent.predict_version() == "1.0.0"
        growth_mib = (peak_rss_kib(agent.proc.pid) - before) / 1024
        assert growth_mib < 8 * 9, growth_mib  # a small multiple of the largest payload
        assert "Traceback" not in agent.log(), agent.log()
    finally:
        client.close()
