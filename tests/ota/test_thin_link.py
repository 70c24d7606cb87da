"""Thin links: a download over a 256 kbit/s link that loses packets and breaks, capped by
the device's and the document's rate, interrupted by a kill -9, finishes from where it was,
and the model in service answers every request meanwhile.

The link. ``tc qdisc ... netem`` is not available in this container (the kernel has no
netem module: ``ip netns`` works, ``tc qdisc add ... netem`` answers "Specified qdisc kind
is unknown"), so the link is :class:`ThinLink`, a TCP proxy between the agent and a real
mosquitto: 256 kbit/s each way (a token bucket per direction), 5 % of the blocks it forwards
held back 200 ms (what a lost segment costs TCP: its retransmission), and every connection
cut after 96 KiB from the broker (the agent reconnects; chunks in flight are lost and asked
for again). Everything else is real: the agent process, the broker, the artifact server,
the packages.

The rate is checked from above only (the agent never asked for bytes faster than the cap
allows): a loaded machine can make it slower, never faster.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _ota_fleet import OPERATOR_KEY, Agent, Fleet, LoadClient, Packages, wait_until
from click.testing import CliRunner
from mqtt_broker import MqttBroker

from edgekit.host.cli import cli
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.deploy import read_retained
from edgekit.protocol.ota import (
    Probation,
    Transfer,
    artifact_subscription,
    desired_topic,
    make_transfer,
    ota_reply_topic,
    parse_desired,
)
from edgekit.protocol.signed import open_sealed

LINK_KBPS = 256
DEVICE_KBPS = 96  # ota.max_kbps of the device
DOCUMENT_KBPS = 64  # transfer.max_kbps of the document: the lower one wins
CHUNK = 16 * 1024  # small chunks for a thin link (a chunk is one MQTT message)
PADDING = 160_000


class _Bucket:
    def __init__(self, rate: float) -> None:
        self.rate, self.tokens, self.at = rate, 0.0, time.monotonic()
        self.lock = threading.Lock()

    def pass_(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.rate * 0.05, self.tokens + (now - self.at) * self.rate) - n
            self.at = now
            debt = -self.tokens / self.rate if self.tokens < 0 else 0.0
        time.sleep(debt)


class ThinLink:
    """A TCP proxy to ``target`` port with a thin, lossy, breaking link (module docstring)."""

    def __init__(self, target: int, kbps: int, *, loss: float = 0.05,
                 cut_after: int = 96 * 1024, seed: int = 7) -> None:
        self.target = target
        self.down, self.up = _Bucket(kbps * 125.0), _Bucket(kbps * 125.0)
        self.loss, self.cut_after = loss, cut_after
        self.rng = random.Random(seed)
        self.delayed = self.cuts = self.forwarded = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            pair = (client, upstream)
            threading.Thread(target=self._pump, args=(client, upstream, self.up, pair, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.down, pair, True),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, bucket: _Bucket,
              pair: tuple[socket.socket, socket.socket], downstream: bool) -> None:
        sent = 0
        try:
            while block := src.recv(1460):
                bucket.pass_(len(block))
                if self.rng.random() < self.loss:
                    self.delayed += 1
                    time.sleep(0.2)
                dst.sendall(block)
                sent += len(block)
                self.forwarded += len(block)
                if downstream and sent >= self.cut_after:
                    self.cuts += 1
                    break
        except OSError:
            pass
        for sock in pair:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._closed.set()
        self.server.close()


@dataclass(frozen=True)
class _Via:
    url: str


@pytest.mark.slow
def test_thin_lossy_link_with_a_kill(tmp_path: Path, broker: MqttBroker, pkgs: Packages
                                     ) -> None:
    package = pkgs.make(tmp_path / "thin.edgepkg", version="2.5.0", seed=25, padding=PADDING)
    size = package.stat().st_size
    link = ThinLink(int(broker.url.rsplit(":", 1)[1]), LINK_KBPS)
    fleet = Fleet(broker, "thin")
    requests: list[tuple[float, int, int]] = []  # (when, offset, length) of chunk requests

    def seen(msg: Any) -> None:
        doc = json.loads(msg.payload)
        if doc["reply_to"] == ota_reply_topic("thin", "dev"):  # not the server's probe
            requests.append((time.monotonic(), doc["offset"], doc["length"]))

    fleet.host.subscribe(artifact_subscription("thin"), seen)
    env = {"EDGEKIT_OTA_MAX_KBPS": str(DEVICE_KBPS), "EDGEKIT_OTA_CHUNK_BYTES": str(CHUNK),
           "EDGEKIT_OTA_WINDOW": "2", "EDGEKIT_OTA_REQUEST_TIMEOUT_S": "8",
           "EDGEKIT_OTA_STALL_TIMEOUT_S": "120", "EDGEKIT_MQTT_RECONNECT_MIN_S": "0.2",
           "EDGEKIT_MQTT_RECONNECT_MAX_S": "1"}
    agent = Agent(tmp_path / "dev", _Via(link.url), "thin", "dev", pkgs, env)  # type: ignore[arg-type]
    try:
        agent.wait_healthy()
        fleet.wait_serving("dev", "1.0.0")
        load = LoadClient(agent)
        doc = fleet.deploy("dev", package, transfer=make_transfer(DOCUMENT_KBPS, None),
                           probation=Probation(requests=5, seconds=2.0, max_error_rate=0.0,
                                               max_nonfinite_rate=0.0, max_latency_ms=None))
        wait_until(lambda: (agent.journal.get("current") or {}).get("offset", 0) >= 3 * CHUNK,
                   120, "a third of the download on disk")
        load.stop()
        assert load.failures == [] and load.versions == {"1.0.0"}, load.failures[:3]
        agent.proc.kill()  # type: ignore[union-attr]
        agent.proc.wait(30)  # type: ignore[union-attr]
        offset = agent.journal["current"]["offset"]
        assert 0 < offset < size
        restarted = time.monotonic()
        agent.start()
        agent.wait_healthy()
        load = LoadClient(agent)
        outcome = fleet.outcome("dev", doc.deployment, timeout=240)
        load.stop()
        assert outcome["kind"] == "update.succeeded", outcome
        assert load.failures == [], load.failures[:3]
        assert "1.0.0" in load.versions and load.ok > 0
        assert agent.predict_version() == "2.5.0"

        events = fleet.update_events("dev", doc.deployment)
        starts = [e["data"]["details"]["resume_from"] for e in events
                  if e["kind"] == "update.downloading" and "resume_from" in
                  (e["data"].get("details") or {})]
        assert starts[0] == 0 and starts[-1] >= offset > 0, starts  # resumed, not restarted
        # What the server sent: the file once, plus what the cuts lost in flight; a
        # download that started over would have sent well over 1.5 times the file.
        assert size <= fleet.server.stats.bytes < 1.5 * size
        assert link.cuts >= 1 and link.delayed >= 1
        # The cap, from the requests the agent published after its restart (seen by a
        # plain subscription next to the server's shared one): over any stretch of them,
        # the bytes asked for stay within the bucket's rate, its one second saved up, one
        # chunk of debt, and half a second of jitter on the way to the watcher. The link
        # alone (four times the cap) would break this over any uncut stretch of 2 s.
        rate = DOCUMENT_KBPS * 125.0
        after = [r for r in requests if r[0] >= restarted]
        assert len(after) >= 4
        worst = max(sum(r[2] for r in after[i:j + 1]) - rate * (after[j][0] - after[i][0])
                    for i in range(len(after)) for j in range(i, len(after)))
        assert worst <= rate * 1.5 + 2 * CHUNK, worst
    finally:
        agent.stop()
        link.close()
        fleet.close()



def test_deploy_signs_the_thin_link_limits(broker: MqttBroker, pkgs: Packages,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEKIT_OPERATOR_KEY", str(pkgs.operator_private))
    runner = CliRunner()
    bad = runner.invoke(cli, ["deploy", str(pkgs.v2), "--fleet", "thin-cli", "--device", "d1",
                              "--broker", broker.url, "--window", "25:00-01:00", "--no-wait"])
    assert bad.exit_code == 2 and "--window: '25:00-01:00' is not HH:MM-HH:MM" in bad.output
    result = runner.invoke(cli, ["deploy", str(pkgs.v2), "--fleet", "thin-cli", "--device", "d1",
                                 "--broker", broker.url, "--max-kbps", "64", "--window",
                                 "22:00-06:00", "--no-wait", "--force", "--json"])
    assert result.exit_code == 0, result.output
    topic = desired_topic("thin-cli", "d1")
    with HostClient(broker.url).connect() as client:
        payload = read_retained(client, topic)[topic]
    doc = parse_desired(open_sealed(payload, [OPERATOR_KEY.public_key()]).payload)
    assert doc.transfer == Transfer(max_kbps=64, window="22:00-06:00")


@pytest.mark.slow
def test_no_chunk_before_the_window_opens(tmp_path: Path, broker: MqttBroker, make_agent: Any,
                                          pkgs: Packages) -> None:
    """The device's maintenance window opens at the next minute of its local time: no chunk
    is asked for before it, and the wait does not count as a stall (``ota.stall_timeout_s``
    is 5 s here).

    The agent runs in a time zone of its own (a POSIX ``TZ`` offset in seconds) whose clock
    reads hh:mm:30 when the test starts, so its window opens about 30 s later instead of up
    to 70 s with the host's own clock.
    """
    utc = dt.datetime.now(dt.UTC)
    shift = (30 - utc.second) % 60  # the agent's clock is this many seconds ahead of UTC
    local = utc + dt.timedelta(seconds=shift)
    opens_local = (local + dt.timedelta(minutes=1)).replace(second=0, microsecond=0)
    opens = (opens_local - dt.timedelta(seconds=shift)).replace(tzinfo=dt.UTC)
    window = f"{opens_local:%H:%M}-{opens_local + dt.timedelta(minutes=30):%H:%M}"
    fleet = Fleet(broker, "thin-window")
    reply_to = ota_reply_topic("thin-window", "dev")
    first_request: list[dt.datetime] = []

    def seen(msg: Any) -> None:
        # The device's requests only (the server's own probe goes to the same topic).
        if not first_request and json.loads(msg.payload)["reply_to"] == reply_to:
            first_request.append(dt.datetime.now().astimezone())

    fleet.host.subscribe(artifact_subscription("thin-window"), seen)
    agent = make_agent("thin-window", "dev", env={"EDGEKIT_OTA_MAINTENANCE_WINDOW": window,
                                                  "EDGEKIT_OTA_STALL_TIMEOUT_S": "5",
                                                  "TZ": f"EKT-00:00:{shift:02d}"})
    try:
        agent.wait_healthy()
        fleet.wait_serving("dev", "1.0.0")
        sent = dt.datetime.now(dt.UTC)
        assert sent < opens, f"the deploy went out at {sent}, after the window opened at {opens}"
        doc = fleet.deploy("dev", pkgs.v2)
        outcome = fleet.outcome("dev", doc.deployment, timeout=240)
        assert outcome["kind"] == "update.succeeded", outcome
        assert first_request and first_request[0] >= opens, (first_request, window)
    finally:
        fleet.close()
