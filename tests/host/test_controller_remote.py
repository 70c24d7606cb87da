"""The remote side of the controller protocol refuses what does not decode, over a real broker.

A stand-in controller (a plain paho client: no database or registry is needed to answer)
puts garbage, oversize and wrong-schema payloads on the topics ``submit_request``,
``follow_rollout`` and ``find_controllers`` read, before the one right document. Each bad
payload must be logged and skipped, never raised, and the right document still taken.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgekit.host.controller.remote import (
    RemoteRolloutError,
    find_controllers,
    follow_rollout,
    submit_request,
)
from edgekit.host.mqtt_client import HostClient
from edgekit.protocol import encode
from edgekit.protocol.controller import (
    ReplyError,
    RolloutModel,
    RolloutReply,
    RolloutRequest,
    RolloutStatePayload,
    make_presence,
    make_rollout_request,
    parse_rollout_request,
    presence_topic,
    rollout_request_topic,
    rollout_state_topic,
)
from edgekit.protocol.signed import open_sealed
from edgekit.signing import generate_keypair, load_private_key, load_public_key

from ._controller_sim import broker, wait_until

__all__ = ["broker"]  # the fixture, imported for pytest

# Each is refused by the decoder: not JSON, not an object, another schema, no schema, a
# field of the wrong type, and one over the size cap of the document.
GARBAGE = [
    b"\xff not json",
    b"[1, 2, 3]",
    b'{"schema": "edgekit.metrics/1", "request_id": "x"}',
    b'{"request_id": "00000000", "ok": true}',
    b'{"schema": "edgekit.rollout-reply/1", "request_id": "00000000", "ok": "yes"}',
    b'{"schema": "edgekit.rollout-state/1", "rollout": "1"}',
    b'{"schema": "edgekit.controller/1", "id": 7, "fleets": []}',
]
OVERSIZE = b'{"schema": "edgekit.rollout-reply/1", "pad": "' + b"x" * (17 << 20) + b'"}'


@pytest.fixture
def paho_client(broker: Any) -> Iterator[mqtt.Client]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    yield client
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def host(broker: Any) -> Iterator[HostClient]:
    client = HostClient(broker.url).connect()
    yield client
    client.close()


def _subscribe(client: mqtt.Client, topic: str) -> None:
    """Subscribe and return once the broker acknowledged it: the request is published by
    another connection, which the broker may serve first."""
    acked = threading.Event()
    client.on_subscribe = lambda *_args: acked.set()
    client.subscribe(topic, qos=1)
    assert acked.wait(10), f"no SUBACK for {topic}"


def _keys(tmp_path: Any) -> tuple[Any, Any]:
    pair = generate_keypair(tmp_path / "operator")
    return load_private_key(pair.private_path), load_public_key(pair.public_path)


def test_submit_request_skips_bad_replies(host: HostClient, paho_client: mqtt.Client,
                                          tmp_path: Any, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    fleet = f"rem-{secrets.token_hex(3)}"
    key, public = _keys(tmp_path)
    request = make_rollout_request(fleet, secrets.token_hex(8), name="digits", version="1.0")
    seen: list[RolloutRequest] = []

    def answer(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        opened = open_sealed(msg.payload, [public], what="rollout request")
        seen.append(parse_rollout_request(opened.payload))  # signed by the key the test holds
        reply_to = request.reply_to
        for bad in [*GARBAGE, OVERSIZE,
                    encode(RolloutReply(request_id="f" * 16, ok=True, rollout={"id": 9}))]:
            paho_client.publish(reply_to, bad, qos=1)
        paho_client.publish(reply_to, encode(RolloutReply(
            request_id=request.request_id, ok=True, rollout={"id": 3, "targets": []})), qos=1)

    paho_client.message_callback_add(rollout_request_topic(fleet), answer)
    _subscribe(paho_client, rollout_request_topic(fleet))
    with caplog.at_level("WARNING", logger="edgekit.controller.remote"):
        rollout = submit_request(host, request, key, timeout=30)
    assert rollout == {"id": 3, "targets": []}
    assert seen == [request]
    refused = [r.getMessage() for r in caplog.records if "ignored a message" in r.getMessage()]
    assert len(refused) == len(GARBAGE) + 1, refused  # the other request's reply is not one
    assert any("over the" in m for m in refused)


def test_submit_request_raises_the_controllers_refusal(host: HostClient,
                                                       paho_client: mqtt.Client,
                                                       tmp_path: Any) -> None:
    fleet = f"rem-{secrets.token_hex(3)}"
    key, _public = _keys(tmp_path)
    request = make_rollout_request(fleet, secrets.token_hex(8), name="digits", version="1.0")

    def answer(_c: Any, _u: Any, _msg: mqtt.MQTTMessage) -> None:
        paho_client.publish(request.reply_to, encode(RolloutReply(
            request_id=request.request_id, ok=False,
            error=ReplyError(code="UsageError", message="no such model", hint="push it"))),
            qos=1)

    paho_client.message_callback_add(rollout_request_topic(fleet), answer)
    _subscribe(paho_client, rollout_request_topic(fleet))
    with pytest.raises(RemoteRolloutError) as caught:
        submit_request(host, request, key, timeout=30)
    assert caught.value.code == "UsageError" and caught.value.exit_code == 2
    assert "no such model" in caught.value.message and caught.value.hint == "push it"


def test_follow_rollout_skips_bad_states(host: HostClient, paho_client: mqtt.Client,
                                         caplog: pytest.LogCaptureFixture) -> None:
    fleet = f"rem-{secrets.token_hex(3)}"
    topic = rollout_state_topic(fleet)
    states: list[RolloutStatePayload] = []

    def state(rollout: int, name: str) -> bytes:
        return encode(RolloutStatePayload(rollout=rollout, fleet=fleet, state=name, wave=1,
                                          model=RolloutModel(name="digits", version="1.0"),
                                          counts={"succeeded": 2}, reason=None, ts=1.0))

    def publish() -> None:
        wait_until(lambda: host.paho.is_connected(), 10)
        for bad in [*GARBAGE, OVERSIZE, state(8, "succeeded"), state(7, "running")]:
            paho_client.publish(topic, bad, qos=1).wait_for_publish(10)
        paho_client.publish(topic, state(7, "succeeded"), qos=1)

    with caplog.at_level("WARNING", logger="edgekit.controller.remote"):
        sender = threading.Timer(0.5, publish)
        sender.start()
        final = follow_rollout(host, fleet, 7, timeout=30, on_change=states.append)
        sender.join()
    assert final is not None and (final.rollout, final.state) == (7, "succeeded")
    assert [s.state for s in states] == ["running", "succeeded"]
    refused = [r.getMessage() for r in caplog.records if "ignored a message" in r.getMessage()]
    assert len(refused) == len(GARBAGE) + 1, refused


def test_find_controllers_skips_bad_presence(host: HostClient, paho_client: mqtt.Client,
                                             caplog: pytest.LogCaptureFixture) -> None:
    fleet = f"rem-{secrets.token_hex(3)}"
    good = f"ctl-{secrets.token_hex(3)}"
    bad_ids = [f"bad-{secrets.token_hex(3)}" for _ in GARBAGE]
    published = [paho_client.publish(presence_topic(b), payload, qos=1, retain=True)
                 for b, payload in zip(bad_ids, GARBAGE, strict=True)]
    published.append(paho_client.publish(presence_topic(good), encode(
        make_presence(good, [fleet], 1.0)), qos=1, retain=True))
    for info in published:
        info.wait_for_publish(10)
    try:
        with caplog.at_level("WARNING", logger="edgekit.controller.remote"):
            found = find_controllers(host, fleet)
        assert [p.id for p in found] == [good]
        for bad in bad_ids:
            assert bad in caplog.text
    finally:
        for cid in [*bad_ids, good]:
            paho_client.publish(presence_topic(cid), b"", qos=1, retain=True).wait_for_publish(10)
