"""Telemetry spooled to disk while no broker is reachable stays within its byte bound, and
drains in order when the broker is back; the drops are counted and reported.

A real agent process and a real mosquitto that is stopped and started again. The broker
persists sessions and the watcher holds a persistent one, so the watcher misses nothing the
broker accepted: what is tested is what the agent kept and handed over.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from _agent_support import Models, wait_until
from mqtt_broker import MqttBroker, broker_kind, free_port

FLEET = "spool"
CAP = 64 * 1024  # the smallest telemetry.queue_max_bytes allowed

pytestmark = pytest.mark.skipif(broker_kind() != "mosquitto",
                                reason="a broker outage with persistent sessions needs mosquitto")


def _gauge(http: str, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://{http}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def _first_arrivals(seqs: list[int]) -> list[int]:
    return list(dict.fromkeys(seqs))


def test_spool_stays_within_its_bytes_and_drains(models: Models, tmp_path: Path, agents: Any,
                                                 watcher_factory: Any) -> None:
    broker = MqttBroker(tmp_path / "broker", persistence=True)
    broker.start()
    device = "spool-1"
    metrics = f"edgekit/v1/{FLEET}/{device}/metrics"
    try:
        watcher = watcher_factory(broker.url, [metrics], client_id="spool-watcher",
                                  persistent=True)
        broker.stop()  # the site is cut off from the start
        http = f"127.0.0.1:{free_port()}"
        agent = agents(["--device-id", device, "--fleet", FLEET, "--broker", broker.url,
                        "--model-dir", str(tmp_path / "m"), "--allow-unsigned", "--http", http,
                        "--telemetry-interval", "0.1", "--model", str(models.unsigned_v1)],
                       tmp_path, {"EDGEKIT_MQTT_RECONNECT_MIN_S": "0.2",
                                  "EDGEKIT_MQTT_RECONNECT_MAX_S": "1",
                                  "EDGEKIT_TELEMETRY_QUEUE_MAX_BYTES": str(CAP)})
        wait_until(lambda: (_gauge(http, "edgekit_agent_telemetry_dropped_total") or 0) >= 10,
                   120, "drops at the byte bound")
        spooled = _gauge(http, "edgekit_agent_telemetry_queue_bytes")
        depth = _gauge(http, "edgekit_agent_telemetry_queue_depth")
        assert spooled is not None and CAP // 2 < spooled <= CAP
        assert depth is not None and depth < 10000  # the byte bound binds, not the count
        database = tmp_path / "m" / "state" / "telemetry.sqlite"
        assert database.stat().st_size < 4 * CAP + 256 * 1024  # freed pages are reused

        broker.start()
        wait_until(lambda: _gauge(http, "edgekit_agent_mqtt_connected") == 1, 60, "reconnect")
        dropped = _gauge(http, "edgekit_agent_telemetry_dropped_total") or 0
        wait_until(lambda: any(d["telemetry"]["dropped_total"] >= dropped
                               for d in watcher.docs(metrics)), 60, "a report of the drops")
        wait_until(lambda: (_gauge(http, "edgekit_agent_telemetry_queue_bytes") or CAP) < CAP // 4,
                   60, "the spool to drain")
        seqs = _first_arrivals([d["seq"] for d in watcher.docs(metrics)])
        assert seqs[0] > 1, "the oldest metrics should have been dropped"
        assert seqs == list(range(seqs[0], seqs[-1] + 1)), "out of order, or a gap"
        # Everything not dropped arrived: the first seq that arrived follows the drops
        # (the agent's start-up events were among the oldest messages, dropped as well).
        assert seqs[0] <= dropped + 1
        last = watcher.docs(metrics)[-1]["telemetry"]
        assert last["queue_bytes"] < CAP and last["dropped_total"] >= dropped
        assert agent.terminate() == 0
        assert "Traceback" not in agent.log()
    finally:
        broker.stop()
