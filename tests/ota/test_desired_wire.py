"""The desired document on the wire: the typed classes give the bytes the dict-built
documents gave (a signature over them is unchanged), and decoding refuses what it must with
a message that names the field."""

from __future__ import annotations

import datetime as dt
import json
import struct
from typing import Any

import msgspec
import pytest

import edgekit.protocol.ota as ota
from edgekit.errors import ProtocolError

SHA = "ab" * 32
BASE = "cd" * 32
ISSUED = dt.datetime(2026, 1, 31, 12, 0, 0, tzinfo=dt.UTC)
TOPIC = f"edgekit/v1/f1/_artifacts/get/{SHA}"

# Written by make_desired before the documents were msgspec Structs (a dict, encoded), for
# the same arguments as _full() and _minimal() below. Do not regenerate these from the code:
# they are what devices in the field have verified signatures over.
FULL_BYTES = (
    b'{"schema":"edgekit.desired/2","deployment":"d20260131T120000-3f2a1c",'
    b'"issued":"2026-01-31T12:00:00Z","expires":"2026-01-31T13:00:00Z","fleet":"f1",'
    b'"devices":["dev-a","dev-b"],"model":{"name":"digits","version":"1.1.0",'
    b'"sha256":"' + SHA.encode() + b'","size":48213,"key_id":"9f86d081884c7d65"},'
    b'"sources":{"mqtt":{"request_topic":"' + TOPIC.encode() + b'"},'
    b'"url":"https://h.example/a.edgepkg","deltas":[{"base_sha256":"' + BASE.encode()
    + b'","sha256":"' + b"ef" * 32 + b'","size":100,"request_topic":null,'
    b'"url":"http://h.example/d.delta"}]},"allow_breaking":true,"allow_downgrade":false,'
    b'"allow_rename":false,"revert":false,"latency_budget_ms":12.5,'
    b'"probation":{"requests":5,"seconds":10.0,"max_error_rate":0.1,'
    b'"max_nonfinite_rate":0.0,"max_latency_ms":50.0},'
    b'"transfer":{"max_kbps":256,"window":"01:00-05:00"}}')
MINIMAL_BYTES = (
    b'{"schema":"edgekit.desired/2","deployment":"d1","issued":"2026-01-31T12:00:00Z",'
    b'"expires":"2026-03-02T12:00:00Z","fleet":"f1","devices":null,'
    b'"model":{"name":"digits","version":"1.0.0","sha256":"' + SHA.encode()
    + b'","size":10,"key_id":null},"sources":{"mqtt":{"request_topic":"' + TOPIC.encode()
    + b'"},"url":null},"allow_breaking":false,"allow_downgrade":false,"allow_rename":false,'
    b'"revert":false,"latency_budget_ms":null,"probation":{"requests":20,"seconds":30.0,'
    b'"max_error_rate":0.0,"max_nonfinite_rate":0.0,"max_latency_ms":null}}')
KEPT_BYTES = (
    b'{"schema":"edgekit.desired/2","deployment":"d2","issued":"2026-01-31T12:00:00Z",'
    b'"expires":"2026-02-01T12:00:00Z","fleet":"f1","devices":null,'
    b'"model":{"name":"digits","version":"1.0.0","sha256":null,"size":null,"key_id":null},'
    b'"sources":{"mqtt":null,"url":null},"allow_breaking":false,"allow_downgrade":true,'
    b'"allow_rename":false,"revert":false,"latency_budget_ms":null,"probation":'
    b'{"requests":20,"seconds":30.0,"max_error_rate":0.0,"max_nonfinite_rate":0.0,'
    b'"max_latency_ms":null}}')
SHADOW_BYTES = (
    b'{"schema":"edgekit.desired-shadow/1","deployment":"d4","issued":"2026-01-31T12:00:00Z",'
    b'"expires":"2026-03-02T12:00:00Z","fleet":"f1","devices":null,'
    b'"model":{"name":"digits","version":"1.2.0","sha256":"' + SHA.encode()
    + b'","size":10,"key_id":null},"sources":{"mqtt":null,"url":"https://h.example/x"},'
    b'"allow_breaking":false,"allow_downgrade":false,"allow_rename":false,"revert":false,'
    b'"latency_budget_ms":null,"probation":{"requests":20,"seconds":30.0,'
    b'"max_error_rate":0.0,"max_nonfinite_rate":0.0,"max_latency_ms":null},'
    b'"shadow":{"requests":50,"sample":0.5,"seconds":60.0}}')
CHUNK_REQUEST_BYTES = (
    b'{"schema":"edgekit.chunk-request/1","request_id":"0123abcd","sha256":"' + SHA.encode()
    + b'","offset":0,"length":1024,"reply_to":"edgekit/v1/f1/_host/r/x"}')
CHUNK_ERROR_HEADER = (
    b'{"schema":"edgekit.chunk/1","request_id":"0123abcd","sha256":"' + SHA.encode()
    + b'","offset":0,"length":0,"total":0,"chunk_sha256":'
    b'"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",'
    b'"error":{"code":"not_found","message":"nope"}}')


def _full() -> ota.DesiredDocument:
    return ota.make_desired(
        deployment="d20260131T120000-3f2a1c", fleet="f1", name="digits", version="1.1.0",
        sha256=SHA, size=48213, devices=["dev-b", "dev-a"], key_id="9f86d081884c7d65",
        request_topic=TOPIC, url="https://h.example/a.edgepkg",
        deltas=[ota.DeltaSource(base_sha256=BASE, sha256="ef" * 32, size=100,
                                url="http://h.example/d.delta")],
        allow_breaking=True, latency_budget_ms=12.5,
        probation=ota.Probation(requests=5, seconds=10.0, max_error_rate=0.1,
                                max_latency_ms=50.0),
        issued=ISSUED, ttl_s=3600, transfer=ota.make_transfer(256, "01:00-05:00"))


def _minimal() -> ota.DesiredDocument:
    return ota.make_desired(deployment="d1", fleet="f1", name="digits", version="1.0.0",
                            sha256=SHA, size=10, request_topic=TOPIC, issued=ISSUED)


def test_the_encoder_gives_the_bytes_of_the_dict_built_documents() -> None:
    assert ota.encode_desired(_full()) == FULL_BYTES
    assert ota.encode_desired(_minimal()) == MINIMAL_BYTES
    kept = ota.make_desired(deployment="d2", fleet="f1", name="digits", version="1.0.0",
                            sha256=None, size=None, allow_downgrade=True, issued=ISSUED)
    assert ota.encode_desired(kept) == KEPT_BYTES
    shadow = ota.make_desired(deployment="d4", fleet="f1", name="digits", version="1.2.0",
                              sha256=SHA, size=10, url="https://h.example/x", issued=ISSUED,
                              shadow=ota.make_shadow(50, 0.5, 60.0))
    assert isinstance(shadow, ota.ShadowDesiredDocument)
    assert ota.encode_desired(shadow) == SHADOW_BYTES


@pytest.mark.parametrize("payload", [FULL_BYTES, MINIMAL_BYTES, KEPT_BYTES, SHADOW_BYTES])
def test_decode_then_encode_gives_the_same_bytes(payload: bytes) -> None:
    assert ota.encode_desired(ota.parse_desired(payload)) == payload


def test_chunk_payloads_keep_their_bytes() -> None:
    request = ota.make_request("0123abcd", SHA, 0, 1024, "edgekit/v1/f1/_host/r/x")
    assert ota.encode_request(request) == CHUNK_REQUEST_BYTES
    assert ota.parse_request(CHUNK_REQUEST_BYTES) == request
    reply = ota.encode_chunk_error("0123abcd", SHA, 0, ota.ChunkErrorCode.NOT_FOUND, "nope")
    assert reply == struct.pack(">I", len(CHUNK_ERROR_HEADER)) + CHUNK_ERROR_HEADER
    assert ota.decode_chunk(reply).error == ota.ChunkErrorInfo(code="not_found",
                                                                message="nope")


def test_decoded_fields_are_typed() -> None:
    doc = ota.parse_desired(FULL_BYTES)
    assert isinstance(doc.model, ota.DesiredModel) and doc.model.size == 48213
    assert isinstance(doc.sources.mqtt, ota.MqttSource)
    assert doc.sources.deltas == [ota.DeltaSource(base_sha256=BASE, sha256="ef" * 32,
                                                  size=100, url="http://h.example/d.delta")]
    assert doc.probation == ota.Probation(requests=5, seconds=10.0, max_error_rate=0.1,
                                          max_latency_ms=50.0)
    assert doc.transfer == ota.Transfer(max_kbps=256, window="01:00-05:00")
    minimal = ota.parse_desired(MINIMAL_BYTES)
    assert not minimal.transfer and not minimal.sources.deltas
    with pytest.raises(AttributeError):
        minimal.fleet = "f2"  # type: ignore[misc]  # frozen


def _with(path: str, value: Any) -> bytes:
    doc = json.loads(MINIMAL_BYTES)
    *parents, last = path.split(".")
    target = doc
    for key in parents:
        target = target[key]
    target[last] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("payload", "message"), [
    # a wrong type
    (_with("model.size", "10"), "desired.model.size: expected an integer or null, found a"
                                " string"),
    (_with("allow_breaking", 1), "desired.allow_breaking: expected true or false"),
    (_with("sources.mqtt.request_topic", 7), "desired.sources.mqtt.request_topic: expected"),
    (_with("probation", []), "desired.probation: expected an object, found an array"),
    # an out-of-bound value
    (_with("model.size", 0), "desired.model.size: Expected `int` >= 1"),
    (_with("model.size", ota.MAX_ARTIFACT_BYTES + 1), "desired.model.size: Expected `int` <="),
    (_with("probation.max_error_rate", 1.5), "desired.probation.max_error_rate"),
    (_with("probation.seconds", float("nan")), "desired.probation.seconds"),
    (_with("model.name", "x" * 257), "desired.model.name: Expected `str` of length <= 256"),
    (_with("fleet", "a/b"), "desired.fleet: Expected `str` matching regex"),
    (_with("model.key_id", "XYZ"), "desired.model.key_id"),
    (_with("devices", ["ok", "no/slash"]), "desired.devices[1]"),
    (_with("transfer", {"max_kbps": 0}), "desired.transfer.max_kbps: Expected `int` >= 1"),
    (_with("transfer", {"window": "05:00-05:00"}), "desired.transfer.window"),
    # a field missing, the schema of another document
    (_with("model", {"name": "digits", "version": "1.0.0", "size": 10}),
     "desired.model.sha256: missing"),
    (_with("schema", "edgekit.desired/3"), "desired.schema: Invalid value"),
    # the rules across fields
    (_with("model.version", "v2"), "desired.model.version"),
    (_with("expires", "2020-01-01T00:00:00Z"), "desired.expires"),
])
def test_decode_refuses_with_the_field_named(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as err:
        ota.parse_desired(payload)
    assert err.value.message.startswith(message), err.value.message


def test_an_oversize_document_is_refused_before_it_is_parsed() -> None:
    doc = json.loads(MINIMAL_BYTES)
    doc["padding"] = "x" * ota.DesiredDocument.max_bytes
    with pytest.raises(ProtocolError, match=r"^edgekit\.desired/2 payload of \d+ bytes is over"
                                            r" the 4194304-byte limit"):
        ota.parse_desired(json.dumps(doc).encode())


def test_unknown_fields_are_ignored_at_every_level() -> None:
    """An older device reads a newer minor revision (codec convention), so an unknown field
    is skipped, at the top and inside every object, never refused."""
    doc = json.loads(MINIMAL_BYTES)
    doc["added_later"] = 1
    doc["model"]["added_later"] = 1
    doc["sources"]["mqtt"]["added_later"] = 1
    doc["probation"]["added_later"] = 1
    parsed = ota.parse_desired(json.dumps(doc).encode())
    assert ota.encode_desired(parsed) == MINIMAL_BYTES
    assert "added_later" not in msgspec.to_builtins(parsed)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("length", 0, "chunk_request.length: Expected `int` >= 1"),
    ("offset", "0", "chunk_request.offset: expected an integer, found a string"),
    ("sha256", "ABC", "chunk_request.sha256: Expected `str` matching regex"),
    ("request_id", "", "chunk_request.request_id: Expected `str` of length >= 1"),
])
def test_chunk_request_errors_name_the_field(field: str, value: Any, message: str) -> None:
    doc = json.loads(CHUNK_REQUEST_BYTES)
    doc[field] = value
    with pytest.raises(ProtocolError) as err:
        ota.parse_request(json.dumps(doc).encode())
    assert err.value.message.startswith(message), err.value.message
    with pytest.raises(ProtocolError, match="over the 4096-byte limit"):
        ota.parse_request(json.dumps({**doc, "pad": "x" * 4096}).encode())
