"""Fetching an artifact into a partial file: in checked chunks over MQTT, or over HTTP(S)
with Range requests. Both resume from the checked prefix the journal recorded, and neither
writes a byte past the size the desired document names (a hard cap).

A fetcher reports progress only for the contiguous prefix that is on disk (after fsync), so
the offset in the journal never covers bytes that a power loss could take back.
"""

from __future__ import annotations

import logging
import os
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
from pathlib import Path

from edgekit.errors import ProtocolError
from edgekit.protocol.ota import (
    ChunkErrorCode,
    ChunkRequest,
    UpdateReason,
    decode_chunk,
    encode_request,
    make_request,
    peek_request_id,
)

from .errors import UpdateFailure
from .throttle import Pace

__all__ = ["DownloadSettings", "HttpDownload", "MqttDownload", "PartialFile"]

log = logging.getLogger("device_agent.ota")

Progress = Callable[[int], None]
_SYNC_BYTES = 1024 * 1024  # checked bytes between two journal records
_SYNC_SECONDS = 1.0
_MAX_CORRUPT = 20  # corrupted replies in a row before the transfer is given up


@dataclass(frozen=True)
class DownloadSettings:
    chunk_bytes: int = 256 * 1024
    window: int = 4  # chunk requests in flight
    request_timeout_s: float = 10.0  # a request unanswered this long is sent again
    stall_timeout_s: float = 300.0  # no progress this long: the download fails
    pace: Pace = field(default_factory=Pace)  # thin links: rate cap, maintenance window


class PartialFile:
    """The file a download writes into; never longer than ``size``."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._fd = fd

    def truncate(self, offset: int) -> None:
        os.ftruncate(self._fd, offset)

    def write_at(self, offset: int, data: bytes) -> None:
        """Raises: UpdateFailure: the bytes would go past the size cap (too_large)."""
        if offset < 0 or offset + len(data) > self.size:
            raise UpdateFailure(UpdateReason.TOO_LARGE,
                                f"the server sent bytes up to {offset + len(data)}, past the"
                                f" {self.size} bytes the desired document names")
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class _Throttle:
    """Calls ``progress`` for the checked prefix at most every MiB or second (and at the end)."""

    def __init__(self, partial: PartialFile, progress: Progress, start: int) -> None:
        self.partial = partial
        self.progress = progress
        self.reported = start
        self.at = time.monotonic()

    def update(self, done: int, *, final: bool = False) -> None:
        if done == self.reported:
            return
        if final or done - self.reported >= _SYNC_BYTES or time.monotonic() - self.at >= _SYNC_SECONDS:
            self.partial.sync()
            self.progress(done)
            self.reported, self.at = done, time.monotonic()


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
        self.cancel = cancel
        self._replies: queue.Queue[bytes] = queue.Queue()
        self._prefix = secrets.token_hex(4)
        self._count = 0
        self.stats = {"requests": 0, "resent": 0, "corrupt": 0, "errors": 0}

    def deliver(self, payload: bytes) -> None:
        """A reply arrived (paho's thread): hand it to the downloading thread."""
        self._replies.put(payload)

    def run(self, partial: PartialFile, start: int, progress: Progress) -> None:
        """Download bytes ``start..size`` into ``partial``.

        Raises:
            UpdateFailure: too_large or sha256_mismatch (the server's artifact is not the one
                named), download_failed (no progress for ``stall_timeout_s``), superseded
                (``cancel`` was set).
        """
        s = self.settings
        partial.truncate(start)
        throttle = _Throttle(partial, progress, start)
        done = start  # contiguous checked prefix
        next_offset = start
        received: dict[int, int] = {}  # offset -> length, past ``done``
        pending: dict[str, tuple[ChunkRequest, float]] = {}
        retry: list[tuple[int, int]] = []  # (offset, length) to ask again
        last_progress = time.monotonic()
        corrupt_run = 0
        while done < self.size:
            if self.cancel.is_set():
                raise UpdateFailure(UpdateReason.SUPERSEDED, "a newer desired document arrived")
            now = time.monotonic()
            if not (self._connected() and s.pace.open()):
                last_progress = now  # a link that is down or a closed window is no stall
            if now - last_progress > s.stall_timeout_s:
                raise UpdateFailure(UpdateReason.DOWNLOAD_FAILED,
                                    f"no chunk arrived for {s.stall_timeout_s:g} s (at byte"
                                    f" {done} of {self.size}); no artifact server answers",
                                    hint="run `edgekit serve PKG` or a controller for the fleet")
            for rid, (request, sent) in list(pending.items()):
                if now - sent > s.request_timeout_s:
                    del pending[rid]
                    retry.append((request["offset"], request["length"]))
                    self.stats["resent"] += 1
            if self._connected():
                while len(pending) < s.window and (retry or next_offset < self.size) and \
                        s.pace.admit(s.chunk_bytes):
                    if retry:
                        offset, length = retry.pop()
                    else:
                        offset, length = next_offset, min(s.chunk_bytes, self.size - next_offset)
                        next_offset += length
                    request = self._request(offset, length)
                    if self._publish(self.request_topic, encode_request(request)):
                        pending[request["request_id"]] = (request, time.monotonic())
                    else:
                        retry.append((offset, length))
                        break
            try:
                payload = self._replies.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                chunk = decode_chunk(payload)
            except ProtocolError as exc:
                self.stats["corrupt"] += 1
                corrupt_run += 1
                bad_id = peek_request_id(payload)
                log.warning("refused a chunk reply: %s", exc.message)
                if bad_id is not None and bad_id in pending:
                    refused, _ = pending.pop(bad_id)
                    retry.append((refused["offset"], refused["length"]))
                if corrupt_run > _MAX_CORRUPT:
                    raise UpdateFailure(UpdateReason.DOWNLOAD_FAILED,
                                        f"{corrupt_run} chunk replies in a row were corrupt") from exc
                continue
            entry = pending.pop(chunk.header["request_id"], None)
            if entry is None:
                continue  # a late reply to a request already sent again
            request = entry[0]
            try:
                chunk.check_answers(request)
            except ProtocolError as exc:
                log.warning("refused a chunk reply: %s", exc.message)
                retry.append((request["offset"], request["length"]))
                continue
            error = chunk.error
            if error is not None:
                self.stats["errors"] += 1
                if error["code"] == ChunkErrorCode.OUT_OF_RANGE.value:
                    raise UpdateFailure(UpdateReason.SHA256_MISMATCH,
                                        f"the server's artifact ends before byte"
                                        f" {request['offset']}, the desired document names"
                                        f" {self.size} bytes")
                # not_found, internal: another server of the group may answer, or this one
                # later (a restart); ask again after the request timeout.
                pending[request["request_id"]] = (request, time.monotonic())
                continue
            corrupt_run = 0
            total = chunk.header["total"]
            if total != self.size:
                reason = UpdateReason.TOO_LARGE if total > self.size else \
                    UpdateReason.SHA256_MISMATCH
                raise UpdateFailure(reason, f"the server's artifact is {total} bytes, the"
                                    f" desired document names {self.size}")
            if not chunk.data:
                retry.append((request["offset"], request["length"]))
                continue
            partial.write_at(request["offset"], chunk.data)
            got = len(chunk.data)
            if got < request["length"]:
                # The server capped the chunk: ask for the rest of this range.
                retry.append((request["offset"] + got, request["length"] - got))
            received[request["offset"]] = got
            while done in received:
                done += received.pop(done)
            last_progress = time.monotonic()
            throttle.update(done)
        throttle.update(done, final=True)

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

    def run(self, partial: PartialFile, start: int, progress: Progress) -> None:
        """Download bytes ``start..size`` into ``partial``.

        Raises:
            UpdateFailure: too_large / sha256_mismatch (the server's file is not the size
                named), download_failed (no progress for ``stall_timeout_s``), superseded.
        """
        partial.truncate(start)
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
