"""Attacks on what a device runs, on a real mosquitto with real agents (issue items 2, 3 and
9: unsigned desired documents, a downgrade through a name change, rollbacks that never
expire). Each attacker here can publish anything on the broker but holds no operator key.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

from _intent_support import Agent, Attacker, Host, Keys, Packages
from mqtt_broker import wait_until

import edgekit.protocol.ota as ota
from edgekit.protocol.ota.topics import desired_topic

DEVICE = "d1"


def _started(make_agent: Callable[..., Agent], host: Host, model: Any, name: str,
             version: str, device: str = DEVICE) -> Agent:
    agent = make_agent(device, model)
    host.wait_serving(device, name, version)
    return agent


def test_unsigned_desired_document_is_refused(make_agent: Callable[..., Agent], host: Host,
                                              attacker: Attacker, packages: Packages) -> None:
    _started(make_agent, host, packages.digits1, "digits", "1.0.0")
    # The attacker picks a (validly signed) package, skips probation, allows breaking.
    doc = host.document(packages.digits3, [DEVICE], allow_breaking=True,
                        probation=ota.Probation(requests=0, seconds=0.0, max_error_rate=1.0,
                                                max_nonfinite_rate=1.0, max_latency_ms=None))
    attacker.publish(desired_topic(host.fleet, DEVICE), ota.encode_desired(doc), retain=True)
    refusal = wait_until(lambda: host.refusals(DEVICE, "untrusted_intent"), 60,
                         "the refusal of the unsigned document")[0]
    assert "unsigned" in refusal["message"]
    assert refusal["data"]["deployment"] == ""  # nothing of it was parsed
    assert host.serving(DEVICE)["version"] == "1.0.0"  # type: ignore[index]


def test_documents_signed_by_other_keys_are_refused(make_agent: Callable[..., Agent],
                                                    host: Host, keys: Keys,
                                                    packages: Packages) -> None:
    _started(make_agent, host, packages.digits1, "digits", "1.0.0")
    doc = host.document(packages.digits2, [DEVICE])
    # The same document with a forged payload under the operator's signature.
    envelope = json.loads(host.sign(doc))
    forged = dict(json.loads(ota.encode_desired(doc)), allow_downgrade=True)
    envelope["payload"] = base64.b64encode(json.dumps(forged).encode()).decode()
    # A stranger's key, the release key (it signs packages, never intents), an altered
    # payload: each refused in turn.
    payloads = [host.sign(doc, keys.stranger), host.sign(doc, keys.release),
                json.dumps(envelope).encode()]
    for n, payload in enumerate(payloads, start=1):
        host.publish(DEVICE, payload)
        wait_until(lambda n=n: len(host.refusals(DEVICE, "untrusted_intent")) >= n, 60,
                   f"refusal {n}")
    messages = [e["message"] for e in host.refusals(DEVICE, "untrusted_intent")]
    assert "not trusted" in messages[0] and "not trusted" in messages[1]
    assert "does not match" in messages[2]
    assert host.serving(DEVICE)["version"] == "1.0.0"  # type: ignore[index]
    # The operator's own signature goes through.
    host.publish(DEVICE, host.sign(doc))
    assert host.outcome(DEVICE, doc.deployment)["kind"] == "update.succeeded"


def test_a_forged_device_document_cannot_hide_the_fleets(make_agent: Callable[..., Agent],
                                                         host: Host, attacker: Attacker,
                                                         packages: Packages) -> None:
    _started(make_agent, host, packages.digits1, "digits", "1.0.0")
    # The device's own level would win over the fleet's: the attacker parks junk there.
    attacker.publish(desired_topic(host.fleet, DEVICE), b'{"schema": "edgekit.desired/2"}',
                     retain=True)
    wait_until(lambda: host.refusals(DEVICE, "untrusted_intent"), 60, "the refusal")
    doc = host.document(packages.digits2, None)
    host.publish(None, host.sign(doc))
    assert host.outcome(DEVICE, doc.deployment)["kind"] == "update.succeeded"
    host.wait_serving(DEVICE, "digits", "2.0.0")


def test_a_document_for_another_device_or_fleet(make_agent: Callable[..., Agent], host: Host,
                                                packages: Packages) -> None:
    _started(make_agent, host, packages.digits1, "digits", "1.0.0")
    # Signed by the operator for d2: replayed on d1's topic.
    for_d2 = host.document(packages.digits2, ["d2"])
    host.publish(DEVICE, host.sign(for_d2))
    event = host.outcome(DEVICE, for_d2.deployment)
    assert event["reason"] == "not_for_device", event
    # Signed for another fleet: moved onto this fleet's topic.
    elsewhere = ota.make_desired(**{**_args(for_d2), "fleet": "other-fleet", "devices": None,
                                    "deployment": ota.new_deployment_id()})
    host.publish(None, host.sign(elsewhere))
    event = host.outcome(DEVICE, elsewhere.deployment)
    assert event["reason"] == "not_for_device", event
    assert host.serving(DEVICE)["version"] == "1.0.0"  # type: ignore[index]


def test_a_name_change_does_not_bypass_the_version_floor(make_agent: Callable[..., Agent],
                                                         host: Host,
                                                         packages: Packages) -> None:
    # Issue item 3: on digits 2.0.0, a signed `other 0.0.1` was accepted, then
    # `digits 1.0.0` without any rollback instruction.
    _started(make_agent, host, packages.digits2, "digits", "2.0.0")
    rename = host.document(packages.other, [DEVICE])
    host.publish(DEVICE, host.sign(rename))
    event = host.outcome(DEVICE, rename.deployment)
    assert (event["kind"], event["reason"]) == ("update.failed", "renamed"), event
    down = host.document(packages.digits1, [DEVICE])
    host.publish(DEVICE, host.sign(down))
    event = host.outcome(DEVICE, down.deployment)
    assert (event["kind"], event["reason"]) == ("update.failed", "older_version"), event
    assert host.serving(DEVICE)["version"] == "2.0.0"  # type: ignore[index]
    # Allowed explicitly in the signed document, the rename goes through; the floor is
    # now other 0.0.1, so digits 1.0.0 is still a (refused) change of name.
    allowed = host.document(packages.other, [DEVICE], allow_rename=True)
    host.publish(DEVICE, host.sign(allowed))
    assert host.outcome(DEVICE, allowed.deployment)["kind"] == "update.succeeded"
    host.wait_serving(DEVICE, "other", "0.0.1")
    again = host.document(packages.digits1, [DEVICE])
    host.publish(DEVICE, host.sign(again))
    assert host.outcome(DEVICE, again.deployment)["reason"] == "renamed"


def test_expired_documents_and_replays_survive_a_restart(make_agent: Callable[..., Agent],
                                                         host: Host,
                                                         packages: Packages) -> None:
    agent = _started(make_agent, host, packages.digits2, "digits", "2.0.0")
    two_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    # A rollback signed two days ago (a downgrade lives a day): captured, published now.
    stale = host.document(packages.digits1, [DEVICE], allow_downgrade=True,
                          issued=two_days_ago)
    host.publish(DEVICE, host.sign(stale))
    event = host.outcome(DEVICE, stale.deployment)
    assert event["reason"] == "expired", event
    # A rollback signed a minute ago (still valid), then a newer deployment the device
    # carries out.
    captured = host.document(packages.digits2, [DEVICE], allow_downgrade=True,
                             issued=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=60))
    newer = host.document(packages.digits3, [DEVICE])
    host.publish(DEVICE, host.sign(newer))
    assert host.outcome(DEVICE, newer.deployment)["kind"] == "update.succeeded"
    # After a restart, the captured (older) document is still a replay.
    agent.stop()
    host.publish(DEVICE, host.sign(captured))
    agent.start()
    event = host.outcome(DEVICE, captured.deployment)
    assert event["reason"] == "replayed", event
    host.wait_serving(DEVICE, "digits", "3.0.0")
    trust = json.loads((agent.workdir / "models" / "state" / "ota" / "trust.json").read_text())
    assert trust["floor"] == {"name": "digits", "version": "3.0.0"}
    assert trust["high_water"] == newer.issued


def test_refusals_are_reported_once_and_rate_limited(make_agent: Callable[..., Agent],
                                                     host: Host, attacker: Attacker,
                                                     packages: Packages) -> None:
    agent = _started(make_agent, host, packages.digits1, "digits", "1.0.0")
    topic = desired_topic(host.fleet, DEVICE)
    for i in range(20):
        attacker.publish(topic, json.dumps({"forged": i}).encode(), retain=True)
    wait_until(lambda: "ignored a desired document" in agent.log(), 60, "the refusals")
    # The last one stays retained and is looked at again and again: still reported once.
    marker = host.document(packages.digits2, None)
    host.publish(None, host.sign(marker))
    assert host.outcome(DEVICE, marker.deployment)["kind"] == "update.succeeded"
    assert 1 <= len(host.refusals(DEVICE, "untrusted_intent")) <= 6
    assert host.serving(DEVICE)["version"] == "2.0.0"  # type: ignore[index]


def test_insecure_lab_setting_is_off_by_default_and_loud(make_agent: Callable[..., Agent],
                                                         host: Host,
                                                         packages: Packages) -> None:
    agent = make_agent(DEVICE, packages.digits1, ["--allow-unsigned-intents"])
    host.wait_serving(DEVICE, "digits", "1.0.0")
    doc = host.document(packages.digits2, [DEVICE])
    host.publish(DEVICE, ota.encode_desired(doc))
    assert host.outcome(DEVICE, doc.deployment)["kind"] == "update.succeeded"
    assert "INSECURE" in agent.log()


def _args(doc: ota.DesiredDocument) -> dict[str, Any]:
    model = doc.model
    mqtt = doc.sources.mqtt
    return {"deployment": doc.deployment, "fleet": doc.fleet, "devices": doc.devices,
            "name": model.name, "version": model.version, "sha256": model.sha256,
            "size": model.size, "key_id": model.key_id,
            "request_topic": mqtt.request_topic if mqtt else None,
            "probation": doc.probation}
