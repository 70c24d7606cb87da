"""Serving packages to devices: in chunks over MQTT, and over HTTP(S) with Range requests.

:class:`ArtifactServer` answers chunk requests (:mod:`edgekit.protocol.ota.chunks`) for the packages
of an :class:`~edgekit.host.ota.store.ArtifactStore`, on a :class:`~edgekit.host.mqtt_client.HostClient`
it may share with other parts (the controller's own connection, ``edgekit deploy``'s). It
subscribes once per (fleet, artifact), through a shared subscription by default, so several
servers of one fleet split the requests between them and a request reaches only servers
holding the artifact. :class:`ArtifactHttpServer` serves the same store at
``/artifacts/<sha256>``.

A request is at most :data:`MAX_REQUEST_BYTES` (larger ones are dropped unparsed), and a chunk
goes only to a reply topic the protocol gives requesters (:func:`reply_topic_allowed`): a
device's ``reply/ota`` topic in the request's fleet, or the host's own probe topic. Nobody can
make the server send a megabyte to a topic of their choosing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from edgekit.errors import ArtifactError, EdgekitError, ProtocolError
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota._http import ArtifactHttpServer
from edgekit.host.ota.delta import DeltaFile
from edgekit.host.ota.store import ArtifactInfo, ArtifactStore
from edgekit.protocol import ROOT, Kind, check_id, is_valid_id, parse_topic
from edgekit.protocol.ota.chunks import (
    ChunkErrorCode,
    decode_chunk,
    encode_chunk,
    encode_chunk_error,
    encode_request,
    make_request,
    parse_request,
)
from edgekit.protocol.ota.topics import (
    DEFAULT_SHARE_GROUP,
    artifact_request_topic,
    artifact_subscription,
)

__all__ = ["DEFAULT_MAX_CHUNK", "MAX_REQUEST_BYTES", "ArtifactHttpServer", "ArtifactServer",
           "ServerStats", "probe_artifact", "reply_topic_allowed"]

log = logging.getLogger("edgekit.host.ota.server")

DEFAULT_MAX_CHUNK = 1024 * 1024
MAX_REQUEST_BYTES = 4 * 1024  # a chunk request is a few hundred bytes of JSON
_HOST_SCOPE = "_host"
_PROBE = "probe"
_NONCE_RE = re.compile(r"[0-9a-f]{16}")


def reply_topic_allowed(request_topic: str, reply_to: str) -> bool:
    """Whether a chunk for a request received on ``request_topic`` may go to ``reply_to``:
    ``edgekit/v1/<fleet>/<device>/reply/ota`` of the same fleet, or the host's probe topic
    ``edgekit/v1/<fleet>/_host/probe/<16 hex>``."""
    levels = request_topic.split("/")
    parts = parse_topic(reply_to)
    if parts is None or len(levels) < 3 or parts.fleet != levels[2]:
        return False
    if parts.device == _HOST_SCOPE:
        return parts.kind == _PROBE and bool(_NONCE_RE.fullmatch(parts.rest))
    return is_valid_id(parts.device) and parts.kind == Kind.REPLY.value and parts.rest == "ota"


@dataclass
class ServerStats:
    requests: int = 0
    chunks: int = 0
    bytes: int = 0
    errors: int = 0


class ArtifactServer:
    """Answers chunk requests for the artifacts in ``store``, for the given fleets.

    ``fleets`` may hold ``"+"`` to serve every fleet on the broker. ``share_group`` None makes
    plain subscriptions (for brokers without shared subscriptions, such as amqtt); with one
    server per fleet that changes nothing, with several every server would answer.
    """

    def __init__(self, client: HostClient, store: ArtifactStore | None = None, *,
                 fleets: Iterable[str], share_group: str | None = DEFAULT_SHARE_GROUP,
                 max_chunk: int = DEFAULT_MAX_CHUNK, cache_bytes: int = 64 * 1024**2) -> None:
        self.client = client
        self.store = store or ArtifactStore()
        self.share_group = share_group
        self.max_chunk = max_chunk
        self.cache_bytes = cache_bytes
        self.stats = ServerStats()
        self._cache: OrderedDict[tuple[str, int, int], tuple[bytes, str]] = OrderedDict()
        self._cached_bytes = 0
        self._cache_lock = threading.Lock()
        self._fleets: set[str] = set()
        self._lock = threading.Lock()
        for fleet in fleets:
            self.add_fleet(fleet)

    def add_fleet(self, fleet: str) -> None:
        """Serve every registered artifact to ``fleet`` too.

        Raises:
            UsageError: ``fleet`` is not a valid fleet id (or ``+``).
        """
        if fleet != "+":
            check_id(fleet, "fleet")
        with self._lock:
            self._fleets.add(fleet)
        for info in self.store.infos():
            self.client.subscribe(artifact_subscription(fleet, info.sha256, self.share_group),
                                  self._handle, qos=1)

    def serve(self, path: str | os.PathLike[str]) -> ArtifactInfo:
        """Register a package and start answering requests for it.

        Raises:
            ArtifactError: the file is missing or is not an edgekit package.
        """
        info = self.store.add(path)
        self._subscribe(info.sha256)
        log.info("serving %s %s (%s, %d bytes)", info.name, info.version, info.sha256[:12],
                 info.size)
        return info

    def serve_delta(self, delta: DeltaFile, target: ArtifactInfo) -> ArtifactInfo:
        """Start answering requests for a delta that rebuilds ``target`` (by its sha256).

        Raises:
            ArtifactError: the delta file is missing or changed.
        """
        info = self.store.add_delta(delta.path, delta.sha256, delta.size, target)
        self._subscribe(info.sha256)
        log.info("serving a delta to %s %s from %s (%d bytes)", target.name, target.version,
                 delta.base_sha256[:12], delta.size)
        return info

    def withdraw(self, sha256: str) -> None:
        """Stop serving one artifact (and forget its cached chunks)."""
        with self._lock:
            fleets = list(self._fleets)
        for fleet in fleets:
            self.client.unsubscribe(artifact_subscription(fleet, sha256, self.share_group),
                                    self._handle)
        self.store.remove(sha256)
        with self._cache_lock:
            for key in [k for k in self._cache if k[0] == sha256]:
                self._cached_bytes -= len(self._cache.pop(key)[0])

    def ensure_reachable(self, fleet: str | None = None, timeout: float = 2.0) -> None:
        """Check that chunk requests reach this server (a probe for the first artifact, in
        ``fleet`` or the first fleet served). When the broker does not deliver the share group
        (amqtt has no shared subscriptions), fall back to plain subscriptions.

        Raises:
            EdgekitError: requests do not reach the server either way (the broker's ACLs).
        """
        infos = self.store.infos()
        with self._lock:
            fleets = sorted(self._fleets)
        if not infos or not fleets:
            return
        probe_fleet = fleet or next((f for f in fleets if f != "+"), "probe")
        if probe_artifact(self.client, probe_fleet, infos[0].sha256, timeout):
            return
        if self.share_group is not None:
            self.set_share_group(None)
            if probe_artifact(self.client, probe_fleet, infos[0].sha256, timeout):
                log.warning("the broker does not deliver shared subscriptions; serving with"
                            " plain ones")
                return
        raise EdgekitError("chunk requests do not reach this artifact server",
                           hint="check that the broker lets this client subscribe to"
                                " edgekit/v1/<fleet>/_artifacts/#")

    def set_share_group(self, group: str | None) -> None:
        """Move every subscription to another share group (None: plain subscriptions)."""
        with self._lock:
            fleets = list(self._fleets)
        infos = self.store.infos()
        for fleet in fleets:
            for info in infos:
                self.client.unsubscribe(artifact_subscription(fleet, info.sha256,
                                                              self.share_group), self._handle)
        self.share_group = group
        for info in infos:
            self._subscribe(info.sha256)

    def _subscribe(self, sha256: str) -> None:
        with self._lock:
            fleets = list(self._fleets)
        for fleet in fleets:
            self.client.subscribe(artifact_subscription(fleet, sha256, self.share_group),
                                  self._handle, qos=1)

    def _handle(self, msg: mqtt.MQTTMessage) -> None:
        self.stats.requests += 1
        if len(msg.payload) > MAX_REQUEST_BYTES:
            self.stats.errors += 1
            log.warning("ignoring a %d-byte chunk request on %s: over the limit of %d bytes",
                        len(msg.payload), msg.topic, MAX_REQUEST_BYTES)
            return
        try:
            request = parse_request(bytes(msg.payload))
        except ProtocolError as exc:
            # Without a valid request there may be no reply topic to explain it on.
            self.stats.errors += 1
            log.warning("ignoring a chunk request on %s: %s", msg.topic, exc.message)
            return
        reply_to = request.reply_to
        if not reply_topic_allowed(msg.topic, reply_to):
            self.stats.errors += 1
            log.warning("ignoring a chunk request on %s: its reply topic %r is not a device's"
                        " reply/ota topic of this fleet", msg.topic, reply_to[:200])
            return
        if not msg.topic.endswith("/" + request.sha256):
            self._error(reply_to, request.request_id, request.sha256,
                        request.offset, ChunkErrorCode.BAD_REQUEST,
                        "the request's sha256 is not the one of the topic it was sent to")
            return
        length = min(request.length, self.max_chunk)
        try:
            info, data, digest = self._read(request.sha256, request.offset, length)
        except KeyError:
            self._error(reply_to, request.request_id, request.sha256, request.offset,
                        ChunkErrorCode.NOT_FOUND, "this server does not hold the artifact")
            return
        except ArtifactError as exc:
            log.error("cannot serve %s: %s", request.sha256[:12], exc.message)
            self._error(reply_to, request.request_id, request.sha256, request.offset,
                        ChunkErrorCode.INTERNAL, exc.message)
            return
        if request.offset >= info.size:
            self._error(reply_to, request.request_id, request.sha256, request.offset,
                        ChunkErrorCode.OUT_OF_RANGE,
                        f"offset {request.offset} is past the end ({info.size} bytes)")
            return
        self.client.publish(reply_to, encode_chunk(request, data, info.size, digest), qos=1)
        self.stats.chunks += 1
        self.stats.bytes += len(data)

    def _read(self, sha256: str, offset: int, length: int) -> tuple[ArtifactInfo, bytes, str]:
        """A chunk and its sha256, from a small cache: the devices of a fleet ask for the
        same chunks, so most requests skip the disk and the hashing."""
        key = (sha256, offset, length)
        info = self.store.get(sha256)
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None and info is not None:
                self._cache.move_to_end(key)
                return info, cached[0], cached[1]
        info, data = self.store.read(sha256, offset, length)
        digest = hashlib.sha256(data).hexdigest()
        with self._cache_lock:
            self._cache[key] = (data, digest)
            self._cached_bytes += len(data)
            while self._cached_bytes > self.cache_bytes and self._cache:
                _key, (old, _digest) = self._cache.popitem(last=False)
                self._cached_bytes -= len(old)
        return info, data, digest

    def _error(self, reply_to: str, request_id: str, sha256: str, offset: int,
               code: ChunkErrorCode, message: str) -> None:
        self.stats.errors += 1
        self.client.publish(reply_to, encode_chunk_error(request_id, sha256, offset, code,
                                                         message), qos=1)


def probe_artifact(client: HostClient, fleet: str, sha256: str, timeout: float = 1.0) -> bool:
    """Whether some server answers chunk requests for ``sha256`` in ``fleet`` within
    ``timeout`` seconds (a one-byte request)."""
    nonce = secrets.token_hex(8)
    reply_to = "/".join([ROOT, fleet, _HOST_SCOPE, _PROBE, nonce])
    request = make_request(nonce, sha256, 0, 1, reply_to)
    answered = threading.Event()

    def on_reply(msg: mqtt.MQTTMessage) -> None:
        try:
            chunk = decode_chunk(bytes(msg.payload))
        except ProtocolError:
            return
        if chunk.header.request_id == nonce and chunk.error is None:
            answered.set()

    client.subscribe(reply_to, on_reply, wait=max(timeout, 5.0))
    try:
        client.publish(artifact_request_topic(fleet, sha256), encode_request(request), qos=1)
        return answered.wait(timeout)
    finally:
        client.unsubscribe(reply_to, on_reply)
