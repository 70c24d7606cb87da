"""Garbage on the agent's request topics is counted where an operator sees it (the metrics'
``errors_by_code`` and the quality window's ``feedback_rejected``), and the agent goes on.

A real mosquitto broker and an in-process agent serving a real converted model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from _agent_support import Models, Watcher, wait_until

from device_agent import Agent, load_config
from edgekit.protocol import encode, topic

FLEET = "rej"


def test_garbage_requests_are_counted_and_serving_goes_on(broker: Any, models: Models,
                                                          tmp_path: Path) -> None:
    x, _ = models.data
    device = "rej-1"
    reply_to = topic(FLEET, device, "reply", "tester")
    agent = Agent(load_config(env={}, overrides={
        "model.dir": str(tmp_path / "m"), "model.package": str(models.unsigned_v1),
        "model.allow_unsigned": True, "telemetry.interval_s": 0.0, "mqtt.broker": broker.url,
        "device.id": device, "device.fleet": FLEET}))
    watcher = Watcher(broker.url, [reply_to])
    try:
        agent.start()
        wait_until(lambda: agent.link.subscribed, 30, "the agent to connect and subscribe")
        predict_garbage = [
            b"", b"\xff\xfe", b"null", b"[]", b'{"schema": 5}', b"{" * 5000,
            encode({"schema": "edgekit.predict-request/2", "request_id": "a",
                    "reply_to": reply_to, "inputs": {}}),
            encode({"schema": "edgekit.predict-request/1", "request_id": "b",
                    "reply_to": reply_to, "inputs": "x"}),
            encode({"schema": "edgekit.predict-request/1", "request_id": "c",
                    "reply_to": reply_to, "inputs": {"x": [[1.0]]}, "outputs": "pdf"}),
            encode({"schema": "edgekit.predict-request/1", "request_id": "d",
                    "reply_to": "a/#", "inputs": {}}),
        ]
        feedback_garbage = [
            b"", b"[1]", encode({"schema": "edgekit.feedback/1", "prediction_id": 5}),
            encode({"schema": "edgekit.feedback/1", "prediction_id": "p", "label": True,
                    "request_id": "e", "reply_to": reply_to}),
        ]
        for payload in predict_garbage:
            watcher.client.publish(topic(FLEET, device, "predict"), payload, qos=1)
        for payload in feedback_garbage:
            watcher.client.publish(topic(FLEET, device, "feedback"), payload, qos=1)
        answered = {"a", "b", "c", "e"}  # the ones whose reply_to could be read
        wait_until(lambda: answered <= {json.loads(p).get("request_id")
                                        for _, p, _ in list(watcher.messages)},
                   30, "error replies")
        wait_until(lambda: agent.window.snapshot().feedback_rejected >= len(feedback_garbage),
                   30, "the refused feedback to be counted")
        good = encode({"schema": "edgekit.predict-request/1", "request_id": "ok",
                       "reply_to": reply_to, "inputs": {"x": x[:1].tolist()}})
        watcher.client.publish(topic(FLEET, device, "predict"), good, qos=1)
        replies = wait_until(lambda: {json.loads(p)["request_id"]: json.loads(p)
                                      for _, p, _ in list(watcher.messages)}.get("ok"),
                             30, "the good request's reply")
        assert replies["ok"] is True
        for _, payload, _ in list(watcher.messages):
            doc = json.loads(payload)
            if doc["request_id"] != "ok":
                assert doc["ok"] is False and doc["error"]["code"] == "bad_request", doc
        # The request pool has several workers: the garbage that has no reply_to to answer
        # may still be on its way through one after the good request's reply is out.
        wait_until(lambda: agent.stats.errors_total >= len(predict_garbage), 30,
                   "every refused request to be counted")
        metrics = agent.tick()
        assert metrics.requests.errors_by_code == {"bad_request": len(predict_garbage)}
        assert metrics.requests.interval == 1
        assert metrics.quality.feedback_rejected == len(feedback_garbage)
    finally:
        watcher.close()
        agent.stop()

