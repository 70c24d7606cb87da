"""The agent's MQTT connection: status with birth and last will, subscriptions, and the
sender that drains the store-and-forward queue.

paho runs the network thread, reconnects with exponential backoff (``mqtt.reconnect_min_s``
doubling up to ``mqtt.reconnect_max_s``) and retries the first connection too. Before each
attempt the session number is incremented on disk and the last will is set with it; on
each successful connect the birth goes out with the same number and every subscription is
made again. A stale ``offline``/``stopped`` status of an older session (a late will) seen
on the device's own status topic is answered by publishing the birth again, so the retained
status always describes the live connection.

Every subscription has a payload cap (:mod:`._limits`); a larger message never reaches its
handler: it is counted in :attr:`MqttLink.rejected`, logged at most once a second per topic
filter, and handed to the subscription's ``on_oversize`` callback when it has one.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import ssl
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edgekit.errors import ProtocolError
from edgekit.protocol import DeviceState, StatusPayload, decode

from . import _paho
from ._limits import payload_cap
from ._outbox import Outbox
from .config import AgentConfig, BrokerAddress

__all__ = ["MqttLink", "ThrottledLog", "keep_large_buffers"]

log = logging.getLogger("device_agent.mqtt")

Handler = Callable[[str, bytes], None]
# A handler that takes the payload as read: a bytearray for a large message (see _paho.py).
# paho keeps no reference to it, so the handler may keep it; other routes may share it, so
# no handler changes it.
BufferHandler = Callable[[str, bytes | bytearray], None]
StatusBuilder = Callable[[int, DeviceState, str | None], bytes]

SESSION_COUNTER = "mqtt.session"
_SEND_WINDOW = 20  # messages in flight from the queue (paho's default in-flight limit)
_ACK_TIMEOUT_S = 60.0  # a queued message unacknowledged this long on a live link is resent
_MATCH_CACHE = 256  # topics whose matching filters are remembered (paho builds a matcher per test)
# glibc's mallopt parameters (malloc.h) and the values the agent sets.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 64 * 1024 * 1024
_TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024


@dataclass(frozen=True)
class _Route:
    handler: BufferHandler
    max_bytes: int
    on_oversize: Handler | None
    buffer: bool  # the handler takes a bytearray as it was read (no copy to bytes)


def _no_delay(client: mqtt.Client, userdata: object, sock: object) -> None:
    # paho leaves Nagle's algorithm on: a reply written right after an acknowledgement would
    # wait for the broker's delayed ACK (40 ms a request).
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        pass


def keep_large_buffers() -> bool:
    """Let glibc's malloc keep freed large blocks for reuse instead of returning them to the
    kernel; True when the setting was made (Linux with glibc), False elsewhere. Never raises.

    Every MQTT message of an artifact chunk (1 MiB) is a fresh allocation in paho's reader
    and decoder. Above glibc's mmap threshold each one is mmapped and unmapped on free, so
    every chunk faults its 256 pages in again; with the threshold at 64 MiB (and the heap
    trimmed only past 128 MiB free) the same memory is reused. It is process-wide, which is
    why the agent sets it once where it starts.
    """
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        return False  # not glibc (musl, macOS, Windows): its allocator has no such knobs
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
    return mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1 and done


class ThrottledLog:
    """Log a warning at most once a second per key, counting the ones held back."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e9) < 1.0:
                self._held[key] = self._held.get(key, 0) + 1
                return
            held = self._held.pop(key, 0)
            self._last[key] = now
        suffix = f" (and {held} more since the last one)" if held else ""
        self._logger.warning(message + suffix, *args)


class MqttLink:
    """One paho client, with the agent's status, subscriptions and queue sender."""

    def __init__(self, cfg: AgentConfig, address: BrokerAddress, outbox: Outbox,
                 status_topic: str, build_status: StatusBuilder) -> None:
        self.address = address
        self.outbox = outbox
        self.status_topic = status_topic
        self._build_status = build_status
        self._routes: dict[str, _Route] = {}
        self._matches: dict[str, list[tuple[str, _Route]]] = {}  # topic -> its routes
        self._predict_max_bytes = cfg.requests.max_request_bytes
        self.rejected: Counter[str] = Counter()  # oversized messages refused, per filter
        self._log = ThrottledLog(log)
        self._connected = threading.Event()
        self._pending_subs: set[int] = set()  # this connection's SUBSCRIBEs not acknowledged
        self._subs_lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._acked: set[int] = set()
        self._queued_mids: set[int] = set()  # sent from the queue, not acknowledged yet
        self._queue_publishing = False  # the sender is inside publish(): its mid is unknown
        self._acked_lock = threading.Lock()
        self.session = outbox.counter(SESSION_COUNTER)
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-sender", daemon=True)

        client = _paho.Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                             protocol=mqtt.MQTTv311, clean_session=True)
        if address.username:
            client.username_pw_set(address.username, address.password or None)
        if address.tls:
            client.tls_set(ca_certs=cfg.mqtt.ca_file or None, certfile=cfg.mqtt.cert_file or None,
                           keyfile=cfg.mqtt.key_file or None, cert_reqs=ssl.CERT_REQUIRED,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.reconnect_delay_set(cfg.mqtt.reconnect_min_s, cfg.mqtt.reconnect_max_s)  # type: ignore[arg-type]
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = _no_delay
        self._client = client
        self._keepalive = cfg.mqtt.keepalive_s
        self.subscribe(status_topic, self._on_own_status)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def subscribed(self) -> bool:
        """Connected, and the broker has acknowledged every subscription made on connect:
        a request published from now on reaches this agent."""
        with self._subs_lock:
            return self._connected.is_set() and not self._pending_subs

    def subscribe(self, topic_filter: str, handler: Handler, *, max_bytes: int | None = None,
                  on_oversize: Handler | None = None) -> None:
        """Route messages matching ``topic_filter`` to ``handler`` (in paho's thread: keep it
        short). Subscriptions are made again on every reconnect.

        A payload over ``max_bytes`` (default: the cap of the topic's kind, see
        :func:`~device_agent._limits.payload_cap`) goes to ``on_oversize`` instead, if given,
        after it is counted and logged."""
        self._route(topic_filter, _Route(handler, self._cap(topic_filter, max_bytes),  # type: ignore[arg-type]
                                         on_oversize, buffer=False))

    def subscribe_buffers(self, topic_filter: str, handler: BufferHandler, *,
                          max_bytes: int | None = None) -> None:
        """Like :meth:`subscribe`, for a handler that takes a large payload as it was read
        from the socket (a bytearray, see :mod:`._paho`) instead of a copy of it."""
        self._route(topic_filter, _Route(handler, self._cap(topic_filter, max_bytes), None,
                                         buffer=True))

    def _cap(self, topic_filter: str, max_bytes: int | None) -> int:
        return max_bytes if max_bytes is not None else payload_cap(topic_filter,
                                                                   self._predict_max_bytes)

    def _route(self, topic_filter: str, route: _Route) -> None:
        self._routes[topic_filter] = route
        self._matches = {}
        if self.connected:
            self._client.subscribe(topic_filter, qos=1)

    def start(self) -> None:
        self._client.connect_async(self.address.host, self.address.port, self._keepalive)
        self._client.loop_start()
        self._sender.start()

    def notify(self) -> None:
        """Something was queued: wake the sender."""
        self._wake.set()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1
                ) -> mqtt.MQTTMessageInfo:
        """Publish directly (replies, status), not through the queue: lost if the link is down."""
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def stop(self, timeout: float = 3.0) -> None:
        """Publish ``stopped``, give the queue ``timeout`` seconds to drain, disconnect
        without the will."""
        deadline = time.monotonic() + timeout
        if self.connected:
            info = self.publish(self.status_topic,
                                self._build_status(self.session, DeviceState.STOPPED, "shutdown"),
                                retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("the stopped status could not be published")
            while self.connected and self.outbox.depth and time.monotonic() < deadline:
                self._wake.set()
                time.sleep(0.05)
        self._stopping.set()
        self._wake.set()
        self._client.disconnect()
        self._client.loop_stop()
        self._sender.join(timeout=2.0)

    # ------------------------------------------------------------------ paho callbacks

    def _on_pre_connect(self, client: mqtt.Client, userdata: object) -> None:
        # A new number per connection, so the host can tell this connection's will from a
        # will of an earlier one that the broker delivers late.
        self.session = self.outbox.next_value(SESSION_COUNTER)
        client.will_set(self.status_topic,
                        self._build_status(self.session, DeviceState.OFFLINE, "connection lost"),
                        qos=1, retain=True)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason_code: mqtt.ReasonCode, properties: object) -> None:
        if reason_code.is_failure:
            log.error("broker %s refused the connection: %s", self.address.url(), reason_code)
            return
        # Subscribe before announcing ``online``: the broker handles one connection's packets
        # in order, so whoever sees ``online`` can reach the agent's request topics.
        with self._subs_lock:
            self._pending_subs.clear()
            for topic_filter in self._routes:
                result, mid = client.subscribe(topic_filter, qos=1)
                if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                    self._pending_subs.add(mid)
        client.publish(self.status_topic, self._build_status(self.session, DeviceState.ONLINE,
                                                              None), qos=1, retain=True)
        self._connected.set()
        self._wake.set()
        log.info("connected to %s (session %d)", self.address.url(), self.session)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reason_codes: object, properties: object) -> None:
        with self._subs_lock:
            self._pending_subs.discard(mid)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        # paho calls this from inside its ``except OSError`` block: the cause is at hand.
        cause = sys.exc_info()[1]
        log.warning("cannot reach broker %s (%s); retrying with backoff", self.address.url(),
                    cause or "connection failed")

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                       reason_code: mqtt.ReasonCode, properties: object) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stopping.is_set():
            log.warning("lost the broker connection (%s); telemetry is queued on disk",
                        reason_code)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int,
                    reason_code: mqtt.ReasonCode, properties: object) -> None:
        # Only an acknowledgement of a message from the queue wakes the sender (a SQLite
        # query): chunk requests are acknowledged many times a second during a download.
        with self._acked_lock:
            ours = self._queue_publishing or mid in self._queued_mids
            if ours:
                self._queued_mids.discard(mid)
                self._acked.add(mid)
        if ours:
            self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: object,
                    message: mqtt.MQTTMessage) -> None:
        payload: bytes | bytearray = message.payload
        for topic_filter, route in self._routes_for(message.topic):
            handler: BufferHandler = route.handler
            if len(payload) > route.max_bytes:
                self.rejected[topic_filter] += 1
                self._log.warn("oversize " + topic_filter, "refused a %d-byte message on %s:"
                               " over the limit of %d bytes (not parsed; %d refused so far)",
                               len(payload), message.topic, route.max_bytes,
                               self.rejected[topic_filter])
                if route.on_oversize is None:
                    continue
                handler = route.on_oversize  # type: ignore[assignment]
            try:
                handler(message.topic, payload if route.buffer or isinstance(payload, bytes)
                        else bytes(payload))
            except Exception:
                # Whatever arrives, the agent logs it and goes on.
                log.exception("handler for %s failed on a message", message.topic)

    def _routes_for(self, topic: str) -> list[tuple[str, _Route]]:
        # Artifact chunks arrive many a second on one topic: match each topic once.
        matches = self._matches
        found = matches.get(topic)
        if found is None:
            found = [(f, r) for f, r in list(self._routes.items())
                     if mqtt.topic_matches_sub(f, topic)]
            if len(matches) >= _MATCH_CACHE:
                matches.clear()
            matches[topic] = found
        return found

    def _on_own_status(self, topic: str, payload: bytes) -> None:
        try:
            doc = decode(payload, StatusPayload)
        except ProtocolError as exc:
            self._log.warn(topic, "ignored a malformed status message on %s: %s", topic,
                           exc.message)
            return
        state, session = doc.state, doc.session
        stale = state in (DeviceState.OFFLINE, DeviceState.STOPPED) and session < self.session
        if stale and self.connected and not self._stopping.is_set():
            log.info("a stale %s status (session %s) replaced the birth; publishing it again",
                     state, session)
            self.publish(self.status_topic,
                         self._build_status(self.session, DeviceState.ONLINE, None), retain=True)

    # ------------------------------------------------------------------ queue sender

    def _send_loop(self) -> None:
        pending: deque[tuple[int, int, float]] = deque()  # (row id, mid, sent at)
        last_id = 0
        while not self._stopping.is_set():
            # Woken by a queued message, an acknowledgement or a connect; the timeout only
            # paces the check for stalled acknowledgements.
            self._wake.wait(5.0)
            self._wake.clear()
            with self._acked_lock:
                acked = self._acked
                self._acked = set()
            done = []
            unacked: deque[tuple[int, int, float]] = deque()
            for row_id, mid, sent in pending:
                (done.append(row_id) if mid in acked else unacked.append((row_id, mid, sent)))
            pending = unacked
            self.outbox.remove(done)
            if not self.connected:
                continue
            if pending and time.monotonic() - pending[0][2] > _ACK_TIMEOUT_S:
                log.warning("queued telemetry was not acknowledged in %.0f s; resending",
                            _ACK_TIMEOUT_S)
                last_id = pending[0][0] - 1
                pending.clear()
                with self._acked_lock:
                    self._queued_mids.clear()
            room = _SEND_WINDOW - len(pending)
            if room <= 0:
                continue
            for msg in self.outbox.peek(last_id, room):
                info = self._publish_queued(msg.topic, msg.payload)
                if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                    break
                pending.append((msg.id, info.mid, time.monotonic()))
                last_id = msg.id

    def _publish_queued(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        """Publish a message of the queue and note its mid, so that its acknowledgement wakes
        the sender (one that arrives before the mid is known is counted as ours)."""
        with self._acked_lock:
            self._queue_publishing = True
        try:
            info = self._client.publish(topic, payload, qos=1)
        except BaseException:
            with self._acked_lock:
                self._queue_publishing = False
            raise
        with self._acked_lock:
            self._queue_publishing = False
            if info.mid not in self._acked:
                self._queued_mids.add(info.mid)
        return info
