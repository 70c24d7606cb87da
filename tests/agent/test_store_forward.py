"""Store and forward with a real broker outage and an agent restart in the middle of it.

The broker persists sessions (mosquitto ``persistence true``) and the watcher holds a
persistent session, so the watcher misses nothing the broker accepted; what is tested is
that the agent hands every message over, in order, whatever happened meanwhile.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from _agent_support import Models, wait_until
from mqtt_broker import MqttBroker, broker_kind, free_port

FLEET = "saf"

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


def _seqs(watcher: Any, topic: str) -> list[int]:
    return [d["seq"] for d in watcher.docs(topic)]


def _first_arrivals(seqs: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for s in seqs:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def test_outage_and_restart_lose_no_telemetry(models: Models, tmp_path: Path, agents: Any,
                                              watcher_factory: Any) -> None:
    broker = MqttBroker(tmp_path / "broker", persistence=True)
    broker.start()
    try:
        device = "saf-1"
        metrics = f"edgekit/v1/{FLEET}/{device}/metrics"
        reply_to = f"edgekit/v1/{FLEET}/{device}/reply/saf"
        watcher = watcher_factory(broker.url, [metrics, reply_to], client_id="saf-watcher",
                                  persistent=True)
        http = f"127.0.0.1:{free_port()}"
        args = ["--device-id", device, "--fleet", FLEET, "--broker", broker.url, "--model-dir",
                str(tmp_path / "m"), "--allow-unsigned", "--http", http,
                "--telemetry-interval", "0.3"]
        env = {"EDGEKIT_MQTT_RECONNECT_MIN_S": "0.2", "EDGEKIT_MQTT_RECONNECT_MAX_S": "1"}
        first = agents([*args, "--model", str(models.unsigned_v1)], tmp_path, env, name="first")
        wait_until(lambda: len(_seqs(watcher, metrics)) >= 3, 60, "metrics before the outage")

        broker.stop()
        wait_until(lambda: (_gauge(http, "edgekit_agent_telemetry_queue_depth") or 0) >= 4, 60,
                   "metrics queued while the broker is down")
        assert first.terminate() == 0  # a clean stop with the broker away
        second = agents(args, tmp_path, env, name="second")
        wait_until(lambda: (_gauge(http, "edgekit_agent_telemetry_queue_depth") or 0) >= 8, 60,
                   "the restarted agent queueing on top of the old queue")
        queued_seq = max(_seqs(watcher, metrics))

        broker.start()
        wait_until(lambda: _gauge(http, "edgekit_agent_mqtt_connected") == 1, 60, "reconnect")
        wait_until(lambda: _gauge(http, "edgekit_agent_telemetry_queue_depth") == 0, 60,
                   "the queue to drain")
        wait_until(lambda: max(_seqs(watcher, metrics)) >= queued_seq + 12, 60,
                   "metrics after the outage")
        seqs = _seqs(watcher, metrics)
        arrivals = _first_arrivals(seqs)
        assert arrivals == sorted(arrivals), "messages were sent out of order"
        assert arrivals == list(range(arrivals[0], arrivals[-1] + 1)), "a sequence gap"
        assert arrivals[0] == 1
        last = watcher.docs(metrics)[-1]
        assert last["telemetry"]["dropped_total"] == 0
        # The restarted broker forgot the agent's (clean) session: an answer proves the
        # agent subscribed again on reconnect.
        request = json.dumps({"schema": "edgekit.predict-request/1", "request_id": "after",
                              "reply_to": reply_to, "inputs": {"x": [[0.0] * 64]}})
        watcher.publish(f"edgekit/v1/{FLEET}/{device}/predict", request)
        reply = wait_until(lambda: watcher.docs(reply_to), 60, "a reply after the outage")[0]
        assert reply["request_id"] == "after" and reply["ok"] is True
        assert second.terminate() == 0
        for proc in (first, second):
            assert "Traceback" not in proc.log()
    finally:
        broker.stop()


def test_queue_bound_drops_the_oldest_and_says_so(models: Models, tmp_path: Path, agents: Any,
                                                  watcher_factory: Any) -> None:
    broker = MqttBroker(tmp_path / "broker", persistence=True)
    broker.start()
    device = "saf-2"
    metrics = f"edgekit/v1/{FLEET}/{device}/metrics"
    events = f"edgekit/v1/{FLEET}/{device}/events"
    try:
        watcher = watcher_factory(broker.url, [metrics, events], client_id="saf-watcher-2",
                                  persistent=True)
        broker.stop()  # the agent starts with the broker away
        http = f"127.0.0.1:{free_port()}"
        agent = agents(["--device-id", device, "--fleet", FLEET, "--broker", broker.url,
                        "--model-dir", str(tmp_path / "m"), "--allow-unsigned", "--http", http,
                        "--telemetry-interval", "0.2", "--queue-max", "5",
                        "--model", str(models.unsigned_v1)], tmp_path,
                       {"EDGEKIT_MQTT_RECONNECT_MIN_S": "0.2",
                        "EDGEKIT_MQTT_RECONNECT_MAX_S": "1"})
        wait_until(lambda: (_gauge(http, "edgekit_agent_telemetry_dropped_total") or 0) >= 6, 60,
                   "drops at the bound")
        assert _gauge(http, "edgekit_agent_telemetry_queue_depth") == 5
        broker.start()
        wait_until(lambda: any(d["telemetry"]["dropped_total"] >= 6
                               for d in watcher.docs(metrics)), 60, "a report of the drops")
        seqs = _first_arrivals(_seqs(watcher, metrics))
        assert seqs[0] > 1, "the oldest metrics should have been dropped"
        assert seqs == list(range(seqs[0], seqs[-1] + 1))
        # The two start-up events were the oldest messages: dropped too.
        assert not [d for d in watcher.docs(events) if d["kind"] == "agent.started"]
        assert agent.terminate() == 0
        assert json.loads(json.dumps(watcher.docs(metrics)[-1]))["telemetry"]["queue_depth"] <= 5
    finally:
        broker.stop()
