"""The agent's MQTT link hands each message to every handler whose filter matches its topic.

Each topic is matched once and remembered (artifact chunks arrive many a second on one
topic); a subscription made later must still get its messages. A real broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _agent_support import wait_until

from device_agent import load_config
from device_agent._mqtt import MqttLink
from device_agent._outbox import Outbox
from device_agent.config import broker_address
from edgekit.host.mqtt_client import HostClient


def test_a_later_subscription_gets_messages_on_a_topic_already_routed(broker: Any,
                                                                     tmp_path: Path) -> None:
    cfg = load_config(env={}, overrides={"mqtt.broker": broker.url, "device.id": "d1",
                                         "device.fleet": "routes", "model.allow_unsigned": True})
    address = broker_address(cfg.mqtt)
    assert address is not None
    outbox = Outbox(tmp_path / "outbox.db", 100)
    link = MqttLink(cfg, address, outbox, "edgekit/v1/routes/d1/status",
                    lambda _session, _state, _reason: b"{}")
    wide: list[bytes] = []
    narrow: list[bytes] = []
    link.subscribe("edgekit/v1/routes/d1/reply/#", lambda _t, p: wide.append(p))
    link.start()
    host = HostClient(broker.url).connect()
    try:
        wait_until(lambda: link.connected, 30, "the link to connect")
        topic = "edgekit/v1/routes/d1/reply/ota"

        def deliver(payload: bytes) -> None:
            # Sent again until it lands: the subscription may still be on its way.
            def landed() -> bool:
                if payload not in wide:
                    host.publish(topic, payload, qos=1, wait=5)
                return payload in wide
            wait_until(landed, 30, f"{payload!r} to arrive", interval=0.5)

        deliver(b"first")
        link.subscribe(topic, lambda _t, p: narrow.append(p))
        deliver(b"second")
        assert b"second" in narrow and b"first" not in narrow
    finally:
        host.close()
        link.stop(timeout=1.0)
