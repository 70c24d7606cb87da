"""Deploying a package: publish the desired document, serve the artifact, follow the devices.

The pieces, each usable alone (the fleet controller reuses them):

- :func:`desired_for_package`: the desired document for a registered artifact.
- :class:`Deployer`: on a :class:`~edgekit.host.mqtt_client.HostClient`, learns the fleet's devices
  from their retained status, publishes the document signed by an operator key (retained,
  fleet-wide or per device),
  and feeds status and ``update.*`` events to a
  :class:`~edgekit.host.ota.tracker.DeploymentTracker` until every target is done or time is up.
- :func:`read_retained`: the retained payloads under a filter (desired documents, status).
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import EdgekitError
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.delta import DeltaFile
from edgekit.host.ota.store import ArtifactInfo
from edgekit.host.ota.tracker import DeploymentTracker, DeployResult, DeviceProgress
from edgekit.protocol import ROOT, Kind, parse_topic, subscription
from edgekit.protocol.ota.desired import (
    DeltaSource,
    DesiredDocument,
    Probation,
    make_desired,
    new_deployment_id,
    seal_desired,
)
from edgekit.protocol.ota.shadow import ShadowSpec
from edgekit.protocol.ota.topics import artifact_request_topic, desired_topic
from edgekit.protocol.ota.transfer import Transfer

__all__ = [
    "Deployer",
    "delta_source",
    "desired_for_package",
    "read_retained",
]

ChangeCallback = Callable[[DeploymentTracker, DeviceProgress | None], None]


def desired_for_package(info: ArtifactInfo, fleet: str, *, deployment: str | None = None,
                        devices: list[str] | None = None, mqtt_source: bool = True,
                        url: str | None = None, deltas: list[DeltaSource] | None = None,
                        allow_breaking: bool = False, allow_downgrade: bool = False, allow_rename: bool = False,
                        revert: bool = False, probation: Probation | None = None,
                        latency_budget_ms: float | None = None,
                        issued: dt.datetime | None = None,
                        ttl_s: float | None = None,
                        transfer: Transfer | None = None,
                        shadow: ShadowSpec | None = None) -> DesiredDocument:
    """The desired document that asks ``devices`` (None: the fleet) for the package ``info``
    (with ``revert``: to leave it for the model each ran before; with ``shadow``: to run it
    beside their model instead, :mod:`edgekit.protocol.ota.shadow`).

    Raises:
        ProtocolError: an argument makes the document invalid (e.g. no source at all).
    """
    return make_desired(
        deployment=deployment or new_deployment_id(), fleet=fleet, devices=devices,
        name=info.name, version=info.version, sha256=info.sha256, size=info.size,
        key_id=info.key_id,
        request_topic=artifact_request_topic(fleet, info.sha256) if mqtt_source else None,
        url=url, deltas=deltas, allow_breaking=allow_breaking, allow_downgrade=allow_downgrade,
        allow_rename=allow_rename, revert=revert, probation=probation,
        latency_budget_ms=latency_budget_ms, issued=issued, ttl_s=ttl_s, transfer=transfer,
        shadow=shadow)


def delta_source(delta: DeltaFile, fleet: str, *, mqtt_source: bool = True,
                 url: str | None = None) -> DeltaSource:
    """The desired document's entry for a served delta."""
    return DeltaSource(base_sha256=delta.base_sha256, sha256=delta.sha256, size=delta.size,
                       request_topic=artifact_request_topic(fleet, delta.sha256)
                       if mqtt_source else None, url=url)


def read_retained(client: HostClient, topic_filter: str, timeout: float = 5.0) -> dict[str, bytes]:
    """The retained payloads under ``topic_filter``, by topic.

    The broker sends retained messages right after the subscription; a marker published by
    us after subscribing arrives after them, so its arrival means all have come.

    Raises:
        EdgekitError: the marker did not come back within ``timeout`` seconds.
    """
    found: dict[str, bytes] = {}
    done = threading.Event()

    def on_message(msg: mqtt.MQTTMessage) -> None:
        if msg.retain and msg.payload:
            found[msg.topic] = bytes(msg.payload)

    client.subscribe(topic_filter, on_message, wait=timeout)
    try:
        _sync(client, done, timeout)
    finally:
        client.unsubscribe(topic_filter, on_message)
    return found


class Deployer:
    """Publishes one desired document, signed by ``key``, and follows its targets; see the
    module docstring."""

    def __init__(self, client: HostClient, fleet: str, document: DesiredDocument,
                 key: Ed25519PrivateKey, *, devices: list[str] | None = None,
                 include_offline: bool = False,
                 on_change: ChangeCallback | None = None) -> None:
        self.client = client
        self.fleet = fleet
        self.document = document
        self.key = key
        self.devices = sorted(set(devices)) if devices else None
        self.tracker = DeploymentTracker(document.deployment, fleet, document.model,
                                         devices=self.devices, include_offline=include_offline)
        self._on_change = on_change
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._started = time.monotonic()

    def discover(self, timeout: float = 5.0) -> None:
        """Subscribe to the fleet's status, events and desired documents, and wait for the
        retained ones, so the targets of a fleet-wide deploy are known.

        Raises:
            EdgekitError: the broker did not answer within ``timeout`` seconds.
        """
        self.client.subscribe(subscription(self.fleet, "+", Kind.STATUS), self._on_status,
                              wait=timeout)
        self.client.subscribe(subscription(self.fleet, "+", Kind.EVENTS), self._on_event,
                              wait=timeout)
        if self.tracker.fleet_wide:
            self.client.subscribe(subscription(self.fleet, "+", Kind.DESIRED), self._on_desired,
                                  wait=timeout)
        _sync(self.client, threading.Event(), timeout)
        with self._lock:
            self.tracker.freeze()
        self._notify(None)

    def publish(self, wait: float = 10.0) -> list[str]:
        """Publish the desired document, retained, where it applies; return the topics.

        Raises:
            EdgekitError: the broker did not acknowledge within ``wait`` seconds.
        """
        payload = seal_desired(self.document, self.key)
        topics = ([desired_topic(self.fleet, d) for d in self.devices] if self.devices
                  else [desired_topic(self.fleet)])
        infos = [self.client.publish(t, payload, qos=1, retain=True) for t in topics]
        deadline = time.monotonic() + wait
        for topic, info in zip(topics, infos, strict=True):
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise EdgekitError(f"the broker did not acknowledge the desired document on"
                                   f" {topic} within {wait:g} s")
        self._started = time.monotonic()
        return topics

    def wait(self, timeout: float) -> DeployResult:
        """Follow the targets until each has an outcome or ``timeout`` seconds have passed
        since :meth:`publish`; those still going are marked timed out."""
        deadline = self._started + timeout
        while True:
            with self._lock:
                if self.tracker.finished():
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._changed.wait(min(left, 1.0))
            self._changed.clear()
        with self._lock:
            self.tracker.expire()
            return self.tracker.result(time.monotonic() - self._started)

    def close(self) -> None:
        """Stop following (the subscriptions of other parts of the client stay)."""
        for kind, callback in ((Kind.STATUS, self._on_status), (Kind.EVENTS, self._on_event),
                               (Kind.DESIRED, self._on_desired)):
            self.client.unsubscribe(subscription(self.fleet, "+", kind), callback)

    # ---------------------------------------------------------------- message handlers

    def _on_status(self, msg: mqtt.MQTTMessage) -> None:
        device, payload = _device_payload(msg)
        if device is None or payload is None:
            return
        with self._lock:
            changed = self.tracker.observe_status(device, payload)
        if changed:
            self._notify(self.tracker.devices.get(device))

    def _on_event(self, msg: mqtt.MQTTMessage) -> None:
        device, payload = _device_payload(msg)
        if device is None or payload is None:
            return
        with self._lock:
            changed = self.tracker.observe_event(device, payload)
        if changed:
            self._notify(self.tracker.devices.get(device))

    def _on_desired(self, msg: mqtt.MQTTMessage) -> None:
        parts = parse_topic(msg.topic)
        if parts is None or parts.device.startswith("_"):
            return
        with self._lock:
            self.tracker.observe_desired(parts.device, bool(msg.payload))

    def _notify(self, progress: DeviceProgress | None) -> None:
        self._changed.set()
        if self._on_change is not None:
            self._on_change(self.tracker, progress)


def _device_payload(msg: mqtt.MQTTMessage) -> tuple[str | None, bytes | None]:
    """The device a message's topic names and its payload, to decode in the tracker; (None,
    None) for a reserved level or an empty (cleared) payload."""
    parts = parse_topic(msg.topic)
    if parts is None or parts.device.startswith("_") or not msg.payload:
        return None, None
    return parts.device, bytes(msg.payload)


def _sync(client: HostClient, done: threading.Event, timeout: float) -> None:
    """Wait until a marker published after the latest subscriptions has come back."""
    marker = "/".join([ROOT, "_host", "sync", secrets.token_hex(8)])

    def arrived(_msg: mqtt.MQTTMessage) -> None:
        done.set()

    client.subscribe(marker, arrived, qos=1, wait=timeout)
    try:
        client.publish(marker, b"1", qos=1)
        if not done.wait(timeout):
            raise EdgekitError(f"the broker at {client.broker} did not answer within"
                               f" {timeout:g} s")
    finally:
        client.unsubscribe(marker, arrived)
