"""Fetching an artifact into a partial file: in chunks over MQTT, or over HTTP(S) with
Range requests. Both resume from the prefix the journal recorded, and neither
writes a byte past the size the desired document names (a hard cap).

A fetcher reports progress only for the contiguous prefix that is on disk (after fsync), so
the offset in the journal never covers bytes that a power loss could take back.

Over MQTT the whole artifact's sha256 is computed as the prefix grows, from the bytes on
their way to the disk, and each chunk's own hash is checked only when the whole one does
not match: then the download goes again from the first chunk that does not match its
header, checking every chunk as it arrives. One sha256 pass over the bytes, not two.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import secrets
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPException

from edgekit.errors import ProtocolError
from edgekit.protocol.ota import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    ChunkErrorCode,
    ChunkErrorInfo,
    ChunkRequest,
    UpdateReason,
    decode_chunk,
    encode_request,
    make_request,
    peek_request_id,
)

from .errors import UpdateFailure
from .partial import PartialFile
from .throttle import Pace

__all__ = ["DownloadSettings", "HttpDownload", "MqttDownload", "PartialFile"]

log = logging.getLogger("device_agent.ota")

Progress = Callable[[int], None]
# A journal record (fsync of the file, atomic rewrite of the journal, a progress event) every
# second and at the end: a restart loses at most a second of transfer. (A record every tenth
# of the file as well cost 20 agents sharing a fast link about 5 % of their throughput, and a
# record every MiB about 40 % of the downloading thread's CPU.) Progress events still come
# every 10 % on a link where that takes more than a second (see UpdateRun._progress).
_SYNC_SECONDS = 1.0
_READ_BYTES = 1024 * 1024  # block size when a resumed download hashes what it has
_MAX_CORRUPT = 20  # corrupted replies in a row before the transfer is given up


@dataclass(frozen=True)
class DownloadSettings:
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # asked for; see request_bytes
    window: int = 4  # chunk requests in flight: 4 MiB at the default chunk size
    request_timeout_s: float = 10.0  # a request unanswered this long is sent again
    stall_timeout_s: float = 300.0  # no progress this long: the download fails
    pace: Pace = field(default_factory=Pace)  # thin links: rate cap, maintenance window

    def request_bytes(self) -> int:
        """The chunk size to ask for: ``chunk_bytes``, at most the protocol's
        :data:`MAX_CHUNK_BYTES` and, under a rate cap, at most what the capped rate moves in
        a quarter of ``request_timeout_s``. A chunk is one MQTT message: one that cannot
        arrive before its request times out would be asked for again and again."""
        size = min(self.chunk_bytes, MAX_CHUNK_BYTES)
        if self.pace.max_kbps:
            paced = int(self.pace.max_kbps * 125 * self.request_timeout_s / 4)
            size = min(size, max(1024, paced - paced % 1024))
        return size


class _PrefixHash:
    """sha256 of a partial file's bytes from the first on, extended as a download writes them
    in order: the file's hash without reading it back. A resumed download starts by hashing
    what the file already holds."""

    def __init__(self, partial: PartialFile, end: int) -> None:
        self._hash = hashlib.sha256()
        offset = 0
        while offset < end:
            block = partial.read_at(offset, min(_READ_BYTES, end - offset))
            if not block:
                break
            self._hash.update(block)
            offset += len(block)

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _Throttle:
    """Calls ``progress`` for the prefix on disk every second, and at the end."""

    def __init__(self, partial: PartialFile, progress: Progress, start: int) -> None:
        self.partial = partial
        self.progress = progress
        self.reported = start
        self.at = time.monotonic()

    def update(self, done: int, *, final: bool = False) -> None:
        if done == self.reported:
            return
        if final or time.monotonic() - self.at >= _SYNC_SECONDS:
            self.partial.sync()
            self.progress(done)
            self.reported, self.at = done, time.monotonic()


@dataclass
class _Transfer:
    """Where one MQTT download stands."""

    done: int  # contiguous prefix on disk (and in ``hasher``)
    next_offset: int  # the first byte not asked for yet
    last_progress: float
    check_each: bool  # check every chunk's sha256 on arrival
    hasher: _PrefixHash  # of bytes 0..done
    # past ``done``: offset -> (bytes, their chunk_sha256), until the prefix reaches them
    received: dict[int, tuple[bytes | memoryview, str]] = field(default_factory=dict)
    written: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, length, sha)
    pending: dict[str, tuple[ChunkRequest, float]] = field(default_factory=dict)
    retry: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) to ask again
    corrupt_run: int = 0


class MqttDownload:
    """Asks for chunks on ``request_topic``; replies come back through :meth:`deliver`."""

    def __init__(self, publish: Callable[[str, bytes], bool], connected: Callable[[], bool],
                 request_topic: str, reply_to: str, sha256: str, size: int,
                 settings: DownloadSettings, cancel: threading.Event) -> None:
        self._publish = publish
        self._connected = connected
        self.request_topic = request_topic
        self.reply_to = reply_to
        self.sha256 = sha256
        self.size = size
        self.settings = settings
        self.chunk_bytes = settings.request_bytes()
        self.cancel = cancel
        self._replies: queue.Queue[bytes | bytearray] = queue.Queue()
        self._prefix = secrets.token_hex(4)
        self._count = 0
        self.stats = {"requests": 0, "resent": 0, "corrupt": 0, "errors": 0}
        self.digest: str | None = None  # sha256 of the whole file, once it is downloaded

    def deliver(self, payload: bytes | bytearray) -> None:
        """A reply arrived (paho's thread): hand it to the downloading thread. A bytearray
        is the buffer the reply was read into (see device_agent/_paho.py), kept as it is."""
        self._replies.put(payload)

    def run(self, partial: PartialFile, start: int, progress: Progress) -> None:
        """Download bytes ``start..size`` into ``partial`` and set :attr:`digest`, the whole
        file's sha256 (the caller compares it with the one it was promised).

        Raises:
            UpdateFailure: too_large or sha256_mismatch (the server's artifact is not the one
                named), download_failed (no progress for ``stall_timeout_s``), superseded
                (``cancel`` was set).
        """
        written = self._transfer(partial, start, progress, check_each=False)
        if self.digest == self.sha256:
            return
        again = self._first_corrupt(partial, written)
        if again is None:
            if start == 0:
                return  # every chunk is what its server said: the artifact is another one
            again = 0  # the prefix a restart resumed from was never checked chunk by chunk
        else:
            self.stats["corrupt"] += 1
        log.warning("the downloaded file does not match its sha256; fetching it again from"
                    " byte %d, checking every chunk", again)
        self._transfer(partial, again, progress, check_each=True)

    def _transfer(self, partial: PartialFile, start: int, progress: Progress, *,
                  check_each: bool) -> list[tuple[int, int, str]]:
        """One pass from ``start`` to the end; returns the chunks written (offset, length,
        sha256 their header named)."""
        partial.truncate(start)
        t = _Transfer(done=start, next_offset=start, last_progress=time.monotonic(),
                      check_each=check_each, hasher=_PrefixHash(partial, start))
        throttle = _Throttle(partial, progress, start)
        while t.done < self.size:
            if self.cancel.is_set():
                raise UpdateFailure(UpdateReason.SUPERSEDED, "a newer desired document arrived")
            self._check_stall(t)
            self._expire(t)
            if self._connected():
                self._send(t)
            try:
                payload = self._replies.get(timeout=0.2)
            except queue.Empty:
                continue
            if self._receive(t, partial, payload):
                if self._connected():
                    # Refill the window first: a progress record waits on fsync (tens of ms
                    # on a busy disk), and the chunks asked for arrive meanwhile.
                    self._send(t)
                throttle.update(t.done)
        throttle.update(t.done, final=True)
        self.digest = t.hasher.hexdigest()
        return t.written

    @staticmethod
    def _first_corrupt(partial: PartialFile, written: list[tuple[int, int, str]]) -> int | None:
        """The offset of the first chunk whose bytes on disk differ from its header's sha256."""
        for offset, length, digest in written:  # in offset order: the order they were hashed
            if hashlib.sha256(partial.read_at(offset, length)).hexdigest() != digest:
                return offset
        return None

    def _check_stall(self, t: _Transfer) -> None:
        stall = self.settings.stall_timeout_s
        if not (self._connected() and self.settings.pace.open()):
            # A link that is down or a closed maintenance window is no stall.
            t.last_progress = time.monotonic()
        if time.monotonic() - t.last_progress > stall:
            raise UpdateFailure(UpdateReason.DOWNLOAD_FAILED,
                                f"no chunk arrived for {stall:g} s (at byte {t.done} of"
                                f" {self.size}); no artifact server answers",
                                hint="run `edgekit serve PKG` or a controller for the fleet")

    def _expire(self, t: _Transfer) -> None:
        """Requests unanswered for ``request_timeout_s`` are asked again."""
        now = time.monotonic()
        for rid, (request, sent) in list(t.pending.items()):
            if now - sent > self.settings.request_timeout_s:
                del t.pending[rid]
                t.retry.append((request.offset, request.length))
                self.stats["resent"] += 1

    def _send(self, t: _Transfer) -> None:
        """Fill the window: ranges to ask again first, then the next new ones."""
        while len(t.pending) < self.settings.window and (t.retry or t.next_offset < self.size) \
                and self.settings.pace.admit(self.chunk_bytes):
            if t.retry:
                offset, length = t.retry.pop()
            else:
                offset = t.next_offset
                length = min(self.chunk_bytes, self.size - offset)
                t.next_offset += length
            request = self._request(offset, length)
            if not self._publish(self.request_topic, encode_request(request)):
                t.retry.append((offset, length))
                return
            t.pending[request.request_id] = (request, time.monotonic())

    def _receive(self, t: _Transfer, partial: PartialFile, payload: bytes | bytearray) -> bool:
        """Check one reply and write its bytes; True when they were written."""
        try:
            chunk = decode_chunk(payload, check=t.check_each)
        except ProtocolError as exc:
            self._corrupt(t, payload, exc)
            return False
        entry = t.pending.pop(chunk.header.request_id, None)
        if entry is None:
            return False  # a late reply to a request already sent again
        request = entry[0]
        try:
            chunk.check_answers(request)
        except ProtocolError as exc:
            log.warning("refused a chunk reply: %s", exc.message)
            t.retry.append((request.offset, request.length))
            return False
        if chunk.error is not None:
            self._server_error(t, request, chunk.error)
            return False
        t.corrupt_run = 0
        self._check_total(chunk.header.total)
        if not chunk.data:
            t.retry.append((request.offset, request.length))
            return False
        got = len(chunk.data)
        if got < request.length:
            # The server capped the chunk: ask for the rest of this range.
            t.retry.append((request.offset + got, request.length - got))
        # Kept until the prefix reaches them, then written and hashed in order: the file is
        # written front to back (see partial.py).
        t.received[request.offset] = (chunk.data, chunk.header.chunk_sha256)
        while t.done in t.received:
            data, digest = t.received.pop(t.done)
            partial.write_at(t.done, data)
            t.hasher.update(data)
            t.written.append((t.done, len(data), digest))
            t.done += len(data)
        t.last_progress = time.monotonic()
        return True

    def _corrupt(self, t: _Transfer, payload: bytes | bytearray, exc: ProtocolError) -> None:
        self.stats["corrupt"] += 1
        t.corrupt_run += 1
        bad_id = peek_request_id(payload)
        log.warning("refused a chunk reply: %s", exc.message)
        if bad_id is not None and bad_id in t.pending:
            refused, _ = t.pending.pop(bad_id)
            t.retry.append((refused.offset, refused.length))
        if t.corrupt_run > _MAX_CORRUPT:
            raise UpdateFailure(UpdateReason.DOWNLOAD_FAILED,
                                f"{t.corrupt_run} chunk replies in a row were corrupt") from exc

    def _server_error(self, t: _Transfer, request: ChunkRequest, error: ChunkErrorInfo) -> None:
        self.stats["errors"] += 1
        if error.code == ChunkErrorCode.OUT_OF_RANGE.value:
            raise UpdateFailure(UpdateReason.SHA256_MISMATCH,
                                f"the server's artifact ends before byte {request.offset},"
                                f" the desired document names {self.size} bytes")
        # not_found, internal: another server of the group may answer, or this one later (a
        # restart); ask again after the request timeout.
        t.pending[request.request_id] = (request, time.monotonic())

    def _check_total(self, total: int) -> None:
        if total != self.size:
            reason = UpdateReason.TOO_LARGE if total > self.size else \
                UpdateReason.SHA256_MISMATCH
            raise UpdateFailure(reason, f"the server's artifact is {total} bytes, the desired"
                                f" document names {self.size}")

    def _request(self, offset: int, length: int) -> ChunkRequest:
        self._count += 1
        self.stats["requests"] += 1
        return make_request(f"{self._prefix}-{self._count}", self.sha256, offset, length,
                            self.reply_to)


class HttpDownload:
    """GETs the URL with ``Range: bytes=<offset>-`` and resumes after every failure."""

    def __init__(self, url: str, size: int, settings: DownloadSettings,
                 cancel: threading.Event, context: ssl.SSLContext | None = None) -> None:
        self.url = url
        self.size = size
        self.settings = settings
        self.cancel = cancel
        self.context = context
        self.stats = {"attempts": 0}
        self.digest: str | None = None  # sha256 of the whole file, once it is downloaded
        self._hash: _PrefixHash | None = None

    def run(self, partial: PartialFile, start: int, progress: Progress) -> None:
        """Download bytes ``start..size`` into ``partial`` and set :attr:`digest`, the whole
        file's sha256 (the caller compares it with the one it was promised).

        Raises:
            UpdateFailure: too_large / sha256_mismatch (the server's file is not the size
                named), download_failed (no progress for ``stall_timeout_s``), superseded.
        """
        partial.truncate(start)
        self._hash = _PrefixHash(partial, start)
        throttle = _Throttle(partial, progress, start)
        done = start
        last_progress = time.monotonic()
        backoff = 0.5
        while done < self.size:
            if self.cancel.is_set():
                raise UpdateFailure(UpdateReason.SUPERSEDED, "a newer desired document arrived")
            if time.monotonic() - max(last_progress, self.settings.pace.resumed) > \
                    self.settings.stall_timeout_s:
                raise UpdateFailure(UpdateReason.DOWNLOAD_FAILED,
                                    f"{self.url} gave no bytes for"
                                    f" {self.settings.stall_timeout_s:g} s (at byte {done} of"
                                    f" {self.size})")
            self.stats["attempts"] += 1
            try:
                before = done
                done = self._attempt(partial, done, throttle)
                if done > before:
                    last_progress, backoff = time.monotonic(), 0.5
            except (urllib.error.URLError, HTTPException, OSError, TimeoutError) as exc:
                log.warning("download from %s interrupted at byte %d: %s", self.url, done, exc)
            if done < self.size:
                self.cancel.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        throttle.update(done, final=True)
        self.digest = self._hash.hexdigest()

    def _attempt(self, partial: PartialFile, offset: int, throttle: _Throttle) -> int:
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={offset}-"})
        try:
            response = urllib.request.urlopen(request, timeout=self.settings.request_timeout_s,
                                              context=self.context)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:
                raise UpdateFailure(UpdateReason.SHA256_MISMATCH,
                                    f"{self.url} ends before byte {offset}, the desired"
                                    f" document names {self.size} bytes") from exc
            raise
        with response:
            if response.status == 200 and offset > 0:
                # The server ignored the range: start over from the first byte.
                offset = 0
                partial.truncate(0)
                self._hash = _PrefixHash(partial, 0)
            total = _total(response.headers, response.status)
            if total is not None and total != self.size:
                reason = UpdateReason.TOO_LARGE if total > self.size else \
                    UpdateReason.SHA256_MISMATCH
                raise UpdateFailure(reason, f"{self.url} is {total} bytes, the desired document"
                                    f" names {self.size}")
            while offset < self.size:
                if self.cancel.is_set():
                    return offset
                block = response.read(min(256 * 1024, self.size - offset + 1))
                if not block:
                    break
                partial.write_at(offset, block)
                assert self._hash is not None
                self._hash.update(block)
                offset += len(block)
                throttle.update(offset)
                self.settings.pace.wait(len(block), self.cancel)
            if offset >= self.size and response.read(1):
                raise UpdateFailure(UpdateReason.TOO_LARGE,
                                    f"{self.url} sends more than the {self.size} bytes named")
        return offset


def _total(headers: object, status: int) -> int | None:
    get = getattr(headers, "get", None)
    if get is None:
        return None
    if status == 206:
        value = get("Content-Range") or ""
        tail = value.rpartition("/")[2]
        return int(tail) if tail.isdigit() else None
    length = get("Content-Length")
    return int(length) if length and length.isdigit() else None
