"""A bundle of malformed and oversized payloads on every topic the controller subscribes to
(device telemetry and rollout requests): no crash, bounded memory, counted and logged
refusals, and the controller still stores a valid status afterwards.

Attack of issue 9 (item 8): the controller stored whole multi-MiB status/metrics documents.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _limits_support import REPO, MqttBroker, broker, peak_rss_kib, wait_until  # noqa: F401

from edgekit.host.db import Store
from edgekit.host.mqtt_client import HostClient
from edgekit.protocol import DeviceState, HardwareInfo, Kind, StatusPayload, encode, topic
from edgekit.protocol.controller import rollout_request_topic

MIB = 1024 * 1024
FLEET = "lim-ctl"
BIG = 9 * MIB


def _bundle() -> list[bytes]:
    return [b"{not json", bytes(range(256)) * 64, b'{"schema": "edgekit.other/9"}',
            json.dumps({"schema": "edgekit.status/1", "state": 5, "session": "x"}).encode(),
            b"[" * 100_000 + b"]" * 100_000, b"[1, 2]", b'{"a": "' + b"x" * BIG + b'"}']


def _status(session: int) -> bytes:
    now = time.time()
    return encode(StatusPayload(
        state=DeviceState.ONLINE, device="d1", fleet=FLEET, session=session, ts=now,
        agent_version="0.1.0", runtimes=[], model=None, http=None, started=now,
        hardware=HardwareInfo(hostname="d1", system="Linux", machine="x86_64", release="6",
                              os="Debian", board=None, cpu_count=2,
                              memory_total_bytes=1 << 30, python="3.11")))


def test_malformed_bundle_on_every_controller_topic(broker: MqttBroker, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'edgekit.db'}"
    log_path = tmp_path / "controller.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgekit.host.cli", "controller", "run", "--broker",
             broker.url, "--db", db_url, "--store", str(tmp_path / "store"), "--fleet", FLEET],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = HostClient(broker.url).connect()
    try:
        wait_until(lambda: b"running" in log_path.read_bytes() or proc.poll() is not None, 60,
                   "the controller to start")
        assert proc.poll() is None, log_path.read_text()
        before = peak_rss_kib(proc.pid)
        topics = [topic(FLEET, "d1", kind) for kind in (Kind.STATUS, Kind.METRICS,
                                                       Kind.EVENTS, Kind.SAMPLES)]
        topics.append(rollout_request_topic(FLEET))
        for where in topics:
            for payload in _bundle():
                client.publish(where, payload, wait=30)
        client.publish(topics[0], b"", retain=True, wait=10)
        with Store(db_url) as store:
            def online() -> bool:
                client.publish(topics[0], _status(7), wait=10)
                device = store.get_device(FLEET, "d1")
                return device is not None and device.online
            wait_until(online, 60, "a valid status after the junk to be stored", interval=1.0)
        assert proc.poll() is None, log_path.read_text()[-5000:]
        log = log_path.read_text(errors="replace")
        for kind in ("status", "metrics", "events", "samples"):
            assert f"ignoring a {kind} message" in log, kind
        assert f"{BIG + 9} bytes, over the limit" in log
        assert "Traceback" not in log, log[-5000:]
        growth_mib = (peak_rss_kib(proc.pid) - before) / 1024
        assert growth_mib < 8 * BIG / MIB, growth_mib  # a small multiple of the largest payload
    finally:
        client.publish(topic(FLEET, "d1", Kind.STATUS), b"", retain=True, wait=10)
        client.close()
        proc.terminate()
        proc.wait(30)
