"""The artifact servers against a real broker (and a real HTTP socket), and the CLI commands
that publish desired documents and serve packages."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pytest
from _pkgutil import make_package
from click.testing import CliRunner
from mqtt_broker import MqttBroker

import edgekit.protocol.ota as ota
from edgekit.artifact import sha256_file
from edgekit.errors import EdgekitError
from edgekit.host.cli import cli
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.deploy import read_retained
from edgekit.host.ota.server import ArtifactHttpServer, ArtifactServer, probe_artifact
from edgekit.host.ota.store import ArtifactStore
from edgekit.protocol.signed import open_sealed

REPO = Path(__file__).resolve().parents[2]



@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Random bytes do not compress, so the package spans several chunks.
    return make_package(tmp_path_factory.mktemp("pkg") / "tiny.edgepkg",
                        model=os.urandom(700_000))


class Requester:
    """A device's side of the chunk exchange, on a plain HostClient."""

    def __init__(self, url: str, fleet: str = "f1") -> None:
        self.client = HostClient(url).connect()
        self.reply_to = ota.ota_reply_topic(fleet, f"dev-{os.getpid()}-{id(self)}")
        self.fleet = fleet
        self.replies: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self.client.subscribe(self.reply_to, self._on_reply)

    def _on_reply(self, msg: Any) -> None:
        with self._cond:
            header = ota.decode_chunk(bytes(msg.payload)).header
            self.replies[header.request_id] = bytes(msg.payload)
            self._cond.notify_all()

    def ask(self, request_id: str, sha: str, offset: int, length: int,
            topic: str | None = None, timeout: float = 10.0) -> ota.Chunk | None:
        request = ota.make_request(request_id, sha, offset, length, self.reply_to)
        self.client.publish(topic or ota.artifact_request_topic(self.fleet, sha),
                            ota.encode_request(request))
        with self._cond:
            self._cond.wait_for(lambda: request_id in self.replies, timeout)
        payload = self.replies.get(request_id)
        if payload is None:
            return None
        chunk = ota.decode_chunk(payload)
        chunk.check_answers(request)
        return chunk

    def close(self) -> None:
        self.client.close()


def test_host_connection_sends_replies_without_nagle_delay(broker: MqttBroker) -> None:
    # A chunk is published right after its request arrives; with Nagle's algorithm on, the
    # tail of each reply would wait for the broker's delayed ACK.
    with HostClient(broker.url) as host:
        host.connect()
        sock = host.paho.socket()
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_server_serves_a_package_in_checked_chunks(broker: MqttBroker, package: Path) -> None:
    with HostClient(broker.url) as host:
        host.connect()
        server = ArtifactServer(host, fleets=["f1"], max_chunk=128 * 1024)
        info = server.serve(package)
        server.ensure_reachable()  # on amqtt: falls back from the share group to plain
        requester = Requester(broker.url)
        try:
            data = bytearray()
            while len(data) < info.size:
                # Ask for more than the server's cap: it answers with at most its cap.
                chunk = requester.ask(f"r{len(data)}", info.sha256, len(data), 1024 * 1024)
                assert chunk is not None and chunk.error is None
                assert chunk.header.total == info.size
                assert 0 < len(chunk.data) <= 128 * 1024
                data += chunk.data
            assert hashlib.sha256(data).hexdigest() == sha256_file(package) == info.sha256
            past = requester.ask("past", info.sha256, info.size, 10)
            assert past is not None and past.error is not None
            assert past.error.code == "out_of_range"
            # A request whose sha256 is not the one of its topic is refused.
            wrong = requester.ask("wrong", "0" * 64, 0, 10,
                                  topic=ota.artifact_request_topic("f1", info.sha256))
            assert wrong is not None and wrong.error is not None
            assert wrong.error.code == "bad_request"
            # Garbage on the request topic is dropped and the server keeps serving.
            host.publish(ota.artifact_request_topic("f1", info.sha256), b"\x00garbage")
            again = requester.ask("again", info.sha256, 0, 16)
            assert again is not None and again.data == bytes(data[:16])
            assert probe_artifact(host, "f1", info.sha256)
            server.withdraw(info.sha256)
            assert not probe_artifact(host, "f1", info.sha256, timeout=0.5)
        finally:
            requester.close()


def test_shared_subscription_splits_requests(broker: MqttBroker, package: Path) -> None:
    if broker.kind != "mosquitto":
        pytest.skip("the embedded amqtt broker has no shared subscriptions")
    hosts = [HostClient(broker.url).connect() for _ in range(2)]
    servers = [ArtifactServer(h, fleets=["f2"], share_group="ota-test") for h in hosts]
    info = [s.serve(package) for s in servers][0]
    requester = Requester(broker.url, fleet="f2")
    try:
        for i in range(30):
            chunk = requester.ask(f"s{i}", info.sha256, (i * 1000) % info.size, 1000)
            assert chunk is not None and chunk.error is None
        # Every request was answered exactly once, and both servers took a share.
        served = [s.stats.chunks for s in servers]
        assert sum(served) == 30 and min(served) > 0
    finally:
        requester.close()
        for h in hosts:
            h.close()


def test_server_resubscribes_after_a_broker_restart(tmp_path: Path, package: Path) -> None:
    with MqttBroker(tmp_path / "b") as own, HostClient(own.url) as host:
        host.connect()
        server = ArtifactServer(host, fleets=["f1"])
        info = server.serve(package)
        server.ensure_reachable()
        own.restart()
        deadline = time.monotonic() + 30
        while not host.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        requester = Requester(own.url)
        try:
            chunk = requester.ask("after", info.sha256, 0, 100)
            assert chunk is not None and len(chunk.data) == 100
        finally:
            requester.close()


def test_http_server_ranges(package: Path) -> None:
    store = ArtifactStore()
    info = store.add(package)
    data = package.read_bytes()
    http = ArtifactHttpServer(store).start()
    try:
        url = http.url_for(info.sha256)
        with urllib.request.urlopen(url) as resp:
            assert resp.status == 200 and resp.read() == data
            assert resp.headers["Accept-Ranges"] == "bytes"
        req = urllib.request.Request(url, headers={"Range": "bytes=1000-1999"})
        with urllib.request.urlopen(req) as resp:
            assert resp.status == 206 and resp.read() == data[1000:2000]
            assert resp.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
        req = urllib.request.Request(url, headers={"Range": f"bytes={len(data) - 5}-"})
        with urllib.request.urlopen(req) as resp:
            assert resp.read() == data[-5:]
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req) as resp:
            assert int(resp.headers["Content-Length"]) == len(data) and resp.read() == b""
        for bad_url, headers, status in [
            (url, {"Range": f"bytes={len(data)}-"}, 416),
            (http.url_for("0" * 64), {}, 404),
            (http.base_url + "/artifacts/../etc/passwd", {}, 404),
        ]:
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(bad_url, headers=headers))
            assert err.value.code == status
    finally:
        http.stop()


def test_client_reports_an_unreachable_broker() -> None:
    with pytest.raises(EdgekitError, match="cannot reach the MQTT broker"):
        HostClient("mqtt://127.0.0.1:1").connect(timeout=2)
    with pytest.raises(EdgekitError, match="not valid"):
        HostClient("http://example.com")


def test_deploy_no_wait_publishes_the_retained_document(broker: MqttBroker, package: Path,
                                                        tmp_path: Path) -> None:
    from edgekit.signing import generate_keypair, load_public_key

    keys = generate_keypair(tmp_path / "operator")
    runner = CliRunner()
    refused = runner.invoke(cli, ["deploy", str(package), "--fleet", "f3", "--broker",
                                  broker.url, "--no-wait"], env={"EDGEKIT_OPERATOR_KEY": ""})
    assert refused.exit_code == 2 and "no operator key" in refused.output
    result = runner.invoke(cli, ["deploy", str(package), "--fleet", "f3", "--device", "dev-1",
                                 "--device", "dev-2", "--broker", broker.url, "--no-wait",
                                 "--json", "--probation-requests", "5"],
                           env={"EDGEKIT_OPERATOR_KEY": str(keys.private_path)})
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["topics"] == [ota.desired_topic("f3", "dev-1"), ota.desired_topic("f3", "dev-2")]
    assert out["served"] is False
    with HostClient(broker.url) as host:
        host.connect()
        retained = read_retained(host, "edgekit/v1/f3/+/desired")
    assert set(retained) == set(out["topics"])
    opened = open_sealed(retained[out["topics"][0]], [load_public_key(keys.public_path)])
    assert opened.key_id == keys.key_id
    doc = ota.parse_desired(opened.payload)
    assert doc.deployment == out["deployment"]
    assert (doc.fleet, doc.devices) == ("f3", ["dev-1", "dev-2"])
    assert doc.model.sha256 == sha256_file(package)
    assert doc.model.size == package.stat().st_size
    assert doc.sources.mqtt == ota.MqttSource(request_topic=ota.artifact_request_topic(
        "f3", doc.model.sha256))
    assert doc.probation.requests == 5 and doc.allow_downgrade is False


def test_rollback_without_package_uses_the_kept_copy(broker: MqttBroker, package: Path,
                                                     tmp_path: Path) -> None:
    from edgekit.signing import generate_keypair, load_public_key

    keys = generate_keypair(tmp_path / "k")
    runner = CliRunner()
    assert runner.invoke(cli, ["deploy", str(package), "--fleet", "f4", "--broker", broker.url,
                               "--no-wait", "--key", str(keys.private_path)]).exit_code == 0
    result = runner.invoke(cli, ["rollback", "--fleet", "f4", "--to", "0.9.0", "--sign-key",
                                 str(keys.private_path), "--broker", broker.url, "--no-wait",
                                 "--json"])
    assert result.exit_code == 0, result.output
    with HostClient(broker.url) as host:
        host.connect()
        retained = read_retained(host, ota.desired_topic("f4"))
    opened = open_sealed(retained[ota.desired_topic("f4")], [load_public_key(keys.public_path)])
    doc = ota.parse_desired(opened.payload)
    assert msgspec.to_builtins(doc.model) == {"name": "tiny", "version": "0.9.0",
                                              "sha256": None, "size": None, "key_id": None}
    assert (doc.fleet, doc.devices, doc.allow_downgrade) == ("f4", None, True)
    life = ota.parse_time(doc.expires, "e") - ota.parse_time(doc.issued, "i")
    assert life.total_seconds() == ota.ROLLBACK_TTL_S
    bad = runner.invoke(cli, ["rollback", "--fleet", "f4", "--to", "v1", "--sign-key",
                              str(keys.private_path), "--broker", broker.url, "--no-wait"])
    assert bad.exit_code == 2 and "--to" in bad.output


def test_serve_command_answers_until_terminated(broker: MqttBroker, package: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
    proc = subprocess.Popen([sys.executable, "-c", "from edgekit.host.cli import main; main()",
                             "serve", str(package),
                             "--fleet", "f5", "--broker", broker.url],
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline()]
        while "serving tiny" not in lines[-1] and lines[-1]:
            lines.append(proc.stderr.readline())  # e.g. the note of a fallback on amqtt
        assert "serving tiny 1.0.0" in lines[-1], lines
        requester = Requester(broker.url, fleet="f5")
        try:
            chunk = requester.ask("cli", sha256_file(package), 0, 4096)
            assert chunk is not None and chunk.data == package.read_bytes()[:4096]
        finally:
            requester.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        # The server's own reachability probe (1 byte) plus our chunk; the embedded amqtt
        # broker may deliver a request twice, so count at least those.
        summary = re.search(r"served (\d+) chunks, (\d+) bytes \((\d+) errors\)",
                            proc.stderr.read())
        assert summary is not None
        chunks, sent, errors = map(int, summary.groups())
        assert chunks >= 2 and sent >= 4097 and errors == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
