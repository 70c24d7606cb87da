"""A small MQTT client for host tools (deploy, serve, the controller), on paho-mqtt 2.

:class:`HostClient` connects with a timeout and a clear error, keeps its subscriptions across
reconnects (re-subscribing in ``on_connect``), and hands each message to the callback of the
filter it matched, so several parts (an artifact server, a deployment tracker) can share one
connection. Callbacks run in paho's network thread: keep them short, and never wait there
for the broker (``subscribe(..., wait=)``, :func:`~edgekit.host.ota.deploy.read_retained`,
:meth:`~edgekit.host.ota.deploy.Deployer.discover`): the answer would come through that thread.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.client import PUBLISH
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edgekit.errors import EdgekitError, UsageError

__all__ = ["BrokerURL", "HostClient", "MessageCallback"]

log = logging.getLogger("edgekit.host.mqtt_client")

MessageCallback = Callable[[mqtt.MQTTMessage], None]


_SPLIT_BYTES = 64 * 1024  # a PUBLISH payload from this size on is sent from where it lies


class _Parts:
    """A PUBLISH as its header and its payload, which paho's writer slices as one buffer
    (``packet[pos:]``, nothing else): the rest of the part ``pos`` falls in, as a view."""

    __slots__ = ("_body", "_head")

    def __init__(self, head: bytes, body: bytes) -> None:
        self._head = head
        self._body = memoryview(body)

    def __len__(self) -> int:
        return len(self._head) + len(self._body)

    def __getitem__(self, key: slice) -> memoryview:
        start = key.start or 0
        if start < len(self._head):
            return memoryview(self._head)[start:]
        return self._body[start - len(self._head):]


class _Client(mqtt.Client):
    """paho's client, without its copies of what it sends.

    paho copies a payload into a new packet, and slices the packet's unsent rest
    (``packet[pos:]``) at every write, a copy of a bytearray: for a 1 MiB chunk reply, two
    copies or more. Here a packet is queued as a view, and a PUBLISH of a ``bytes`` payload
    of 64 KiB or more (MQTT 3.1.1) as its header and a view of the payload itself."""

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: mqtt.MQTTMessageInfo | None = None) -> MQTTErrorCode:
        return super()._packet_queue(command, memoryview(packet), mid, qos,  # type: ignore[arg-type]
                                     info)

    def _send_publish(self, mid: int, topic: bytes, payload: bytes | bytearray = b"",
                      qos: int = 0, retain: bool = False, dup: bool = False,
                      info: mqtt.MQTTMessageInfo | None = None,
                      properties: Any = None) -> MQTTErrorCode:
        if type(payload) is not bytes or len(payload) < _SPLIT_BYTES \
                or not isinstance(topic, bytes) or self._protocol == mqtt.MQTTv5 \
                or self._sock is None:
            return super()._send_publish(mid, topic, payload, qos, retain, dup, info,
                                         properties)
        head = bytearray([PUBLISH | (int(dup) << 3) | (qos << 1) | int(retain)])
        self._pack_remaining_length(head, 2 + len(topic) + (2 if qos else 0) + len(payload))
        self._pack_str16(head, topic)
        if qos:
            head += mid.to_bytes(2, "big")
        return mqtt.Client._packet_queue(self, PUBLISH, _Parts(bytes(head), payload),  # type: ignore[arg-type]
                                         mid, qos, info)


@dataclass(frozen=True)
class BrokerURL:
    """``mqtt://[USER[:PASSWORD]@]HOST[:PORT]`` (1883) or ``mqtts://...`` (TLS, 8883)."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        """Raises: UsageError: not an mqtt:// or mqtts:// URL with a host."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise UsageError(f"broker URL {url!r} is not valid",
                             hint="use mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        try:
            port = parts.port
        except ValueError as exc:
            raise UsageError(f"broker URL {url!r} has an invalid port") from exc
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if tls else 1883), tls,
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    # paho leaves Nagle's algorithm on: the tail of a reply published right after a request
    # arrived (an artifact chunk, a request/response answer) would wait for the broker's
    # delayed ACK of the previous segment.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


class HostClient:
    """One MQTT connection shared by host-side parts; see the module docstring."""

    def __init__(self, url: str, *, client_id: str | None = None, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None,
                 keepalive: int = 30, max_inflight: int = 256, username: str | None = None,
                 password: str | None = None) -> None:
        """``username``/``password`` win over credentials in ``url``."""
        self.broker = BrokerURL.parse(url)
        self.client_id = client_id or f"edgekit-host-{uuid.uuid4().hex[:12]}"
        self.paho = _Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                protocol=mqtt.MQTTv311, clean_session=True)
        self.paho.max_inflight_messages_set(max_inflight)
        self.paho.reconnect_delay_set(1, 30)
        if username:
            self.paho.username_pw_set(username, password)
        elif self.broker.username:
            self.paho.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            self.paho.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file)
        self._keepalive = keepalive
        self._subs: dict[str, tuple[str, int]] = {}  # subscribed filter -> (plain filter, qos)
        self._handlers: dict[str, list[tuple[str, MessageCallback]]] = {}  # by plain filter
        self._subacks: dict[int, threading.Event] = {}
        self._suback_lock = threading.Lock()
        self._lock = threading.Lock()
        self._connect_hooks: list[Callable[[], None]] = []
        self.connected = threading.Event()
        self._refused: str | None = None
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_socket_open = _no_delay

    # ---------------------------------------------------------------- connection

    def connect(self, timeout: float = 10.0) -> HostClient:
        """Connect and start the network thread; return once the broker accepted us.

        Raises:
            EdgekitError: the broker cannot be reached, refused the connection, or did not
                answer within ``timeout`` seconds.
        """
        try:
            self.paho.connect(self.broker.host, self.broker.port, self._keepalive)
        except (OSError, ValueError) as exc:
            raise EdgekitError(f"cannot reach the MQTT broker at {self.broker}: {exc}",
                               hint="check --broker and that the broker is running") from exc
        self.paho.loop_start()
        if not self.connected.wait(timeout):
            refused = self._refused
            self.close()
            raise EdgekitError(
                f"the MQTT broker at {self.broker} "
                + (f"refused the connection: {refused}" if refused else
                   f"did not accept the connection within {timeout:g} s"),
                hint="check the broker URL, user name and password")
        return self

    def close(self) -> None:
        """Disconnect and stop the network thread (idempotent)."""
        try:
            self.paho.disconnect()
        finally:
            self.paho.loop_stop()
            self.connected.clear()

    def __enter__(self) -> HostClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def on_connected(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` after every (re)connection, once subscriptions are restored."""
        self._connect_hooks.append(hook)

    # ---------------------------------------------------------------- messages

    def subscribe(self, topic_filter: str, callback: MessageCallback, qos: int = 1, *,
                  wait: float | None = None) -> None:
        """Subscribe (again after every reconnect) and route matching messages to ``callback``.

        ``topic_filter`` may be a shared subscription (``$share/<group>/<filter>``). Several
        callbacks may share a filter (a controller and a deployment following the same
        events): each gets every message. With ``wait``, return once the broker acknowledged
        the subscription (its retained messages are then on their way).

        Raises:
            EdgekitError: ``wait`` was given and no acknowledgement came in time.
        """
        plain = _plain(topic_filter)
        with self._lock:
            new = topic_filter not in self._subs
            self._subs[topic_filter] = (plain, qos)
            handlers = self._handlers.setdefault(plain, [])
            if not handlers:
                self.paho.message_callback_add(plain, self._dispatcher(plain))
            handlers.append((topic_filter, callback))
        if new and self.connected.is_set():
            acked = threading.Event()
            with self._suback_lock:
                _rc, mid = self.paho.subscribe(topic_filter, qos)
                if mid is not None:
                    self._subacks[mid] = acked
            if wait is not None and not acked.wait(wait):
                raise EdgekitError(f"the broker at {self.broker} did not acknowledge the"
                                   f" subscription to {topic_filter} within {wait:g} s")

    def unsubscribe(self, topic_filter: str, callback: MessageCallback | None = None) -> None:
        """Stop routing ``topic_filter`` to ``callback`` (None: to any callback); the broker
        subscription ends when no callback is left for the filter."""
        with self._lock:
            entry = self._subs.get(topic_filter)
            if entry is None:
                return
            plain = entry[0]
            handlers = [(f, cb) for f, cb in self._handlers.get(plain, [])
                        if not (f == topic_filter and (callback is None or cb is callback))]
            self._handlers[plain] = handlers
            last = not any(f == topic_filter for f, _ in handlers)
            if last:
                del self._subs[topic_filter]
            if not handlers:
                del self._handlers[plain]
                self.paho.message_callback_remove(plain)
        if last and self.connected.is_set():
            self.paho.unsubscribe(topic_filter)

    def _dispatcher(self, plain: str) -> Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]:
        def dispatch(_client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
            with self._lock:
                callbacks = [cb for _f, cb in self._handlers.get(plain, [])]
            for callback in callbacks:
                _safe(callback, msg)
        return dispatch

    def publish(self, topic: str, payload: bytes | str | None, *, qos: int = 1,
                retain: bool = False, wait: float | None = None) -> mqtt.MQTTMessageInfo:
        """Publish; with ``wait``, block until the broker acknowledged it (QoS 1) or
        ``wait`` seconds passed.

        Raises:
            EdgekitError: ``wait`` was given and the broker did not acknowledge in time.
        """
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        if wait is not None:
            try:
                info.wait_for_publish(wait)
            except (RuntimeError, ValueError) as exc:
                raise EdgekitError(f"could not publish to {topic}: {exc}") from exc
            if not info.is_published():
                raise EdgekitError(f"the broker did not acknowledge the message on {topic}"
                                   f" within {wait:g} s")
        return info

    # ---------------------------------------------------------------- paho callbacks

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any,
                    reason_code: Any, _properties: Any) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            log.warning("broker %s refused the connection: %s", self.broker, reason_code)
            return
        with self._lock:
            subs = list(self._subs.items())
        for topic_filter, (_plain_filter, qos) in subs:
            client.subscribe(topic_filter, qos)
        self.connected.set()
        for hook in self._connect_hooks:
            _safe(lambda run: run(), hook)

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, mid: int,
                      _reason_codes: Any, _properties: Any) -> None:
        with self._suback_lock:
            acked = self._subacks.pop(mid, None)
        if acked is not None:
            acked.set()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any,
                       reason_code: Any, _properties: Any) -> None:
        self.connected.clear()
        log.info("disconnected from %s: %s", self.broker, reason_code)


def _plain(topic_filter: str) -> str:
    """The filter without a ``$share/<group>/`` prefix (what incoming topics are matched to)."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def _safe(callback: Callable[[Any], None], arg: Any) -> None:
    # A failing callback must not take paho's network thread down with it.
    try:
        callback(arg)
    except Exception:
        log.exception("MQTT message callback failed")
