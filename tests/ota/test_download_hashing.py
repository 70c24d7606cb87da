"""One sha256 pass over a download's bytes (device_agent/ota/download.py): the whole file's
hash is computed as the chunks arrive, and a chunk's own hash is checked only when the whole
one fails; then the download goes again from the first chunk that does not match, checking
each one as it arrives.

The server here is a function that answers each chunk request at once through
``MqttDownload.deliver``, in the downloading thread: the transfer logic is what is tested.
The same paths over a real broker and agent are in test_ota_faults.py (a server connection
that corrupts every fifth reply) and test_ota_crash.py (a kill during the download, resumed).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from device_agent.ota.download import DownloadSettings, HttpDownload, MqttDownload, PartialFile
from edgekit.protocol.ota import encode_chunk, parse_request

_REAL_SHA256 = hashlib.sha256
CHUNK = 64 * 1024
ARTIFACT = os.urandom(10 * CHUNK + 1234)
SHA = hashlib.sha256(ARTIFACT).hexdigest()
Tamper = Callable[[int, bytes], bytes]  # (request number, chunk bytes) -> the bytes sent


class Server:
    """Answers requests for ``content`` (which may differ from what the device was promised);
    ``tamper`` changes the bytes of a reply after their hash went into its header."""

    def __init__(self, content: bytes = ARTIFACT, tamper: Tamper | None = None) -> None:
        self.content = content
        self.tamper = tamper
        self.requests: list[int] = []  # offsets asked for, in order
        self.download: MqttDownload | None = None

    def publish(self, _topic: str, payload: bytes) -> bool:
        request = parse_request(payload)
        self.requests.append(request.offset)
        data = self.content[request.offset:request.offset + request.length]
        # (hashed with the real sha256: the counting one below counts the device's hashing)
        reply = encode_chunk(request, data, len(self.content), _REAL_SHA256(data).hexdigest())
        if self.tamper is not None:
            sent = self.tamper(len(self.requests), data)
            reply = reply[:len(reply) - len(data)] + sent
        assert self.download is not None
        self.download.deliver(reply)
        return True


def _download(tmp_path: Path, server: Server, start: int = 0) -> tuple[MqttDownload, bytes]:
    download = MqttDownload(server.publish, lambda: True, "req", "edgekit/v1/f/d/reply/ota",
                            SHA, len(ARTIFACT), DownloadSettings(chunk_bytes=CHUNK, window=4),
                            threading.Event())
    server.download = download
    partial = PartialFile(tmp_path / "x.part", len(ARTIFACT))
    try:
        download.run(partial, start, lambda _offset: None)
    finally:
        partial.close()
    return download, (tmp_path / "x.part").read_bytes()


def _flip(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


class _Counting:
    """hashlib.sha256 that counts the bytes it hashes."""

    hashed = 0

    def __init__(self, data: bytes = b"") -> None:
        self._h = _REAL_SHA256()
        self.update(data)

    def update(self, data: bytes) -> None:
        _Counting.hashed += len(data)
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def test_a_clean_download_hashes_its_bytes_once(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashlib, "sha256", _Counting)
    _Counting.hashed = 0
    server = Server()
    download, on_disk = _download(tmp_path, server)
    assert on_disk == ARTIFACT and download.digest == SHA
    assert _Counting.hashed == len(ARTIFACT)  # once; checking each chunk too made it twice
    assert server.requests == [i * CHUNK for i in range(11)]
    assert download.stats["corrupt"] == 0


def test_a_corrupted_chunk_is_found_and_the_rest_fetched_again_checked(tmp_path: Path) -> None:
    # The fourth reply carries one flipped byte; its header names the true bytes' hash.
    server = Server(tamper=lambda n, data: _flip(data) if n == 4 else data)
    download, on_disk = _download(tmp_path, server)
    assert on_disk == ARTIFACT and download.digest == SHA
    assert download.stats["corrupt"] == 1
    # All eleven chunks once, then again from the corrupted one (offset 3) on.
    assert server.requests == [i * CHUNK for i in range(11)] + [i * CHUNK for i in range(3, 11)]


def test_the_second_pass_refuses_corrupted_chunks_as_they_arrive(tmp_path: Path) -> None:
    # Every fifth reply is corrupted, in both passes: the second one asks for each again.
    server = Server(tamper=lambda n, data: _flip(data) if n % 5 == 0 else data)
    download, on_disk = _download(tmp_path, server)
    assert on_disk == ARTIFACT and download.digest == SHA
    assert download.stats["corrupt"] >= 2


def test_a_resumed_download_whose_prefix_is_bad_starts_over(tmp_path: Path) -> None:
    # A restart resumes at byte 3 * CHUNK of a file whose first bytes are not the artifact's
    # (never checked chunk by chunk): the whole file's hash fails, no chunk of this run is
    # to blame, so it is fetched again from the first byte.
    bad_prefix = _flip(ARTIFACT[:3 * CHUNK])
    (tmp_path / "x.part").write_bytes(bad_prefix)
    server = Server()
    download, on_disk = _download(tmp_path, server, start=3 * CHUNK)
    assert on_disk == ARTIFACT and download.digest == SHA
    assert server.requests == [i * CHUNK for i in range(3, 11)] + [i * CHUNK for i in range(11)]


def test_a_good_resumed_prefix_is_hashed_from_the_file(tmp_path: Path) -> None:
    (tmp_path / "x.part").write_bytes(ARTIFACT[:5 * CHUNK])
    server = Server()
    download, on_disk = _download(tmp_path, server, start=5 * CHUNK)
    assert on_disk == ARTIFACT and download.digest == SHA
    assert server.requests == [i * CHUNK for i in range(5, 11)]


def test_another_artifact_is_not_downloaded_twice(tmp_path: Path) -> None:
    # Every chunk matches its header, but the server holds other bytes of the same size:
    # no chunk is to blame, the download ends with the other digest and the caller refuses
    # it (sha256_mismatch).
    other = os.urandom(len(ARTIFACT))
    server = Server(content=other)
    download, on_disk = _download(tmp_path, server)
    assert on_disk == other
    assert download.digest == hashlib.sha256(other).hexdigest() != SHA
    assert server.requests == [i * CHUNK for i in range(11)]


class _HttpHandler(BaseHTTPRequestHandler):
    """The artifact; the first response stops half way (Content-Length promised more), and
    every later one ignores the Range header (200 with the whole file)."""

    served = 0

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).served += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(ARTIFACT)))
        self.end_headers()
        self.wfile.write(ARTIFACT[:len(ARTIFACT) // 2] if self.served == 1 else ARTIFACT)

    def log_message(self, *_args: object) -> None:
        pass


def test_an_http_download_hashes_as_it_writes_through_a_cut_and_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HttpHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(hashlib, "sha256", _Counting)
    _Counting.hashed = 0
    try:
        download = HttpDownload(f"http://127.0.0.1:{server.server_address[1]}/a",
                                len(ARTIFACT), DownloadSettings(), threading.Event())
        partial = PartialFile(tmp_path / "h.part", len(ARTIFACT))
        try:
            download.run(partial, 0, lambda _offset: None)
        finally:
            partial.close()
    finally:
        server.shutdown()
    assert (tmp_path / "h.part").read_bytes() == ARTIFACT
    assert _HttpHandler.served == 2
    # The restart from byte 0 (the server ignored the range) threw the first hash away.
    assert download.digest == SHA
    # What the cut response wrote (hashed once, on its way to disk) plus the whole file.
    assert _Counting.hashed == len(ARTIFACT) // 2 + len(ARTIFACT)
