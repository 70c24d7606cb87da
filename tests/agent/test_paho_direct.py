"""The agent's paho client reads a large PUBLISH straight into the bytearray its handler gets
(device_agent/_paho.py): the same bytes as paho's own path, whatever pieces the socket
hands over, over plain TCP and TLS, acknowledged at QoS 1, and a malformed one drops the
connection instead of reaching a handler; and the host's client, which sends through a view
of each packet, gets large messages out whole through partial writes. A real broker
(mosquitto, or amqtt where it is absent), and a byte-dribbling relay and a fake broker made
here."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from _agent_support import wait_until
from mqtt_broker import MqttBroker, broker_kind, make_tls_files
from paho.mqtt.enums import CallbackAPIVersion

from device_agent._paho import DIRECT_BYTES, Client
from edgekit.host.mqtt_client import HostClient

TOPIC = "edgekit/v1/paho/d1/reply/ota"


class _Received:
    def __init__(self) -> None:
        self.messages: list[tuple[str, Any, int]] = []  # (topic, payload, qos)
        self.disconnected = threading.Event()

    def on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.append((msg.topic, msg.payload, msg.qos))

    def on_disconnect(self, *_args: Any) -> None:
        self.disconnected.set()


def _client(port: int, got: _Received, qos: int = 1, tls: Any = None) -> Client:
    client = Client(CallbackAPIVersion.VERSION2, client_id=f"direct-{os.getpid()}-{qos}",
                    protocol=mqtt.MQTTv311)
    if tls is not None:
        client.tls_set(ca_certs=str(tls.ca), certfile=str(tls.client_cert),
                       keyfile=str(tls.client_key), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    subscribed = threading.Event()
    client.on_message = got.on_message
    client.on_disconnect = got.on_disconnect
    client.on_connect = lambda c, *_a: c.subscribe(TOPIC, qos=qos)
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert subscribed.wait(30), "the client did not subscribe"
    return client


@contextlib.contextmanager
def _session(port: int, url: str, qos: int = 1, tls: Any = None
             ) -> Iterator[tuple[_Received, HostClient]]:
    """The agent's client subscribed through ``port``, and a host client on ``url``."""
    got = _Received()
    client = _client(port, got, qos, tls)
    host = HostClient(url).connect()
    try:
        yield got, host
    finally:
        host.close()
        client.disconnect()
        client.loop_stop()


def _send_all(host: HostClient, sent: list[bytes], qos: int = 1) -> None:
    for payload in sent:
        host.publish(TOPIC, payload, qos=qos, wait=60)


def _payloads() -> list[bytes]:
    rng = random.Random(7)
    # Around the threshold (the body is topic + packet id + payload), and several MiB.
    sizes = [0, 10, DIRECT_BYTES - len(TOPIC) - 4, DIRECT_BYTES - len(TOPIC) - 2,
             DIRECT_BYTES, 1024 * 1024 + 3, 3 * 1024 * 1024 + 17]
    return [rng.randbytes(size) for size in sizes]


def _check(got: _Received, sent: list[bytes], qos: int) -> None:
    wait_until(lambda: len(got.messages) >= len(sent), 60, f"{len(sent)} messages")
    assert len(got.messages) == len(sent)
    for (topic, payload, got_qos), expected in zip(got.messages, sent, strict=True):
        assert topic == TOPIC and got_qos == qos
        assert bytes(payload) == expected
        body = len(TOPIC) + 2 + (2 if qos else 0) + len(expected)
        # Large bodies come as the buffer they were read into; small ones through paho.
        assert isinstance(payload, bytearray) == (body >= DIRECT_BYTES), len(expected)


@pytest.mark.parametrize("qos", [0, 1])
def test_payloads_of_every_size_arrive_whole(broker: Any, qos: int) -> None:
    with _session(broker.port, broker.url, qos) as (got, host):
        sent = _payloads()
        _send_all(host, sent, qos)
        _check(got, sent, qos)


def test_qos1_messages_are_acknowledged(broker: Any) -> None:
    """The broker sends at most its in-flight limit (20) of unacknowledged QoS 1 messages:
    all 40 arrive only if each large one was acknowledged."""
    with _session(broker.port, broker.url) as (got, host):
        sent = [bytes([i]) * (DIRECT_BYTES + i) for i in range(40)]
        for payload in sent:
            host.publish(TOPIC, payload, qos=1)
        _check(got, sent, 1)


def test_a_qos2_message_goes_through_paho(broker: Any) -> None:
    with _session(broker.port, broker.url, 2) as (got, host):
        payload = os.urandom(2 * DIRECT_BYTES)
        host.publish(TOPIC, payload, qos=2, wait=30)
        wait_until(lambda: got.messages, 30, "the QoS 2 message")
        assert got.messages[0][1] == payload and isinstance(got.messages[0][1], bytes)


class _Dribbler:
    """A TCP relay that hands the broker's bytes to the client in pieces of 1 to 3000
    bytes, with pauses: a packet's body is read over many calls."""

    def __init__(self, broker_port: int) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._broker_port = broker_port
        self._rng = random.Random(3)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        client, _ = self._server.accept()
        upstream = socket.create_connection(("127.0.0.1", self._broker_port))
        threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
        self._pump(upstream, client, True)

    def _pump(self, src: socket.socket, dst: socket.socket, dribble: bool) -> None:
        try:
            while data := src.recv(65536):
                while dribble and data:
                    cut = self._rng.randint(1, 3000)
                    piece, data = data[:cut], data[cut:]
                    dst.sendall(piece)
                    if self._rng.random() < 0.05:
                        time.sleep(0.001)
                if not dribble:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_a_body_read_in_many_pieces_arrives_whole(broker: Any) -> None:
    relay = _Dribbler(broker.port)
    with _session(relay.port, broker.url) as (got, host):
        sent = _payloads()
        _send_all(host, sent)
        _check(got, sent, 1)


@pytest.mark.skipif(broker_kind() != "mosquitto", reason="TLS listeners need mosquitto")
def test_over_tls(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    with MqttBroker(tmp_path / "broker", tls=tls) as tls_broker:
        assert tls_broker.tls_port is not None
        with _session(tls_broker.tls_port, tls_broker.url, tls=tls) as (got, host):
            sent = _payloads()
            _send_all(host, sent)
            _check(got, sent, 1)


def _fake_broker(publish_body: bytes) -> tuple[int, threading.Thread]:
    """A server that accepts one MQTT connection, acknowledges it and its subscription, then
    sends one PUBLISH (QoS 1) whose body is ``publish_body``."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def remaining(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n % 128, n // 128
            out.append(byte | (128 if n else 0))
            if not n:
                return bytes(out)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)  # CONNECT
            conn.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
            sub = conn.recv(4096)  # SUBSCRIBE: its packet id is after the fixed header
            conn.sendall(b"\x90\x03" + sub[2:4] + b"\x01")  # SUBACK
            conn.sendall(b"\x32" + remaining(len(publish_body)) + publish_body)
            conn.settimeout(10)
            try:
                while conn.recv(4096):
                    pass
            except OSError:
                pass
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


@pytest.mark.parametrize("body", [
    # An empty topic (MQTT 3.1.1 forbids it).
    b"\x00\x00" + b"\x00\x01" + b"x" * DIRECT_BYTES,
    # A topic length (65535) past the end of the body (65536 bytes).
    b"\xff\xff" + b"t" * (DIRECT_BYTES - 2),
], ids=["empty-topic", "topic-past-the-end"])
def test_a_malformed_large_publish_drops_the_connection(body: bytes) -> None:
    assert len(body) >= DIRECT_BYTES
    port, thread = _fake_broker(body)
    got = _Received()
    client = Client(CallbackAPIVersion.VERSION2, client_id="malformed", protocol=mqtt.MQTTv311)
    client.on_message = got.on_message
    client.on_disconnect = got.on_disconnect
    client.on_connect = lambda c, *_a: c.subscribe(TOPIC, qos=1)
    client.reconnect_delay_set(30, 60)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert got.disconnected.wait(30), "the malformed PUBLISH did not end the connection"
        assert got.messages == []
    finally:
        client.disconnect()
        client.loop_stop()
        thread.join(15)


@pytest.mark.parametrize("qos", [0, 1])
def test_the_hosts_large_publishes_survive_partial_writes(broker: Any, qos: int) -> None:
    """The host's client sends a large PUBLISH as its header and a view of its payload
    (edgekit/host/mqtt_client.py); with a send buffer of a few KiB every MiB goes out in
    hundreds of partial writes, and a QoS 0 one still reports itself published."""
    with _session(broker.port, broker.url, qos) as (got, host):
        sock = host.paho.socket()
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sizes = (1024 * 1024, 5, DIRECT_BYTES, 3 * 1024 * 1024 + 1, 200_000)
        sent = [os.urandom(size) for size in sizes]
        sent.append(bytes(bytearray(b"z" * 100_000)))
        _send_all(host, sent, qos)  # waits for each to be published (acknowledged at QoS 1)
        bytearray_payload = bytearray(os.urandom(DIRECT_BYTES))  # through paho's own path
        host.publish(TOPIC, bytearray_payload, qos=qos, wait=60)
        sent.append(bytes(bytearray_payload))
        _check(got, sent, qos)
