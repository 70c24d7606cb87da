"""The shipped broker configuration (deploy/mosquitto/) on a real mosquitto: TLS with client
certificates made here, no anonymous clients, and an ACL under which a device publishes only
as itself and only the host identity writes desired, controller and artifact-reply topics.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from _limits_support import HOST_IDENTITY, Pki, ShippedBroker, make_pki, wait_until

import edgekit.protocol.ota as ota
from edgekit.errors import EdgekitError
from edgekit.host.mqtt_client import HostClient
from edgekit.protocol import Kind, topic
from edgekit.protocol.controller import rollout_request_topic

FLEET = "acl"
A, B = "dev-a", "dev-b"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), [HOST_IDENTITY, A, B, "rogue"])


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[ShippedBroker]:
    broker = ShippedBroker(tmp_path_factory.mktemp("shipped-broker"), pki)
    yield broker
    broker.stop()


def client(broker: ShippedBroker, pki: Pki, name: str) -> HostClient:
    ident = pki.clients[name]
    return HostClient(broker.url, ca_file=str(pki.ca), cert_file=str(ident.cert),
                      key_file=str(ident.key)).connect()


class Seen:
    """Every message on a filter, as (topic, payload)."""

    def __init__(self, c: HostClient, topic_filter: str) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        c.subscribe(topic_filter, self._on, wait=10)

    def _on(self, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.items.append((msg.topic, bytes(msg.payload)))

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, _ in self.items]

    def has(self, where: str, payload: bytes) -> bool:
        with self._lock:
            return (where, payload) in self.items


def _marker_after(sender: HostClient, seen: Seen, own_topic: str, tag: str) -> None:
    """Publish an allowed message and wait for it: messages of one connection arrive in
    order, so whatever the sender published before it has arrived too, if it was let through."""
    payload = f"marker {tag}".encode()
    sender.publish(own_topic, payload, wait=10)
    wait_until(lambda: seen.has(own_topic, payload), 20, f"the marker {tag}")


def test_anonymous_and_certificateless_clients_are_refused(shipped: ShippedBroker,
                                                            pki: Pki) -> None:
    with pytest.raises(EdgekitError):
        HostClient(shipped.url, ca_file=str(pki.ca)).connect(timeout=5)
    with pytest.raises(EdgekitError):
        HostClient(f"mqtt://127.0.0.1:{shipped.port}").connect(timeout=5)


def test_a_certificate_from_another_ca_is_refused(shipped: ShippedBroker, pki: Pki,
                                                  tmp_path: Path) -> None:
    stranger = make_pki(tmp_path / "other", [A])
    with pytest.raises(EdgekitError):
        HostClient(shipped.url, ca_file=str(pki.ca), cert_file=str(stranger.clients[A].cert),
                   key_file=str(stranger.clients[A].key)).connect(timeout=5)


def test_device_cannot_publish_as_another_device_or_as_the_host(shipped: ShippedBroker,
                                                                pki: Pki) -> None:
    host = client(shipped, pki, HOST_IDENTITY)
    dev_a = client(shipped, pki, A)
    try:
        seen = Seen(host, "edgekit/#")
        forged = [topic(FLEET, B, kind) for kind in (Kind.STATUS, Kind.EVENTS, Kind.SAMPLES,
                                                     Kind.METRICS)]
        forged += [ota.desired_topic(FLEET), ota.desired_topic(FLEET, A),
                   ota.desired_topic(FLEET, B), rollout_request_topic(FLEET),
                   ota.ota_reply_topic(FLEET, B), topic(FLEET, B, Kind.PREDICT),
                   topic(FLEET, B, Kind.REPLY, "x"), f"edgekit/v1/{FLEET}/_host/probe/00",
                   "edgekit/v1/_controllers/c1"]
        for where in forged:
            dev_a.publish(where, b"forged", wait=10)
        _marker_after(dev_a, seen, topic(FLEET, A, Kind.STATUS), "a")
        assert not [t for t in seen.topics() if t in forged], seen.topics()
        # What a device may publish arrives.
        for where in (topic(FLEET, A, Kind.EVENTS), ota.artifact_request_topic(FLEET, "a" * 64),
                      topic(FLEET, A, Kind.REPLY, "client-1")):
            dev_a.publish(where, b"allowed", wait=10)
            wait_until(lambda w=where: seen.has(w, b"allowed"), 20, f"{where} to arrive")
    finally:
        dev_a.close()
        host.close()


def test_device_reads_only_its_own_requests_and_documents(shipped: ShippedBroker,
                                                          pki: Pki) -> None:
    host = client(shipped, pki, HOST_IDENTITY)
    dev_a = client(shipped, pki, A)
    try:
        spy = Seen(dev_a, "edgekit/#")  # the broker delivers only what the ACL lets A read
        targets = {
            topic(FLEET, B, Kind.PREDICT): False, ota.desired_topic(FLEET, B): False,
            ota.ota_reply_topic(FLEET, B): False, topic(FLEET, B, Kind.STATUS): False,
            rollout_request_topic(FLEET): False,
            topic(FLEET, A, Kind.PREDICT): True, ota.desired_topic(FLEET, A): True,
            ota.desired_topic(FLEET): True, ota.ota_reply_topic(FLEET, A): True,
        }
        for where in targets:
            host.publish(where, b"from the host", wait=10)
        marker = topic(FLEET, A, Kind.FEEDBACK)
        host.publish(marker, b"marker", wait=10)
        wait_until(lambda: spy.has(marker, b"marker"), 20, "the marker")
        got = set(spy.topics())
        assert {w for w, ok in targets.items() if ok} <= got, got
        assert not {w for w, ok in targets.items() if not ok} & got, got
        for where in (ota.desired_topic(FLEET), ota.desired_topic(FLEET, A)):
            host.publish(where, b"", retain=True, wait=10)
    finally:
        dev_a.close()
        host.close()


def test_password_identities_follow_the_same_acl(tmp_path: Path, pki: Pki) -> None:
    """The documented variant: per-device passwords instead of client certificates."""
    passwd = tmp_path / "edgekit.passwd"
    for i, (user, secret) in enumerate(((HOST_IDENTITY, "host-secret"), (A, "a-secret"))):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwd),
                        user, secret], check=True, capture_output=True)
    broker = ShippedBroker(tmp_path / "pw-broker", pki, password_file=passwd)
    try:
        def connect(user: str, secret: str) -> HostClient:
            return HostClient(broker.url, ca_file=str(pki.ca), username=user,
                              password=secret).connect(timeout=5)
        with pytest.raises(EdgekitError):
            connect(A, "wrong")
        host, dev_a = connect(HOST_IDENTITY, "host-secret"), connect(A, "a-secret")
        try:
            seen = Seen(host, "edgekit/#")
            dev_a.publish(topic(FLEET, B, Kind.STATUS), b"forged", wait=10)
            dev_a.publish(ota.desired_topic(FLEET), b"forged", wait=10)
            _marker_after(dev_a, seen, topic(FLEET, A, Kind.STATUS), "pw")
            assert topic(FLEET, B, Kind.STATUS) not in seen.topics()
            assert ota.desired_topic(FLEET) not in seen.topics()
        finally:
            dev_a.close()
            host.close()
    finally:
        broker.stop()

