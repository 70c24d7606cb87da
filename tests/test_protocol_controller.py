"""Rollout requests (edgekit.protocol.controller): one typed document, decoded strictly.

Every refusal is a ProtocolError whose message names the field, whatever is wrong with it:
garbage, a wrong type, a value out of range, a missing field, an oversize payload.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import ProtocolError
from edgekit.protocol import encode
from edgekit.protocol.controller import (
    RolloutRequest,
    make_rollout_request,
    parse_rollout_request,
    peek_reply_to,
    reply_topic,
)
from edgekit.protocol.signed import seal

REQUEST_ID = "0123456789abcdef"


def request(**fields: Any) -> dict[str, Any]:
    """A valid rollout request as JSON fields, with ``fields`` changed (None: removed)."""
    doc = msgspec.to_builtins(make_rollout_request(
        "lab", REQUEST_ID, name="digits", version="1.0.0", sha256="ab" * 32,
        devices=["pi-1"], plan={"canary": "50%"}, issued=1.8e9))
    doc.update(fields)
    return {k: v for k, v in doc.items() if v is not None}


def refusal(doc: dict[str, Any] | bytes) -> str:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with pytest.raises(ProtocolError) as info:
        parse_rollout_request(raw)
    assert info.value.message.startswith("rollout request: ")
    return info.value.message


def test_a_request_round_trips_as_the_typed_document() -> None:
    made = make_rollout_request("lab", REQUEST_ID, name="digits", version="2", action="abort",
                                rollout_id=3, issued=1.8e9)
    assert isinstance(made, RolloutRequest)
    assert made.reply_to == reply_topic("lab", REQUEST_ID)
    assert (made.action, made.rollout_id, made.plan, made.devices) == ("abort", 3, None, None)
    assert parse_rollout_request(encode(made)) == made
    assert json.loads(encode(made))["schema"] == "edgekit.rollout-request/1"
    # A newer minor revision's extra field is ignored; action defaults to "rollout".
    plain = request(action=None, extra={"any": 1})
    assert parse_rollout_request(json.dumps(plain).encode()).action == "rollout"


# (fields changed, words the refusal must hold: the field and what it must be)
BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"request_id": "XYZ"}, "request_id must be 8 to 64 lowercase hex"),
    ({"request_id": "ab" * 40}, "request_id must be"),
    ({"request_id": 12345678}, "request_id must be"),
    ({"reply_to": "edgekit/v1/lab/pi-1/status"}, "reply_to must be edgekit/v1/<fleet>"),
    ({"reply_to": reply_topic("other", REQUEST_ID)}, "reply_to must be"),
    ({"reply_to": ["x"]}, "reply_to must be"),
    ({"fleet": "a/b"}, "fleet must be a fleet id"),
    ({"fleet": "+"}, "fleet must be a fleet id"),
    ({"issued": "now"}, "issued must be a Unix time"),
    ({"issued": True}, "issued must be a Unix time"),
    ({"issued": -5}, "issued must be a Unix time"),
    ({"name": ""}, "name must be a non-empty string"),
    ({"name": "n" * 257}, "name must be"),
    ({"name": 7}, "name must be"),
    ({"version": "v" * 65}, "version must be a non-empty string of at most 64"),
    ({"sha256": "AB" * 32}, "sha256 must be 64 lowercase hex digits or null"),
    ({"sha256": 5}, "sha256 must be"),
    ({"devices": ["pi-1", "a/#"]}, "devices must be a list of device ids"),
    ({"devices": "pi-1"}, "devices must be"),
    ({"plan": ["canary"]}, "plan must be an object"),
    ({"action": "drop"}, "action must be one of rollout, abort, rollback"),
    ({"action": "abort"}, "abort needs rollout_id"),
    ({"action": "rollback"}, "rollback needs rollout_id"),
    ({"action": "abort", "rollout_id": 0}, "rollout_id must be a positive integer"),
    ({"action": "abort", "rollout_id": "7"}, "rollout_id must be"),
    ({"action": "abort", "rollout_id": True}, "rollout_id must be"),
    ({"action": "abort", "rollout_id": 1.5}, "rollout_id must be"),
    ({"schema": "edgekit.status/1"}, "$.schema"),
]


@pytest.mark.parametrize(("fields", "words"), BAD_FIELDS,
                         ids=[",".join(f"{k}={v!s:.12}" for k, v in f.items())
                              for f, _ in BAD_FIELDS])
def test_a_bad_field_is_refused_naming_it(fields: dict[str, Any], words: str) -> None:
    assert words in refusal(request(**fields))


@pytest.mark.parametrize("field", ["request_id", "reply_to", "fleet", "issued", "name",
                                   "version", "schema"])
def test_a_missing_field_is_refused_naming_it(field: str) -> None:
    doc = request()
    del doc[field]
    assert f"`{field}`" in refusal(doc)


def test_garbage_oversize_and_files_are_refused() -> None:
    assert "not valid JSON" in refusal(b"\xff not json")
    assert "not valid JSON" in refusal(b"{" * 10)
    assert "Expected `object`" in refusal(b"[1, 2]")
    assert "Expected `object`" in refusal(b"null")
    padded = request(note="x" * (256 * 1024))
    assert "over the 262144-byte limit" in refusal(padded)
    inf = json.dumps(request()).replace('"issued": 1800000000.0', '"issued": 1e400')
    assert "issued must be a Unix time" in refusal(inf.encode())
    with pytest.raises(ProtocolError) as info:
        parse_rollout_request(json.dumps(request(package="/etc/shadow")).encode())
    assert "package is not accepted" in info.value.message
    assert info.value.hint is not None and "edgekit registry push" in info.value.hint


def test_make_rollout_request_refuses_what_the_controller_would() -> None:
    with pytest.raises(ProtocolError, match="fleet must be a fleet id"):
        make_rollout_request("a/b", REQUEST_ID, name="digits", version="1")
    with pytest.raises(ProtocolError, match="action must be one of"):
        make_rollout_request("lab", REQUEST_ID, name="digits", version="1", action="drop")
    with pytest.raises(ProtocolError, match="rollback needs rollout_id"):
        make_rollout_request("lab", REQUEST_ID, name="digits", version="1", action="rollback")


def test_a_refused_request_still_names_where_to_answer() -> None:
    """peek_reply_to stays lenient: a request that fails its checks is answered on its own
    reply topic, signed or not, but never on a topic of the sender's choice elsewhere."""
    broken = request(version="v" * 65)
    assert peek_reply_to(json.dumps(broken).encode()) == (REQUEST_ID, broken["reply_to"])
    sealed = seal(json.dumps(broken).encode(), Ed25519PrivateKey.generate())
    assert peek_reply_to(sealed) == (REQUEST_ID, broken["reply_to"])
    for bad in (request(reply_to="edgekit/v1/lab/pi-1/status"),
                request(reply_to=reply_topic("lab", "fedcba9876543210")), request(request_id=7)):
        assert peek_reply_to(json.dumps(bad).encode()) is None
    assert peek_reply_to(b"\xff") is None and peek_reply_to(b"[]") is None
