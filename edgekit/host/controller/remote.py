"""Talking to a running controller over MQTT: find it, ask it for a rollout, follow it.

Presence, replies and rollout states are decoded through :mod:`edgekit.protocol.controller`
(size-capped, strict); a payload that does not decode is logged and skipped, and the
wait goes on.

``edgekit deploy`` uses these when a controller looks after the fleet, so the update goes
through the controller's rollout engine (canary, waves, abort criteria) instead of being
published to the whole fleet at once.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import EdgekitError, ProtocolError
from edgekit.host.db import ACTIVE_ROLLOUT_STATES
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.deploy import read_retained
from edgekit.protocol import Document, decode
from edgekit.protocol.controller import (
    PresencePayload,
    ReplyError,
    RolloutReply,
    RolloutRequest,
    RolloutStatePayload,
    make_rollout_request,
    parse_presence,
    presence_filter,
    rollout_request_topic,
    rollout_state_topic,
    serves_fleet,
    sign_request,
)

__all__ = ["RemoteRolloutError", "RemoteUsageError", "find_controllers", "follow_rollout",
           "request_rollout", "submit_request"]

log = logging.getLogger("edgekit.controller.remote")
D = TypeVar("D", bound=Document)
_ACTIVE = {s.value for s in ACTIVE_ROLLOUT_STATES}


class RemoteRolloutError(EdgekitError):
    """The controller refused a rollout request; ``code`` is its error class name."""

    def __init__(self, message: str, *, code: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class RemoteUsageError(RemoteRolloutError):
    """The controller refused the request as a usage error (exit 2, as it would locally)."""

    exit_code = 2


def find_controllers(client: HostClient, fleet: str,
                     timeout: float = 5.0) -> list[PresencePayload]:
    """The running controllers (their retained presence) that look after ``fleet``.

    Raises:
        EdgekitError: the broker did not answer within ``timeout`` seconds.
    """
    found = []
    for topic, payload in read_retained(client, presence_filter(), timeout).items():
        try:
            presence = parse_presence(payload)
        except ProtocolError as exc:
            log.warning("ignored the presence on %s: %s", topic, exc.message)
            continue
        if serves_fleet(presence, fleet):
            found.append(presence)
    return sorted(found, key=lambda p: p.id)


def _decode(msg: mqtt.MQTTMessage, cls: type[D]) -> D | None:
    """The message as a ``cls`` document, or None (logged) when it is not one: whoever can
    write to the topic cannot make the caller fail."""
    if not msg.payload:
        return None  # a cleared retained message
    try:
        return decode(msg.payload, cls)
    except ProtocolError as exc:
        log.warning("ignored a message on %s: %s", msg.topic, exc.message)
        return None


def request_rollout(client: HostClient, fleet: str, key: Ed25519PrivateKey, *, name: str,
                    version: str, sha256: str | None = None,
                    devices: list[str] | None = None, plan: dict[str, Any] | None = None,
                    timeout: float = 30.0) -> dict[str, Any]:
    """Ask the fleet's controller for a rollout of the registered ``name:version``, in a
    request signed by the operator ``key``; return the rollout it created
    (``RolloutRecord.to_dict()`` plus ``targets``).

    Raises:
        RemoteRolloutError: the controller refused (the model is not registered, another
            rollout is active, a setting is invalid, ...).
        EdgekitError: no reply within ``timeout`` seconds.
    """
    request = make_rollout_request(fleet, secrets.token_hex(8), name=name, version=version,
                                   sha256=sha256, devices=devices, plan=plan)
    return submit_request(client, request, key, timeout=timeout)


def submit_request(client: HostClient, request: RolloutRequest, key: Ed25519PrivateKey, *,
                   timeout: float = 30.0) -> dict[str, Any]:
    """Sign ``request`` (:func:`~edgekit.protocol.controller.make_rollout_request` makes
    one) with the operator ``key``, publish it to its fleet's controller and wait for the
    reply; return the rollout the reply holds (``RolloutRecord.to_dict()`` plus
    ``targets``). Every request to a controller goes through here.

    Raises:
        RemoteRolloutError: the controller refused the request.
        EdgekitError: no reply within ``timeout`` seconds.
    """
    fleet, request_id, reply_to = request.fleet, request.request_id, request.reply_to
    replies: list[RolloutReply] = []
    got = threading.Event()

    def on_reply(msg: mqtt.MQTTMessage) -> None:
        reply = _decode(msg, RolloutReply)
        if reply is None or reply.request_id != request_id:
            return
        replies.append(reply)
        got.set()

    client.subscribe(reply_to, on_reply)
    try:
        client.publish(rollout_request_topic(fleet), sign_request(request, key), qos=1,
                       wait=timeout)
        if not got.wait(timeout):
            raise EdgekitError(f"the controller did not answer the rollout request within"
                               f" {timeout:g} s",
                               hint="check `edgekit events` and the controller's log")
    finally:
        client.unsubscribe(reply_to)
    reply = replies[0]
    if not reply.ok:
        error = reply.error or ReplyError(code="", message="no reason given")
        kind = RemoteUsageError if error.code in ("UsageError", "ConfigError") else \
            RemoteRolloutError
        raise kind(f"the controller refused the {request.action}:"
                   f" {error.message}", code=error.code, hint=error.hint or None)
    if reply.rollout is None:
        raise EdgekitError("the controller's reply holds no rollout")
    return reply.rollout


def follow_rollout(client: HostClient, fleet: str, rollout_id: int, timeout: float,
                   on_change: Callable[[RolloutStatePayload], None] | None = None
                   ) -> RolloutStatePayload | None:
    """Follow the rollout's state (retained on the fleet's rollout-state topic) until it
    finishes or ``timeout`` seconds pass; return the last state seen (None: none)."""
    latest: list[RolloutStatePayload] = []
    changed = threading.Event()

    def on_state(msg: mqtt.MQTTMessage) -> None:
        state = _decode(msg, RolloutStatePayload)
        if state is not None and state.rollout == rollout_id:
            latest.append(state)
            changed.set()

    topic = rollout_state_topic(fleet)
    client.subscribe(topic, on_state)
    deadline = time.monotonic() + timeout
    seen = 0
    try:
        while True:
            while seen < len(latest):
                if on_change is not None:
                    on_change(latest[seen])
                seen += 1
            if latest and latest[-1].state not in _ACTIVE:
                return latest[-1]
            left = deadline - time.monotonic()
            if left <= 0:
                return latest[-1] if latest else None
            changed.wait(min(left, 0.5))
            changed.clear()
    finally:
        client.unsubscribe(topic)
