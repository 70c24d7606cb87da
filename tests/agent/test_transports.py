"""The agent over TLS (mosquitto, certificates made here) and on the embedded amqtt broker
(MQTT 3.1.1, what ``edgekit demo`` runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _agent_support import Models, wait_until
from mqtt_broker import MqttBroker, make_tls_files, mosquitto_binary


def _predict(watcher: Any, device: str, fleet: str, x_rows: list[list[float]]) -> dict[str, Any]:
    reply_to = f"edgekit/v1/{fleet}/{device}/reply/test"
    watcher.client.subscribe(reply_to, qos=1)

    def ask() -> dict[str, Any] | None:
        watcher.publish(f"edgekit/v1/{fleet}/{device}/predict", json.dumps({
            "schema": "edgekit.predict-request/1", "request_id": "r", "reply_to": reply_to,
            "inputs": {"x": x_rows}}))
        docs = watcher.docs(reply_to)
        return docs[-1] if docs else None

    # Asked again until the reply subscription is in place (the first may go unheard).
    return wait_until(ask, 60, "a reply", interval=0.5)  # type: ignore[no-any-return]


@pytest.mark.skipif(mosquitto_binary() is None, reason="the TLS listener needs mosquitto")
def test_tls_with_client_certificates(models: Models, tmp_path: Path, agents: Any,
                                      watcher_factory: Any) -> None:
    tls = make_tls_files(tmp_path / "tls")
    other_ca = make_tls_files(tmp_path / "other")
    with MqttBroker(tmp_path / "broker", tls=tls) as broker:
        device, fleet = "tls-1", "sec"
        status = f"edgekit/v1/{fleet}/{device}/status"
        watcher = watcher_factory(broker.url, [status, f"edgekit/v1/{fleet}/bad-ca/status"])
        base = ["--fleet", fleet, "--broker", broker.tls_url, "--model-dir", str(tmp_path / "m"),
                "--model", str(models.unsigned_v1), "--allow-unsigned",
                "--cert-file", str(tls.client_cert), "--key-file", str(tls.client_key)]
        agent = agents([*base, "--device-id", device, "--ca-file", str(tls.ca)], tmp_path)
        birth = wait_until(lambda: watcher.docs(status), 60, "the birth over TLS")[0]
        assert birth["state"] == "online"
        reply = _predict(watcher, device, fleet, models.data[0][:1].tolist())
        assert reply["ok"] is True
        # A broker certificate from another CA is refused: the agent never connects.
        wrong = agents([*base, "--device-id", "bad-ca", "--ca-file", str(other_ca.ca),
                        "--model-dir", str(tmp_path / "m2")], tmp_path, name="bad-ca")
        wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in wrong.log(), 60,
                   "the refused TLS handshake")
        assert wrong.alive() and not watcher.docs(f"edgekit/v1/{fleet}/bad-ca/status")
        assert agent.terminate() == 0


def test_embedded_amqtt_broker(models: Models, tmp_path: Path, agents: Any,
                               watcher_factory: Any) -> None:
    with MqttBroker(tmp_path / "broker", kind="amqtt") as broker:
        device, fleet = "am-1", "emb"
        status = f"edgekit/v1/{fleet}/{device}/status"
        agent = agents(["--device-id", device, "--fleet", fleet, "--broker", broker.url,
                        "--model-dir", str(tmp_path / "m"), "--model", str(models.unsigned_v1),
                        "--allow-unsigned"], tmp_path)
        watcher = watcher_factory(broker.url, [status])
        birth = wait_until(lambda: watcher.docs(status), 60, "the retained birth")[0]
        assert birth["state"] == "online"
        assert _predict(watcher, device, fleet, models.data[0][:2].tolist())["ok"] is True
        agent.kill9()
        will = wait_until(lambda: next((d for d in watcher.docs(status)
                                        if d["state"] == "offline"), None), 60, "the last will")
        assert will["session"] == birth["session"]
