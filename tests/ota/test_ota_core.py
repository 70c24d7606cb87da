"""The shared OTA core: desired documents and their signed envelope, chunk framing,
event kinds, topics, Range parsing and the deployment tracker (no broker needed)."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import struct
from typing import Any

import msgspec
import pytest

import edgekit.protocol.ota as ota
from edgekit.errors import ProtocolError, SignatureError, UsageError
from edgekit.host.ota._http import parse_range
from edgekit.host.ota.tracker import DeploymentTracker, Outcome
from edgekit.protocol import (
    DeviceState,
    EventPayload,
    HardwareInfo,
    ModelRef,
    StatusPayload,
    decode,
    encode,
)
from edgekit.protocol.signed import SIGNED_MAX_BYTES, open_sealed
from edgekit.signing import generate_keypair, load_private_key, load_public_key

SHA = hashlib.sha256(b"package").hexdigest()
OTHER_SHA = hashlib.sha256(b"other").hexdigest()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("keys")
    good = generate_keypair(root / "good")
    bad = generate_keypair(root / "bad")
    return {"key": load_private_key(good.private_path), "pub": load_public_key(good.public_path),
            "other_key": load_private_key(bad.private_path),
            "other_pub": load_public_key(bad.public_path), "key_id": good.key_id}


def desired(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.to_builtins(ota.make_desired(
        deployment="d1", fleet="f1", name="digits", version="2.0.0", sha256=SHA, size=1000,
        key_id="0123456789abcdef", request_topic=ota.artifact_request_topic("f1", SHA)))
    doc.update(overrides)
    return doc


# --------------------------------------------------------------------------- desired


def test_desired_round_trip_fills_defaults() -> None:
    doc = desired()
    parsed = ota.parse_desired(ota.encode_desired(ota.parse_desired(doc)))
    assert msgspec.to_builtins(parsed) == doc
    assert parsed.probation == ota.DEFAULT_PROBATION
    optional = ("probation", "allow_breaking", "latency_budget_ms", "allow_downgrade",
                "allow_rename", "revert")
    minimal = {k: v for k, v in doc.items() if k not in optional}
    filled = ota.parse_desired(json.dumps(minimal).encode())
    assert (filled.allow_breaking, filled.allow_downgrade, filled.allow_rename,
            filled.revert) == (False, False, False, False)
    assert filled.probation.requests == ota.DEFAULT_PROBATION.requests


def _set(path: str, value: Any) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = doc
        for key in parents:
            target = target[key]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return mutate


_DELETE = object()

BAD_DOCUMENTS = [
    (_set("schema", "edgekit.desired/1"), "desired.schema"),
    (_set("fleet", _DELETE), "desired.fleet: missing"),
    (_set("fleet", "a/b"), "desired.fleet"),
    (_set("devices", ["ok", "no/slash"]), "desired.devices"),
    (_set("expires", _DELETE), "desired.expires: missing"),
    (_set("expires", "2000-01-01T00:00:00Z"), "desired.expires"),
    (_set("expires", "2099-01-01T00:00:00Z"), "desired.expires"),
    (_set("allow_downgrade", "yes"), "desired.allow_downgrade"),
    (_set("revert", 1), "desired.revert"),
    (_set("deployment", "bad id/with slash"), "desired.deployment"),
    (_set("deployment", _DELETE), "desired.deployment: missing"),
    (_set("issued", "yesterday"), "desired.issued"),
    (_set("issued", "2026-01-01T00:00:00"), "desired.issued"),
    (_set("model", "digits"), "desired.model: expected an object"),
    (_set("model.name", ""), "desired.model.name"),
    (_set("model.version", "v2"), "desired.model.version"),
    (_set("model.sha256", "ABC"), "desired.model.sha256"),
    (_set("model.sha256", None), "desired.model.sha256"),
    (_set("model.size", 0), "desired.model.size"),
    (_set("model.size", ota.MAX_ARTIFACT_BYTES + 1), "desired.model.size"),
    (_set("model.size", "1000"), "desired.model.size: expected an integer"),
    (_set("model.size", True), "desired.model.size: expected an integer"),
    (_set("model.key_id", "xyz"), "desired.model.key_id"),
    (_set("sources", {"mqtt": None, "url": None}), "desired.sources"),
    (_set("sources.url", "ftp://host/x.edgepkg"), "desired.sources.url"),
    (_set("sources.mqtt", {"request_topic": "edgekit/v1/+/x"}), "desired.sources.mqtt.request_topic"),
    (_set("sources.mqtt", {"request_topic": "t", "chunk_size": 10}), "desired.sources.mqtt.chunk_size"),
    (_set("sources.mqtt", {"request_topic": "edgekit/v1/f1/dev-1/status"}),
     "desired.sources.mqtt.request_topic"),
    (_set("allow_breaking", "yes"), "desired.allow_breaking"),
    (_set("latency_budget_ms", -1), "desired.latency_budget_ms"),
    (_set("probation", {"requests": -1}), "desired.probation.requests"),
    (_set("probation", {"max_error_rate": 1.5}), "desired.probation.max_error_rate"),
    (_set("probation", {"seconds": float("nan")}), "desired.probation.seconds"),
    (_set("probation", {"max_latency_ms": "fast"}), "desired.probation.max_latency_ms"),
]


@pytest.mark.parametrize(("mutate", "key"), BAD_DOCUMENTS,
                         ids=[key for _, key in BAD_DOCUMENTS])
def test_invalid_desired_names_the_key(mutate: Any, key: str) -> None:
    doc = copy.deepcopy(desired())
    mutate(doc)
    with pytest.raises(ProtocolError) as err:
        ota.parse_desired(json.dumps(doc).encode())
    assert key in err.value.message


@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]", b"\xff\xfe", b"null", b""])
def test_desired_that_is_not_a_json_object(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        ota.parse_desired(payload)


def test_unknown_keys_are_ignored() -> None:
    doc = desired()
    doc["added_later"] = {"x": 1}
    parsed = ota.parse_desired(json.dumps(doc).encode())
    assert "added_later" not in msgspec.to_builtins(parsed)


def test_deployment_ids_are_valid_and_distinct() -> None:
    ids = {ota.new_deployment_id() for _ in range(50)}
    assert len(ids) == 50
    for d in ids:
        assert ota.parse_desired(json.dumps(desired(deployment=d))).deployment == d


# --------------------------------------------------------------------------- signed


def test_sealed_desired_opens_only_with_the_signer(keys: dict[str, Any]) -> None:
    doc = ota.parse_desired(desired())
    sealed = ota.seal_desired(doc, keys["key"])
    opened = open_sealed(sealed, [keys["other_pub"], keys["pub"]])
    assert opened.key_id == keys["key_id"]
    assert ota.parse_desired(opened.payload) == doc
    with pytest.raises(SignatureError, match="not trusted"):
        open_sealed(sealed, [keys["other_pub"]])
    with pytest.raises(SignatureError, match="no trusted key"):
        open_sealed(sealed, [])


def test_an_altered_payload_fails_the_signature(keys: dict[str, Any]) -> None:
    envelope = json.loads(ota.seal_desired(ota.parse_desired(desired()), keys["key"]))
    other = dict(desired(), model={**desired()["model"], "version": "0.0.1"})
    envelope["payload"] = base64.b64encode(json.dumps(other).encode()).decode()
    with pytest.raises(SignatureError, match="does not match"):
        open_sealed(json.dumps(envelope).encode(), [keys["pub"]])


@pytest.mark.parametrize("payload", [b"{}", b"[]", b"not json",
                                     b'{"schema":"edgekit.signed/1","payload":"!!",'
                                     b'"key_id":"0123456789abcdef","signature":"AA=="}',
                                     b'{"schema":"edgekit.signed/1","payload":"AA==",'
                                     b'"key_id":"../../etc","signature":"AA=="}'])
def test_malformed_envelopes_are_protocol_errors(keys: dict[str, Any], payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        open_sealed(payload, [keys["pub"]])


def test_envelope_size_is_checked_before_parsing(keys: dict[str, Any]) -> None:
    huge = b'{"schema":"edgekit.signed/1","payload":"' + b"A" * SIGNED_MAX_BYTES + b'"}'
    with pytest.raises(ProtocolError, match="over the"):
        open_sealed(huge, [keys["pub"]])


def test_downgrade_and_revert_rules() -> None:
    kept = ota.make_desired(deployment="d2", fleet="f1", name="digits", version="1.0.0",
                            sha256=None, size=None, allow_downgrade=True)
    assert kept.model.sha256 is None and kept.sources.mqtt is None
    life = ota.parse_time(kept.expires, "x") - ota.parse_time(kept.issued, "x")
    assert life.total_seconds() == ota.ROLLBACK_TTL_S
    with pytest.raises(ProtocolError, match="desired.model.sha256"):
        ota.make_desired(deployment="d2", fleet="f1", name="digits", version="1.0.0",
                         sha256=None, size=None)
    with pytest.raises(ProtocolError, match="desired.model.sha256"):
        ota.make_desired(deployment="d2", fleet="f1", name="digits", version="1.0.0",
                         sha256=None, size=None, revert=True, allow_downgrade=True)
    revert = ota.make_desired(deployment="d2", fleet="f1", devices=["b", "a", "a"],
                              name="digits", version="2.0.0", sha256=SHA, size=5, revert=True)
    assert revert.devices == ["a", "b"] and revert.sources.mqtt is None


# --------------------------------------------------------------------------- chunks


def _request(**kw: Any) -> ota.ChunkRequest:
    args: dict[str, Any] = {"request_id": "r1", "sha256": SHA, "offset": 100, "length": 64,
                            "reply_to": "edgekit/v1/f1/dev-1/reply/ota"}
    args.update(kw)
    return ota.make_request(**args)


def test_chunk_round_trip() -> None:
    request = _request()
    data = bytes(range(64))
    chunk = ota.decode_chunk(ota.encode_chunk(request, data, total=1000))
    assert chunk.data == data and chunk.error is None
    assert chunk.header.total == 1000 and chunk.header.offset == 100
    chunk.check_answers(request)
    assert ota.parse_request(ota.encode_request(request)) == request


def test_corrupted_chunk_is_detected() -> None:
    payload = bytearray(ota.encode_chunk(_request(), b"x" * 64, total=1000))
    payload[-10] ^= 0x01
    with pytest.raises(ProtocolError, match="does not match its sha256"):
        ota.decode_chunk(bytes(payload))
    # The id is still readable, so the device can ask again at once.
    assert ota.peek_request_id(bytes(payload)) == "r1"
    assert ota.peek_request_id(b"\x00\x00\x00\x05{nope") is None
    assert ota.peek_request_id(b"\x00") is None


@pytest.mark.parametrize("cut", [1, 3, 10, 50])
def test_truncated_chunk_is_detected(cut: int) -> None:
    payload = ota.encode_chunk(_request(), b"y" * 64, total=1000)
    with pytest.raises(ProtocolError):
        ota.decode_chunk(payload[:-cut] if cut < 64 else payload[:cut])


def test_bad_frames() -> None:
    with pytest.raises(ProtocolError, match="too short"):
        ota.decode_chunk(b"\x00\x01")
    with pytest.raises(ProtocolError, match="does not fit"):
        ota.decode_chunk(struct.pack(">I", 10_000) + b"{}")
    with pytest.raises(ProtocolError, match="not valid JSON"):
        ota.decode_chunk(struct.pack(">I", 5) + b"{nope")
    head = json.dumps({"schema": "edgekit.chunk/1", "request_id": "r", "sha256": SHA,
                       "offset": 0, "length": 4, "total": 4}).encode()
    with pytest.raises(ProtocolError, match="chunk.chunk_sha256: missing"):
        ota.decode_chunk(struct.pack(">I", len(head)) + head + b"abcd")


def test_error_reply_and_mismatched_replies() -> None:
    chunk = ota.decode_chunk(ota.encode_chunk_error("r1", SHA, 5, ota.ChunkErrorCode.NOT_FOUND,
                                                    "no such artifact"))
    assert chunk.error == ota.ChunkErrorInfo(code="not_found", message="no such artifact")
    assert chunk.data == b""
    request = _request()
    reply = ota.decode_chunk(ota.encode_chunk(request, b"z" * 64, total=1000))
    for other, words in [(_request(request_id="r2"), "expected 'r2'"),
                         (_request(offset=0), "the request asked for"),
                         (_request(length=32), "at most 32")]:
        with pytest.raises(ProtocolError, match=words):
            reply.check_answers(other)


@pytest.mark.parametrize(("field", "value", "key"), [
    ("length", 0, "chunk_request.length"), ("length", ota.MAX_CHUNK_BYTES + 1, "chunk_request.length"),
    ("offset", -1, "chunk_request.offset"), ("sha256", "abc", "chunk_request.sha256"),
    ("reply_to", "a/+/b", "chunk_request.reply_to"), ("request_id", "", "chunk_request.request_id"),
    ("schema", "edgekit.chunk-request/9", "chunk_request.schema"),
])
def test_invalid_chunk_request_names_the_key(field: str, value: Any, key: str) -> None:
    doc = msgspec.to_builtins(_request())
    doc[field] = value
    with pytest.raises(ProtocolError, match=key.replace(".", r"\.")):
        ota.parse_request(json.dumps(doc))


# --------------------------------------------------------------------------- events, topics


def test_event_kinds_and_steps() -> None:
    for step in ota.UpdateStep:
        assert ota.step_of(ota.event_kind(step)) is step
    assert ota.step_of("model.activated") is None
    assert ota.step_of("update.exploded") is None
    assert ota.step_of(None) is None
    assert ota.FINAL_STEPS == {ota.UpdateStep.SUCCEEDED, ota.UpdateStep.FAILED,
                               ota.UpdateStep.ROLLED_BACK, ota.UpdateStep.SHADOWED}


def test_topics() -> None:
    assert ota.desired_topic("f1") == "edgekit/v1/f1/_fleet/desired"
    assert ota.desired_topic("f1", "dev-1") == "edgekit/v1/f1/dev-1/desired"
    assert ota.artifact_request_topic("f1", SHA) == f"edgekit/v1/f1/_artifacts/get/{SHA}"
    assert ota.artifact_subscription("f1", SHA, "g") == f"$share/g/edgekit/v1/f1/_artifacts/get/{SHA}"
    assert ota.artifact_subscription("+") == "edgekit/v1/+/_artifacts/get/+"
    assert ota.ota_reply_topic("f1", "dev-1") == "edgekit/v1/f1/dev-1/reply/ota"
    with pytest.raises(UsageError):
        ota.shared("x", "bad/group")


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("bytes=0-9", (0, 10)), ("bytes=90-", (90, 100)), ("bytes=-10", (90, 100)),
    ("bytes=95-200", (95, 100)), ("bytes=100-", False), ("bytes=-0", False),
    ("bytes=5-2", False), ("bytes=0-1,5-6", None), ("items=0-1", None), ("bytes=-", None),
])
def test_range_header(header: str | None, expected: Any) -> None:
    assert parse_range(header, 100) == expected


# --------------------------------------------------------------------------- tracker


def _status(device: str, state: str, session: int, sha: str | None = None,
            update: ota.UpdateStatus | dict[str, Any] | None = None) -> bytes:
    """A status payload as an agent encodes it (``update`` a dict: a raw one, as a broken
    or forged sender could put on the wire)."""
    model = ModelRef(name="digits", version="1.0.0", sha256=sha) if sha else None
    return encode(StatusPayload(
        state=DeviceState(state), device=device, fleet="f1", session=session, ts=1.0,
        agent_version="test", runtimes=[], hardware=HardwareInfo(
            hostname="h", system="Linux", machine="x86_64", release="6", os="Debian",
            board=None, cpu_count=2, memory_total_bytes=1 << 30, python="3.11"),
        model=model, http=None, started=1.0, update=update))  # type: ignore[arg-type]


def _event(device: str, step: str, deployment: str = "d1", reason: str | None = None,
           percent: float | None = None) -> bytes:
    """An ``update.<step>`` event as an agent encodes it."""
    data = ota.UpdateEventData(
        deployment=deployment, step=ota.UpdateStep(step), serving=None,
        model=ota.UpdateModel(name="digits", version="2.0.0", sha256=SHA),
        progress=None if percent is None else ota.UpdateProgress(bytes=1, total=2,
                                                                 percent=percent))
    return encode(EventPayload(device=device, fleet="f1", seq=1, ts=1.0, kind=f"update.{step}",
                               message=step, reason=reason, data=data.as_data()))


def test_tracker_fleet_wide_targets_and_outcomes() -> None:
    doc = ota.parse_desired(json.dumps(desired()))
    tracker = DeploymentTracker("d1", "f1", doc.model)
    tracker.observe_status("a", _status("a", "online", 3, OTHER_SHA))
    tracker.observe_status("b", _status("b", "online", 1, OTHER_SHA))
    tracker.observe_status("c", _status("c", "offline", 2, OTHER_SHA))
    tracker.observe_status("d", _status("d", "online", 1, OTHER_SHA))
    tracker.observe_desired("d", True)
    tracker.freeze()
    assert tracker.targets == {"a", "b"}
    assert "reconnects" in tracker.devices["c"].note
    assert "own device-level" in tracker.devices["d"].note
    # A late last will from an older session changes nothing.
    assert not tracker.observe_status("a", _status("a", "offline", 2, OTHER_SHA))
    assert tracker.devices["a"].state == "online"
    assert tracker.observe_event("a", _event("a", "downloading", percent=40.0))
    assert tracker.devices["a"].percent == 40.0
    assert not tracker.observe_event("a", _event("a", "downloading", deployment="d0"))
    tracker.observe_event("a", _event("a", "succeeded"))
    tracker.observe_event("b", _event("b", "rolled_back", reason="nonfinite_output"))
    assert tracker.finished()
    # A device that comes online later joins the targets.
    tracker.observe_status("c", _status("c", "online", 3, OTHER_SHA))
    assert "c" in tracker.targets and not tracker.finished()
    tracker.observe_status("c", _status("c", "online", 3, SHA, update=ota.UpdateStatus(
        deployment="d1", step="failed", reason="bad_signature")))
    result = tracker.result(1.0)
    assert not result.ok
    assert result.counts() == {"succeeded": 1, "rolled_back": 1, "failed": 1}
    assert result.targets["b"].reason == "nonfinite_output"
    assert set(result.not_waited) == {"d"}
    assert result.to_dict()["targets"]["c"]["reason"] == "bad_signature"


def test_tracker_named_devices_time_out() -> None:
    doc = ota.parse_desired(json.dumps(desired()))
    tracker = DeploymentTracker("d1", "f1", doc.model, devices=["x", "y"])
    tracker.observe_event("x", _event("x", "succeeded"))
    tracker.observe_event("z", _event("z", "succeeded"))  # reports on this deployment: a target
    assert not tracker.finished()
    tracker.expire()
    result = tracker.result(2.0)
    assert result.targets["y"].outcome is Outcome.TIMED_OUT
    assert result.targets["x"].outcome is Outcome.SUCCEEDED
    assert not result.ok


def _bad_event(device: str, kind: str, data: Any) -> bytes:
    return encode(EventPayload(device=device, fleet="f1", seq=1, ts=1.0, kind=kind, data=data))


@pytest.mark.parametrize(("kind", "payload", "why"), [
    ("status", b"not json", "not valid JSON"),
    ("status", b"[1, 2]", "does not fit"),
    ("status", b'{"schema": "edgekit.status/1", "device": "a"}', "does not fit"),
    ("status", b'{"schema": "edgekit.metrics/1"}', "does not fit"),
    ("status", b'{"schema": "edgekit.status/1", "pad": "' + b"x" * 70_000 + b'"}',
     "over the 65536-byte limit"),
    ("status", _status("b", "online", 9, SHA), "another device"),
    ("status", _status("a", "online", 9, SHA, update={"deployment": "d1", "step": 3}),
     "$.update.step"),
    ("status", _status("a", "online", 9, SHA, update={"step": "failed"}),
     "missing required field `deployment` - at `$.update`"),
    ("events", b"\xff\xfe", "not valid JSON"),
    ("events", _event("b", "succeeded"), "another device"),
    ("events", _bad_event("a", "update.succeeded", None), "update.succeeded event data"),
    ("events", _bad_event("a", "update.succeeded", {"deployment": "d1", "step": "succeeded",
                                                    "model": None}), "serving"),
    ("events", _bad_event("a", "update.succeeded", {"deployment": "d1", "step": "failed",
                                                    "model": None, "serving": None}),
     "names step 'failed'"),
    ("events", _bad_event("a", "update.downloading", {
        "deployment": "d1", "step": "downloading", "model": None, "serving": None,
        "progress": {"bytes": "1", "total": 2, "percent": 50.0}}), "$.progress.bytes"),
])
def test_tracker_refuses_what_does_not_decode(kind: str, payload: bytes, why: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Garbage, oversize, wrong-schema and other-device payloads change nothing: each is
    logged with the reason and counted, never raised."""
    doc = ota.parse_desired(json.dumps(desired()))
    tracker = DeploymentTracker("d1", "f1", doc.model, devices=["a"])
    tracker.observe_status("a", _status("a", "online", 1, OTHER_SHA))
    before = tracker.devices["a"].to_dict()
    observe = tracker.observe_status if kind == "status" else tracker.observe_event
    with caplog.at_level("WARNING", logger="edgekit.deploy"):
        assert observe("a", payload) is False
    assert tracker.refused == {kind: 1}
    assert tracker.devices["a"].to_dict() == before
    assert set(tracker.devices) == {"a"}
    assert why in caplog.text, caplog.text
    # The tracker still follows the device afterwards.
    assert tracker.observe_event("a", _event("a", "succeeded"))
    assert tracker.devices["a"].outcome is Outcome.SUCCEEDED


def test_update_documents_round_trip() -> None:
    """What a sender builds with the typed classes is what a reader decodes."""
    data = ota.UpdateEventData(
        deployment="d1", step=ota.UpdateStep.DOWNLOADING, source="mqtt",
        model=ota.UpdateModel(name="digits", version="2.0.0", sha256=SHA),
        serving=ota.UpdateModel(name="digits", version="1.0.0", sha256=OTHER_SHA),
        progress=ota.UpdateProgress(bytes=5, total=10, percent=50.0), details={"n": 1})
    event = EventPayload(device="a", fleet="f1", seq=1, ts=1.0, kind="update.downloading",
                         data=data.as_data())
    assert ota.update_data(decode(encode(event), EventPayload)) == data
    assert ota.update_data(EventPayload(device="a", fleet="f1", seq=1, ts=1.0,
                                        kind="agent.started")) is None
    update = ota.UpdateStatus(deployment="d1", step="rolling_back", reason="slow",
                              model=ota.UpdateModel(name="digits", version="2.0.0"))
    assert decode(_status("a", "online", 1, SHA, update=update), StatusPayload).update == update
    assert decode(_status("a", "online", 1, SHA), StatusPayload).update is None


# --------------------------------------------------------------------------- packaging


def test_public_names_are_listed_and_exist() -> None:
    import device_agent.ota
    import edgekit.host.mqtt_client
    import edgekit.host.ota.deploy
    import edgekit.host.ota.server
    import edgekit.host.ota.store
    import edgekit.host.ota.tracker

    for module in (ota, edgekit.host.mqtt_client, edgekit.host.ota.deploy, edgekit.host.ota.server,
                   edgekit.host.ota.store, edgekit.host.ota.tracker, device_agent.ota):
        assert sorted(module.__all__) == sorted(set(module.__all__)), module.__name__
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name} is listed but missing"
    defined = {n for n, v in vars(ota).items() if not n.startswith("_")
               and getattr(v, "__module__", "").startswith("edgekit.protocol.ota")}
    assert defined <= set(ota.__all__), defined - set(ota.__all__)


def test_the_shared_core_stays_light() -> None:
    """The device imports edgekit.protocol.ota: no MQTT client, no host code comes with it."""
    import subprocess
    import sys

    script = "import sys, json, edgekit.protocol.ota; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True,
                                       text=True, check=True, timeout=120).stdout)
    assert not [m for m in loaded if m.split(".")[0] in ("paho", "click", "sqlalchemy")]
    assert not [m for m in loaded if m.startswith(("edgekit.host.mqtt_client", "edgekit.host.ota.server",
                                                   "edgekit.host.ota.deploy", "edgekit.host",
                                                   "edgekit.host.cli"))]
