"""The signed rollback instruction: the only way a device accepts an older model.

A device refuses a model that is not newer than the one it runs (an attacker who can publish
desired documents could otherwise push a fleet back to a version with a known flaw). Going
back is allowed when the desired document carries a :class:`RollbackInstruction` signed by a
key the device trusts, naming the fleet, the devices (or all of the fleet's), the model
name, the version to go back to and the package's sha256 (or null: the copy the device keeps
on disk). The signature covers the canonical JSON of every field but ``signature``: keys
sorted, no spaces, ASCII only (:func:`canonical_bytes`).

Replays: ``issued`` and ``nonce`` make every instruction unique; a device records the
``issued`` time of the last instruction it acted on and refuses any instruction that is not
newer (``not_before`` in :func:`verify_rollback`).
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from typing import Any, TypedDict

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgekit.errors import ProtocolError, SignatureError
from edgekit.manifest import parse_version
from edgekit.protocol import is_valid_id
from edgekit.protocol.ota import _validate as v
from edgekit.protocol.ota._time import format_time, parse_time
from edgekit.signing import sign_bytes, verify_bytes

__all__ = [
    "ROLLBACK_SCHEMA",
    "RollbackInstruction",
    "canonical_bytes",
    "parse_rollback",
    "sign_rollback",
    "verify_rollback",
]

ROLLBACK_SCHEMA = "edgekit.rollback/1"
_SIGNED_FIELDS = ("schema", "fleet", "devices", "name", "to_version", "sha256", "issued", "nonce")
_MAX_DEVICES = 10_000


class RollbackInstruction(TypedDict):
    schema: str  # "edgekit.rollback/1"
    fleet: str
    devices: list[str] | None  # None: every device of the fleet
    name: str  # model name
    to_version: str
    sha256: str | None  # the package to go back to; None: the copy the device keeps
    issued: str  # ISO 8601, UTC
    nonce: str  # 32 hex digits
    signature: dict[str, str]  # edgekit.signing.sign_bytes over canonical_bytes()


def canonical_bytes(instruction: dict[str, Any]) -> bytes:
    """The bytes the signature covers: the signed fields as compact, key-sorted ASCII JSON."""
    body = {key: instruction.get(key) for key in _SIGNED_FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_rollback(key: Ed25519PrivateKey, *, fleet: str, devices: list[str] | None, name: str,
                  to_version: str, sha256: str | None, issued: dt.datetime | None = None,
                  nonce: str | None = None) -> RollbackInstruction:
    """Make and sign a rollback instruction.

    Raises:
        ProtocolError: a field is invalid (the same checks a device applies).
    """
    body: dict[str, Any] = {
        "schema": ROLLBACK_SCHEMA,
        "fleet": fleet,
        "devices": sorted(set(devices)) if devices is not None else None,
        "name": name,
        "to_version": to_version,
        "sha256": sha256,
        "issued": format_time(issued),
        "nonce": nonce or secrets.token_hex(16),
    }
    body["signature"] = sign_bytes(key, canonical_bytes(body))
    return parse_rollback(body)


def parse_rollback(value: Any, where: str = "rollback") -> RollbackInstruction:
    """Check the shape of a rollback instruction (not its signature).

    Raises:
        ProtocolError: a field is missing or of the wrong type; the message names it.
    """
    doc = v.obj(value, where)
    if doc.get("schema") != ROLLBACK_SCHEMA:
        raise ProtocolError(f"{where}.schema: expected {ROLLBACK_SCHEMA!r},"
                            f" found {doc.get('schema')!r}")
    fleet = v.text(doc, "fleet", where, max_len=64)
    if not is_valid_id(fleet):
        raise ProtocolError(f"{where}.fleet: {fleet!r} is not a valid fleet id")
    devices = v.strings(doc, "devices", where, nullable=True, max_items=_MAX_DEVICES)
    if devices is not None and not all(is_valid_id(d) for d in devices):
        raise ProtocolError(f"{where}.devices: every entry must be a valid device id")
    name = v.text(doc, "name", where, max_len=256)
    to_version = v.text(doc, "to_version", where, max_len=64)
    try:
        parse_version(to_version)
    except Exception as exc:
        raise ProtocolError(f"{where}.to_version: {to_version!r} is not a dotted number") from exc
    sha = v.sha256(doc, "sha256", where, nullable=True)
    issued = v.text(doc, "issued", where, max_len=64)
    parse_time(issued, f"{where}.issued")
    nonce = v.text(doc, "nonce", where, max_len=128)
    signature = v.obj(v.field(doc, "signature", where), f"{where}.signature")
    if not all(isinstance(x, str) for x in signature.values()):
        raise ProtocolError(f"{where}.signature: every field must be a string")
    return RollbackInstruction(schema=ROLLBACK_SCHEMA, fleet=fleet, devices=devices, name=name,
                               to_version=to_version, sha256=sha, issued=issued, nonce=nonce,
                               signature=dict(signature))


def verify_rollback(instruction: RollbackInstruction, trusted: list[Ed25519PublicKey], *,
                    fleet: str, device: str, name: str, version: str, sha256: str | None,
                    not_before: dt.datetime | None = None) -> str:
    """Check that ``instruction`` is signed by a trusted key and allows this device to go
    back to exactly this model; return the signer's key id.

    Raises:
        SignatureError: no trusted keys, an untrusted signer, a signature that does not match,
            an instruction for another fleet, device, model, version or package, or one not
            issued after ``not_before`` (a replay).
    """
    if not trusted:
        raise SignatureError("a rollback instruction needs a trusted key to check it against",
                             hint="give the device the signer's public key (--trusted-key)")
    kid = verify_bytes(dict(instruction["signature"]), canonical_bytes(dict(instruction)), trusted)
    wrong = []
    if instruction["fleet"] != fleet:
        wrong.append(f"fleet {instruction['fleet']!r}, not {fleet!r}")
    devices = instruction["devices"]
    if devices is not None and device not in devices:
        wrong.append(f"devices {devices[:5]}{'...' if len(devices) > 5 else ''}, not {device!r}")
    if instruction["name"] != name:
        wrong.append(f"model {instruction['name']!r}, not {name!r}")
    if instruction["to_version"] != version:
        wrong.append(f"version {instruction['to_version']!r}, not {version!r}")
    if instruction["sha256"] != sha256:
        wrong.append("another package (sha256)")
    if wrong:
        raise SignatureError("the rollback instruction does not allow this: it names "
                             + "; ".join(wrong),
                             hint="sign a new instruction with `edgekit rollback`")
    issued = parse_time(instruction["issued"], "rollback.issued")
    if not_before is not None and issued <= not_before:
        raise SignatureError(
            f"the rollback instruction was issued at {instruction['issued']}, not after the"
            f" last one this device acted on ({format_time(not_before)}): a replay",
            hint="sign a new instruction with `edgekit rollback`")
    return kid
