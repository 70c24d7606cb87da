"""Attacks on the controller, on a real mosquitto with a real controller and a real agent
(issue item 1 and the local-path request of item 9). The attacker is an anonymous MQTT
client without any key: it can forge status and events of any device and send requests.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _intent_support import Agent, Attacker, Host, Keys, Packages, inner
from mqtt_broker import MqttBroker, wait_until

from edgekit.artifact import sha256_file
from edgekit.host.controller import Controller, load_config
from edgekit.host.db import RolloutState, Store
from edgekit.host.registry import Registry
from edgekit.protocol import Kind, Schema, topic
from edgekit.protocol.controller import (
    ROLLOUT_REQUEST_SCHEMA,
    make_rollout_request,
    reply_topic,
    rollout_request_topic,
    sign_request,
)
from edgekit.protocol.ota.topics import desired_topic
from edgekit.protocol.signed import seal

DEVICE, GHOST = "d1", "ghost"
# A complete hardware section: the controller drops a status that does not fit the schema,
# and the attack needs its forged statuses stored.
_HARDWARE = {"hostname": "forged", "system": "Linux", "machine": "x86_64", "release": "6.1",
             "os": "Debian GNU/Linux 12", "board": None, "cpu_count": 2,
             "memory_total_bytes": 1 << 30, "python": "3.11.7"}


@pytest.fixture
def controller(tmp_path: Path, broker: MqttBroker, fleet_name: str, keys: Keys,
               packages: Packages) -> Iterator[Controller]:
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with Store(db_url) as store:
        registry = Registry(store, tmp_path / "registry")
        for package in (packages.digits1, packages.digits2, packages.digits3):
            registry.push(package)
    cfg = load_config(overrides={
        "mqtt.broker": broker.url, "database.url": db_url,
        "registry.store": str(tmp_path / "registry"), "controller.fleets": [fleet_name],
        "controller.tick_s": 0.1, "controller.signing_key": str(keys.operator_key),
        "controller.operator_keys": [str(keys.operator_pub)], "ingest.workers": 1,
        "rollout.device_timeout_s": 60.0, "rollout.rollback_timeout_s": 60.0,
        "rollout.probation_requests": 0, "rollout.probation_seconds": 0.5})
    with Controller(cfg) as ctl:
        yield ctl


def _store(ctl: Controller) -> Store:
    assert ctl.store is not None
    return ctl.store


def _forge_status(attacker: Attacker, fleet: str, device: str, model: dict[str, Any]) -> None:
    attacker.publish(topic(fleet, device, Kind.STATUS), {
        "schema": Schema.STATUS.value, "state": "online", "device": device, "fleet": fleet,
        "session": 10_000, "ts": time.time(), "agent_version": "forged", "runtimes": [],
        "hardware": _HARDWARE, "model": {**model, "format": "onnx", "runtime": "onnxruntime"},
        "http": None, "started": time.time()}, retain=True)


def _forge_failure(attacker: Attacker, fleet: str, device: str, deployment: str) -> None:
    attacker.publish(topic(fleet, device, Kind.EVENTS), {
        "schema": Schema.EVENT.value, "device": device, "fleet": fleet,
        "seq": secrets.randbelow(10**9), "ts": time.time(), "kind": "update.failed",
        "level": "error", "message": "failed", "reason": "load_failed",
        "data": {"deployment": deployment, "step": "failed", "model": None, "serving": None}})


def _ask(attacker: Attacker, fleet: str, payload: bytes, request_id: str) -> dict[str, Any]:
    """Send a request and return the controller's reply (on the attacker's listening)."""
    reply = reply_topic(fleet, request_id)
    attacker.listen(reply, reply)
    attacker.publish(rollout_request_topic(fleet), payload)
    found = wait_until(lambda: [m for m in attacker.messages(reply) if m], 30,
                       "the controller's reply")
    return dict(json.loads(found[0]))


def _request(fleet: str, **fields: Any) -> dict[str, Any]:
    request_id = secrets.token_hex(8)
    body = {"schema": ROLLOUT_REQUEST_SCHEMA, "request_id": request_id,
            "reply_to": reply_topic(fleet, request_id), "fleet": fleet,
            "issued": time.time(), "name": "digits", "version": "1.0.0",
            "devices": [DEVICE, GHOST], "plan": {"max_failure_rate": 0.0, "canary": "2"}}
    body.update(fields)
    return body


def test_forged_status_unsigned_request_and_forged_failure_sign_no_downgrade(
        controller: Controller, make_agent: Callable[..., Agent], host: Host,
        attacker: Attacker, packages: Packages, keys: Keys) -> None:
    # Issue item 1: d1 runs digits 2.0.0. The attacker claims it runs 1.0.0, asks for a
    # rollout to [d1, ghost] that aborts on any failure, and fails the ghost: the controller
    # used to sign a rollback of d1 to 1.0.0, which the agent installed.
    fleet = host.fleet
    make_agent(DEVICE, packages.digits2)
    host.wait_serving(DEVICE, "digits", "2.0.0")
    store = _store(controller)
    wait_until(lambda: store.get_device(fleet, DEVICE), 30, "the controller to know d1")
    attacker.listen(desired_topic(fleet, "+"), desired_topic(fleet, "_sync"))
    old = {"name": "digits", "version": "1.0.0", "sha256": sha256_file(packages.digits1)}
    _forge_status(attacker, fleet, DEVICE, old)
    _forge_status(attacker, fleet, GHOST, old)
    wait_until(lambda: store.get_device(fleet, GHOST), 30, "the forged ghost to be known")
    # Unsigned, then signed by a key the controller does not trust: both refused.
    unsigned = _request(fleet, version="3.0.0")
    reply = _ask(attacker, fleet, json.dumps(unsigned).encode(), unsigned["request_id"])
    assert reply["ok"] is False and reply["error"]["code"] == "SignatureError", reply
    assert "not signed" in reply["error"]["message"]
    stranger = _request(fleet, version="3.0.0")
    reply = _ask(attacker, fleet, seal(json.dumps(stranger).encode(), keys.stranger),
                 stranger["request_id"])
    assert reply["ok"] is False and reply["error"]["code"] == "SignatureError", reply
    _forge_failure(attacker, fleet, GHOST, "r1-000000")
    assert store.list_rollouts(fleet=fleet) == []
    assert controller.refused == 2
    # An operator's legitimate rollout to the same targets: the forged failure aborts it,
    # and d1 is sent back, but to what it ran itself (2.0.0), never to the 1.0.0 its forged
    # status claims.
    _forge_status(attacker, fleet, DEVICE, old)
    request = make_rollout_request(fleet, secrets.token_hex(8), name="digits", version="3.0.0",
                                   devices=[DEVICE, GHOST],
                                   plan={"max_failure_rate": 0.0, "canary": "2"})
    reply = _ask(attacker, fleet, sign_request(request, keys.operator), request.request_id)
    assert reply["ok"] is True, reply
    rollout_id = reply["rollout"]["id"]
    ghost_doc = wait_until(lambda: attacker.messages(desired_topic(fleet, GHOST)), 30,
                           "the ghost's desired document")
    _forge_failure(attacker, fleet, GHOST, inner(ghost_doc[0])["deployment"])
    final = wait_until(lambda: (r := store.get_rollout(rollout_id)).state in (
        RolloutState.ABORTED, RolloutState.SUCCEEDED, RolloutState.FAILED) and r, 120,
        "the rollout to end")
    assert final.state == RolloutState.ABORTED, final
    host.wait_serving(DEVICE, "digits", "2.0.0")
    published = [inner(p) for p in attacker.messages(desired_topic(fleet, DEVICE)) if p]
    assert published and all(d["model"]["version"] == "3.0.0" for d in published)
    assert published[-1]["revert"] is True and published[-1]["devices"] == [DEVICE]


def test_requests_name_registered_models_never_paths(controller: Controller, host: Host,
                                                     attacker: Attacker, keys: Keys) -> None:
    fleet = host.fleet
    # Even signed by the operator, a request naming a local file is refused unread.
    with_path = _request(fleet, version="9.9.9", package="/etc/shadow", devices=None)
    reply = _ask(attacker, fleet, seal(json.dumps(with_path).encode(), keys.operator),
                 with_path["request_id"])
    assert reply["ok"] is False
    assert "package is not accepted" in reply["error"]["message"]
    assert "edgekit package" not in reply["error"]["message"]
    # A model the registry does not hold is refused by name.
    unknown = make_rollout_request(fleet, secrets.token_hex(8), name="digits", version="9.9.9")
    reply = _ask(attacker, fleet, sign_request(unknown, keys.operator), unknown.request_id)
    assert reply["ok"] is False and "not in the controller's registry" in \
        reply["error"]["message"]
    assert _store(controller).list_rollouts(fleet=fleet) == []


def test_stale_misdirected_and_reflected_requests(controller: Controller, host: Host,
                                                  attacker: Attacker, keys: Keys,
                                                  broker: MqttBroker) -> None:
    fleet = host.fleet
    # A signed request captured an hour ago and replayed now.
    stale = make_rollout_request(fleet, secrets.token_hex(8), name="digits", version="3.0.0",
                                 issued=time.time() - 3600)
    reply = _ask(attacker, fleet, sign_request(stale, keys.operator), stale.request_id)
    assert reply["ok"] is False and "stale or replayed" in reply["error"]["message"]
    # A request signed for another fleet, sent on this fleet's topic.
    other = make_rollout_request("other-fleet", secrets.token_hex(8), name="digits",
                                 version="3.0.0")
    attacker.publish(rollout_request_topic(fleet), sign_request(other, keys.operator))
    # A request whose reply topic points at a device's topic is not answered there.
    victim = topic(fleet, DEVICE, Kind.STATUS)
    attacker.listen(victim, victim)
    aimed = _request(fleet, reply_to=victim)
    attacker.publish(rollout_request_topic(fleet), json.dumps(aimed).encode())
    wait_until(lambda: controller.refused >= 3, 30, "the controller to refuse all three")
    assert [m for m in attacker.messages(victim) if m] == []
    assert _store(controller).list_rollouts() == [] or all(
        r.fleet != fleet for r in _store(controller).list_rollouts())
