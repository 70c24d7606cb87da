"""Signed documents: an envelope around the exact bytes a key signed.

Every document that makes a device change its model (the desired documents) and every
request that makes the controller act (rollout requests) travels sealed::

    {"schema": "edgekit.signed/1",
     "payload": "<base64 of the inner document's JSON bytes>",
     "key_id": "9f86d081884c7d65",
     "signature": "<base64 Ed25519 signature over those bytes>"}

A reader checks the signature over the payload bytes *before* it parses anything of the
inner document (:func:`open_sealed`), so a forged document is never parsed beyond this small,
size-capped envelope. The inner document names its own schema, so a signed rollout request
can never be read as a desired document and the other way round. Which keys a reader trusts
depends on the role: devices check desired documents against their intent keys
(``ota.intent_keys``), the controller checks requests against its operator keys
(``controller.operator_keys``); the release key that signs packages is neither.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgekit.errors import ProtocolError, SignatureError
from edgekit.protocol.codec import Document, decode, encode
from edgekit.signing import key_id

__all__ = ["SIGNED_MAX_BYTES", "Opened", "SignedDocument", "is_sealed", "open_sealed", "seal"]

SIGNED_MAX_BYTES = 6 * 1024 * 1024  # a 4 MiB inner document, base64-encoded, and the rest

_KeyId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$")]


class SignedDocument(Document, tag="edgekit.signed/1"):
    """The envelope: base64 payload bytes, the signer's key id and the signature."""

    max_bytes: ClassVar[int] = SIGNED_MAX_BYTES
    payload: Annotated[str, msgspec.Meta(min_length=1, max_length=SIGNED_MAX_BYTES)]
    key_id: _KeyId
    signature: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


@dataclass(frozen=True)
class Opened:
    """A verified envelope: the exact signed bytes and who signed them."""

    payload: bytes
    key_id: str


def seal(payload: bytes, key: Ed25519PrivateKey) -> bytes:
    """The envelope of ``payload`` signed by ``key``, as bytes to publish."""
    doc = SignedDocument(payload=base64.b64encode(payload).decode("ascii"),
                         key_id=key_id(key.public_key()),
                         signature=base64.b64encode(key.sign(payload)).decode("ascii"))
    return encode(doc)


class _Schema(msgspec.Struct):
    schema: str = ""


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` is a JSON object whose schema is the envelope's (a size-capped look at
    that one field, not a verification)."""
    if len(data) > SIGNED_MAX_BYTES:
        return False
    try:
        return msgspec.json.decode(data, type=_Schema).schema == "edgekit.signed/1"
    except msgspec.MsgspecError:
        return False


def open_sealed(data: bytes, trusted: Sequence[Ed25519PublicKey], *,
                what: str = "document") -> Opened:
    """Check the envelope's signature against ``trusted``; return the signed bytes.

    Nothing of the inner document is parsed here.

    Raises:
        ProtocolError: not an envelope, over :data:`SIGNED_MAX_BYTES`, or base64 that does
            not decode.
        SignatureError: no trusted keys, a signer that is not trusted (or revoked: removed
            from the trusted keys), or a signature that does not match the payload.
    """
    envelope = decode(data, SignedDocument)
    try:
        payload = base64.b64decode(envelope.payload, validate=True)
        signature = base64.b64decode(envelope.signature, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ProtocolError(f"signed {what}: payload or signature is not valid base64") from exc
    if not trusted:
        raise SignatureError(f"no trusted key to check a signed {what} against",
                             hint="configure the signer's public key for this role")
    candidates = [k for k in trusted if key_id(k) == envelope.key_id]
    if not candidates:
        raise SignatureError(f"signed {what} by key {envelope.key_id}, which is not trusted"
                             " (unknown or revoked)",
                             hint="add the signer's public key for this role, or sign with a"
                                  " trusted key")
    try:
        candidates[0].verify(signature, payload)
    except InvalidSignature as exc:
        raise SignatureError(f"the signature of a {what} by key {envelope.key_id} does not"
                             " match its payload: altered or forged") from exc
    return Opened(payload=payload, key_id=envelope.key_id)
