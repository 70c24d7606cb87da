"""The device's intent gate without a broker: signature before parsing, binding, expiry,
replay high-water mark and version floor, and their persistence."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import edgekit.protocol.ota as ota
from device_agent.ota.errors import UpdateFailure
from device_agent.ota.intent import IntentGate, RefusalLimiter

SHA = hashlib.sha256(b"pkg").hexdigest()
KEY = Ed25519PrivateKey.generate()


def _gate(path: Path, **kw: Any) -> IntentGate:
    return IntentGate(path / "trust.json", [KEY.public_key()],
                      allow_unsigned=kw.pop("allow_unsigned", False), fleet="f1",
                      device="d1")


def _doc(version: str = "2.0.0", name: str = "digits", **kw: Any) -> ota.DesiredDocument:
    return ota.make_desired(deployment=kw.pop("deployment", ota.new_deployment_id()),
                            fleet=kw.pop("fleet", "f1"), name=name, version=version,
                            sha256=SHA, size=10, request_topic="t", **kw)


def _reason(call: Any) -> str:
    with pytest.raises(UpdateFailure) as err:
        call()
    return str(err.value.reason)


def test_signature_first_then_binding(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    doc = _doc(devices=["d1", "d2"])
    assert gate.open(ota.seal_desired(doc, KEY)) == doc
    assert _reason(lambda: gate.open(ota.encode_desired(doc))) == "untrusted_intent"
    other = Ed25519PrivateKey.generate()
    assert _reason(lambda: gate.open(ota.seal_desired(doc, other))) == "untrusted_intent"
    assert _reason(lambda: gate.check_bound(_doc(devices=["d2"]))) == "not_for_device"
    assert _reason(lambda: gate.check_bound(_doc(fleet="f2"))) == "not_for_device"
    gate.check_bound(_doc())
    lab = _gate(tmp_path, allow_unsigned=True)
    assert lab.open(ota.encode_desired(doc)) == doc


def test_freshness_and_floor_persist(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    now = dt.datetime.now(dt.UTC)
    old = _doc(issued=now - dt.timedelta(hours=2))
    new = _doc(issued=now)
    gate.check_fresh(old)
    gate.acted_on(new)
    assert _reason(lambda: gate.check_fresh(old)) == "replayed"
    gate.check_fresh(new)  # the same document again is not a replay
    expired = _doc(issued=now - dt.timedelta(days=2), ttl_s=3600)
    assert _reason(lambda: gate.check_fresh(expired)) == "expired"
    gate.ensure_floor("digits", "2.0.0")
    again = _gate(tmp_path)  # a restart
    assert again.high_water == gate.high_water and again.floor == gate.floor
    assert _reason(lambda: again.check_floor(_doc(), "digits", "2.0.0")) == "older_version"
    assert _reason(lambda: again.check_floor(_doc(), "digits", "1.0.0")) == "older_version"
    assert _reason(lambda: again.check_floor(_doc(), "other", "9.0.0")) == "renamed"
    again.check_floor(_doc(), "digits", "2.0.1")
    again.check_floor(_doc(allow_downgrade=True, ttl_s=60), "digits", "1.0.0")
    again.check_floor(_doc(allow_rename=True), "other", "0.0.1")
    again.ensure_floor("other", "0.0.1")  # a floor is kept once set
    assert again.floor is not None and again.floor.name == "digits"


def test_unreadable_state_starts_without_a_floor(tmp_path: Path) -> None:
    (tmp_path / "trust.json").write_text("{broken")
    gate = _gate(tmp_path)
    assert gate.floor is None and gate.high_water is None


def test_refusal_limiter() -> None:
    limiter = RefusalLimiter(per_minute=3)
    assert limiter.allow("a") and not limiter.allow("a")
    assert [limiter.allow(k) for k in "bcde"] == [True, True, False, False]
    assert limiter.suppressed == 2
