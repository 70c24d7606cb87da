"""The agent's MQTT link hands each message to every handler whose filter matches its topic.

Each topic is matched once and remembered (artifact chunks arrive many a second on one
topic); a subscription made later must still get its messages. A real broker."""

from __future__ import annotations

import socket
import threading
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
        wait_until(lambda: link.subscribed, 30, "the link to connect and subscribe")
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


class _RecordingProxy:
    """A TCP relay between one client and the broker that records the MQTT packet types the
    client sends, in order (the high nibble of each fixed header: 3 PUBLISH, 8 SUBSCRIBE)."""

    def __init__(self, broker_port: int) -> None:
        self.sent: list[int] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._broker_port = broker_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        client, _ = self._server.accept()
        upstream = socket.create_connection(("127.0.0.1", self._broker_port))
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        buffer = b""
        while data := src.recv(65536):
            dst.sendall(data)
            if not record:
                continue
            buffer += data
            while (size := _packet_size(buffer)) is not None:
                self.sent.append(buffer[0] >> 4)
                buffer = buffer[size:]

    def close(self) -> None:
        self._server.close()


def _packet_size(buffer: bytes) -> int | None:
    """The size of the first whole MQTT packet in ``buffer``, or None if it is not all there."""
    length, mult = 0, 1
    for i in range(1, min(len(buffer), 5)):
        length += (buffer[i] & 127) * mult
        mult *= 128
        if not buffer[i] & 128:
            return 1 + i + length if len(buffer) >= 1 + i + length else None
    return None


def test_the_agent_subscribes_before_it_announces_online(broker: Any, tmp_path: Path) -> None:
    # The broker handles one connection's packets in order: with the SUBSCRIBEs ahead of the
    # retained `online`, a host that reacts to `online` with a request reaches the agent.
    proxy = _RecordingProxy(int(broker.url.rsplit(":", 1)[1]))
    cfg = load_config(env={}, overrides={"mqtt.broker": f"mqtt://127.0.0.1:{proxy.port}",
                                         "device.id": "d2", "device.fleet": "routes",
                                         "model.allow_unsigned": True})
    address = broker_address(cfg.mqtt)
    assert address is not None
    link = MqttLink(cfg, address, Outbox(tmp_path / "outbox.db", 100),
                    "edgekit/v1/routes/d2/status", lambda _session, _state, _reason: b"{}")
    link.subscribe("edgekit/v1/routes/d2/predict", lambda _t, _p: None)
    link.subscribe("edgekit/v1/routes/d2/feedback", lambda _t, _p: None)
    link.start()
    try:
        wait_until(lambda: link.subscribed, 30, "the link to connect and subscribe")
        wait_until(lambda: 3 in proxy.sent, 10, "the online status to pass the proxy")
        # CONNECT, then one SUBSCRIBE per route (the status route too), then PUBLISH online.
        assert proxy.sent[:5] == [1, 8, 8, 8, 3], proxy.sent
    finally:
        link.stop(timeout=1.0)
        proxy.close()
