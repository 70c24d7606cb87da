"""Agents as real processes against a real broker, watched by a plain paho client.

Covers the retained birth, the last will after kill -9, a clean stop, a stale will answered
by a new birth, metrics with correct counts, feedback moving accuracy and F1, wrong and
garbage messages on every topic the agent subscribes to, and MQTT request/response.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _agent_support import AgentProcess, Models, Watcher, wait_until

from edgekit.artifact import sha256_file
from edgekit.metrics import classification_report
from edgekit.protocol import encode

FLEET = "lab"


def _t(device: str, kind: str) -> str:
    return f"edgekit/v1/{FLEET}/{device}/{kind}"


class Requester:
    """Sends predict/feedback requests and collects the replies on its own topic."""

    def __init__(self, watcher: Watcher, device: str) -> None:
        self.watcher = watcher
        self.device = device
        self.reply_to = _t(device, "reply") + "/" + uuid.uuid4().hex[:8]
        watcher.client.subscribe(self.reply_to, qos=1)
        wait_until(lambda: self._ping(), 30, "the reply subscription")

    def _ping(self) -> bool:
        # A message to ourselves proves the subscription is in place.
        self.watcher.publish(self.reply_to, json.dumps({"request_id": "ping"}))
        return any(d.get("request_id") == "ping" for d in self.watcher.docs(self.reply_to))

    def send(self, request_id: str, inputs: Any, schema: str = "edgekit.predict-request/1",
             **extra: Any) -> None:
        doc = {"schema": schema, "request_id": request_id, "reply_to": self.reply_to,
               "inputs": inputs, **extra}
        self.watcher.publish(_t(self.device, "predict"), encode(doc))

    def feedback(self, request_id: str, prediction_id: str, label: Any) -> None:
        doc = {"schema": "edgekit.feedback/1", "request_id": request_id,
               "reply_to": self.reply_to, "prediction_id": prediction_id, "label": label}
        self.watcher.publish(_t(self.device, "feedback"), json.dumps(doc))

    def reply(self, request_id: str, timeout: float = 30) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for d in self.watcher.docs(self.reply_to):
                if d.get("request_id") == request_id and "schema" in d:
                    return d
            return None

        return wait_until(find, timeout, f"the reply to {request_id}")  # type: ignore[no-any-return]


def _metrics(watcher: Watcher, device: str) -> list[dict[str, Any]]:
    return watcher.docs(_t(device, "metrics"))


def _agent_args(broker_url: str, device: str, model_dir: Path, *extra: str) -> list[str]:
    return ["--device-id", device, "--fleet", FLEET, "--broker", broker_url,
            "--model-dir", str(model_dir), *extra]


def test_status_requests_metrics_feedback_and_garbage(
        broker: Any, models: Models, tmp_path: Path, agents: Any, watcher_factory: Any) -> None:
    x, y = models.data
    device = "pi-1"
    env = {"EDGEKIT_TELEMETRY_INTERVAL_S": "0.5", "EDGEKIT_MQTT_RECONNECT_MIN_S": "0.2"}
    # Subscribed before the agent starts, so it sees the first events and metrics.
    events = watcher_factory(broker.url, [_t(device, "events"), _t(device, "metrics")])
    proc: AgentProcess = agents(_agent_args(broker.url, device, tmp_path / "m", "--model",
                                            str(models.signed_v1), "--trusted-key",
                                            str(models.public_key)), tmp_path, env)
    wait_until(lambda: any(e["kind"] == "agent.started" for e in events.docs(_t(device, "events"))),
               60, "the agent.started event")

    # A subscriber that comes later still gets the retained birth.
    late = watcher_factory(broker.url, [_t(device, "status")])
    wait_until(lambda: late.messages, 30, "the retained status")
    topic, payload, retained = late.messages[0]
    birth = json.loads(payload)
    assert retained and topic == _t(device, "status")
    assert birth["schema"] == "edgekit.status/1" and birth["state"] == "online"
    assert birth["model"] == {"name": "digits", "version": "1.0.0",
                              "sha256": sha256_file(models.signed_v1), "format": "onnx",
                              "runtime": "onnxruntime"}
    assert birth["agent_version"] and birth["hardware"]["cpu_count"] >= 1
    assert {r["key"] for r in birth["runtimes"]} >= {"onnxruntime", "litert"}
    assert birth["session"] >= 1 and (birth["device"], birth["fleet"]) == (device, FLEET)
    kinds = [e["kind"] for e in events.docs(_t(device, "events"))]
    assert kinds[:2] == ["model.activated", "agent.started"]

    # Requests over MQTT: 20 good, 3 of a wrong shape, 1 of a wrong schema.
    req = Requester(late, device)
    rows = list(range(1300, 1320))
    for i in rows:
        req.send(f"ok-{i}", {"x": x[i : i + 1].tolist()})
    wrong = {"w1": {"x": x[:1, :10].tolist()}, "w2": {"image": x[:1].tolist()},
             "w3": {"x": [[1.0] * 64, [2.0] * 63]}}
    for rid, inputs in wrong.items():
        req.send(rid, inputs)
    req.send("w4", {"x": x[:1].tolist()}, schema="edgekit.predict-request/7")
    replies = {i: req.reply(f"ok-{i}") for i in rows}
    assert all(r["ok"] and r["model"]["version"] == "1.0.0" for r in replies.values())
    for rid in wrong:
        r = req.reply(rid)
        assert r["ok"] is False and r["error"]["code"] == "invalid_input", r
    r = req.reply("w4")
    assert r["ok"] is False and r["error"]["code"] == "bad_request"
    assert "edgekit.predict-request/7" in r["error"]["message"]

    def totals() -> dict[str, Any] | None:
        docs = _metrics(events, device)
        last = docs[-1] if docs else None
        return last if last and last["requests"]["total"] >= 20 and \
            last["requests"]["errors_total"] >= 4 else None

    last = wait_until(totals, 60, "metrics that count the requests")
    docs = _metrics(events, device)
    assert last["requests"]["total"] == 20 and last["requests"]["errors_total"] == 4
    assert sum(d["requests"]["interval"] for d in docs) == 20
    assert sum(d["requests"]["by_channel"].get("mqtt", 0) for d in docs) == 20
    assert sum(d["requests"]["errors_by_code"].get("invalid_input", 0) for d in docs) == 3
    assert sum(d["predictions"]["count"] for d in docs) == 20
    seqs = sorted({d["seq"] for d in docs})
    assert seqs == list(range(seqs[0], seqs[-1] + 1))

    # Feedback over MQTT: true labels, then labels that disagree with the model.
    predicted = [replies[i]["classes"][0] for i in rows]
    truth = [int(y[i]) for i in rows]
    for i, label in zip(rows[:10], truth[:10], strict=True):
        req.feedback(f"fb-{i}", replies[i]["prediction_id"], label)
    for i in rows[:10]:
        assert req.reply(f"fb-{i}")["ok"] is True
    good = classification_report(truth[:10], predicted[:10], num_classes=10)
    q = wait_until(lambda: next((d["quality"] for d in reversed(_metrics(events, device))
                                 if d["quality"]["labels"] == 10), None), 60, "10 labels")
    assert q["accuracy"] == pytest.approx(good.accuracy)
    assert q["f1_macro"] == pytest.approx(good.f1)
    drifted = [(p + 3) % 10 for p in predicted[10:]]  # every one of these is wrong
    for i, label in zip(rows[10:], drifted, strict=True):
        req.feedback(f"fb-{i}", replies[i]["prediction_id"], f"digit-{label}")
    for i in rows[10:]:
        assert req.reply(f"fb-{i}")["ok"] is True
    both = classification_report(truth[:10] + drifted, predicted, num_classes=10)
    q = wait_until(lambda: next((d["quality"] for d in reversed(_metrics(events, device))
                                 if d["quality"]["labels"] == 20), None), 60, "20 labels")
    assert q["accuracy"] == pytest.approx(both.accuracy) and q["accuracy"] < good.accuracy
    assert q["f1_macro"] == pytest.approx(both.f1) and q["f1_macro"] < good.f1
    req.feedback("fb-again", replies[rows[0]]["prediction_id"], truth[0])
    assert req.reply("fb-again")["error"]["code"] == "already_labelled"

    # Garbage on every topic the agent subscribes to; it logs, goes on and still answers.
    garbage = [b"", b"\xff\xfe\x00", b"null", b"[]", b"42", b'{"schema": 5}', b"[" * 100000,
               b"x" * 300_000, json.dumps({"schema": "edgekit.status/1", "state": 7}).encode(),
               json.dumps({"schema": "edgekit.predict-request/1", "request_id": "g",
                           "reply_to": "a/#", "inputs": {}}).encode(),
               json.dumps({"schema": "edgekit.predict-request/1", "request_id": "g",
                           "reply_to": _t(device, "status"), "inputs": {}}).encode(),
               json.dumps({"schema": "edgekit.predict-request/1", "request_id": {"a": 1},
                           "reply_to": req.reply_to, "inputs": "x"}).encode(),
               json.dumps({"schema": "edgekit.feedback/1", "prediction_id": 5}).encode()]
    for kind in ("predict", "feedback", "status"):
        for payload in garbage:
            late.publish(_t(device, kind), payload)
    req.send("after-garbage", {"x": x[:2].tolist()})
    assert req.reply("after-garbage")["ok"] is True
    assert proc.alive()
    # The forged reply_to got no reply, and the retained status is still the birth.
    assert not [d for d in late.docs(_t(device, "status"))
                if d.get("schema") == "edgekit.predict-reply/1"]
    check = watcher_factory(broker.url, [_t(device, "status")])
    retained_now = wait_until(lambda: check.docs(_t(device, "status")), 30, "retained status")
    assert retained_now[0]["state"] == "online" and retained_now[0]["session"] == birth["session"]
    log = proc.log()
    assert "ignored a message" in log and "Traceback" not in log

    # kill -9: the broker publishes the last will, with the birth's session.
    proc.kill9()
    will = wait_until(lambda: next((d for d in late.docs(_t(device, "status"))
                                    if d.get("state") == "offline"), None), 60, "the last will")
    assert will["session"] == birth["session"] and will["reason"] == "connection lost"
    assert will["model"] is None

    # Restart from the model folder alone: a newer session; a stale will is answered.
    proc2 = agents(_agent_args(broker.url, device, tmp_path / "m", "--trusted-key",
                               str(models.public_key)), tmp_path, env, name="agent2")
    rebirth = wait_until(lambda: next((d for d in late.docs(_t(device, "status"))
                                       if d.get("state") == "online"
                                       and d["session"] > birth["session"]), None),
                         60, "the new birth")
    assert rebirth["model"]["version"] == "1.0.0"
    stale = dict(will, ts=will["ts"])
    late.publish(_t(device, "status"), json.dumps(stale), retain=True)
    wait_until(lambda: late.docs(_t(device, "status"))[-1].get("state") == "online",
               30, "the birth published again over the stale will")
    fresh = watcher_factory(broker.url, [_t(device, "status")])
    retained = wait_until(lambda: fresh.docs(_t(device, "status")), 30, "the retained status")
    assert retained[-1]["state"] == "online" and retained[-1]["session"] == rebirth["session"]

    # SIGTERM: a clean stop says so, exit code 0.
    assert proc2.terminate() == 0
    stopped = wait_until(lambda: next((d for d in late.docs(_t(device, "status"))
                                       if d.get("state") == "stopped"), None), 30, "stopped")
    assert stopped["session"] == rebirth["session"] and stopped["reason"] == "shutdown"
    assert "Traceback" not in proc2.log()


def test_request_with_batches_and_encoded_outputs(broker: Any, models: Models, tmp_path: Path,
                                                  agents: Any, watcher_factory: Any) -> None:
    x, _ = models.data
    device = "pi-2"
    agents(_agent_args(broker.url, device, tmp_path / "m", "--model", str(models.unsigned_v1),
                       "--allow-unsigned"), tmp_path)
    watcher = watcher_factory(broker.url, [_t(device, "status")])
    wait_until(lambda: watcher.docs(_t(device, "status")), 60, "the birth")
    req = Requester(watcher, device)
    from edgekit.protocol import decode_array, encode_array

    req.send("enc", {"x": encode_array(x[:5])}, outputs="encoded")
    reply = req.reply("enc")
    probs = decode_array(reply["outputs"]["probs"])
    assert probs.shape == (5, 10) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert reply["classes"] == list(probs.argmax(axis=1))
    req.send("none", {"x": x[:2].tolist()}, outputs="none")
    assert "outputs" not in req.reply("none")
    req.send("bad-mode", {"x": x[:2].tolist()}, outputs="pickle")
    assert req.reply("bad-mode")["error"]["code"] == "bad_request"
