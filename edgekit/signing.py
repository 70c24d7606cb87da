"""Ed25519 keys and detached signatures.

A private key is a PKCS#8 PEM file (mode 0600); a public key is a SubjectPublicKeyInfo PEM
file. A key id is the first 16 hex digits of the sha256 of the raw 32-byte public key.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgekit.errors import SignatureError, UsageError
from edgekit.fsutil import write_bytes_atomic

__all__ = [
    "KeyPair",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign_bytes",
    "verify_bytes",
]

ALGORITHM = "ed25519"


@dataclass
class KeyPair:
    private_path: Path
    public_path: Path
    key_id: str


def key_id(public: Ed25519PublicKey) -> str:
    """The short id of a public key, as written in signatures and desired documents."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(prefix: str | os.PathLike[str], *, overwrite: bool = False) -> KeyPair:
    """Write ``PREFIX.key`` (private, 0600) and ``PREFIX.pub`` (public).

    Raises:
        UsageError: a file exists and ``overwrite`` is false.
    """
    base = Path(prefix)
    private_path = base.with_name(base.name + ".key")
    public_path = base.with_name(base.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise UsageError(
                f"{path} already exists", hint="choose another prefix or pass --force"
            )
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_bytes_atomic(private_path, pem, private=True)
    write_bytes_atomic(public_path, pub)
    return KeyPair(private_path, public_path, key_id(private.public_key()))


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load a private key file.

    Raises:
        UsageError: the file is missing or is not an Ed25519 private key.
    """
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(
            f"{path} is not a PEM private key",
            hint="make one with `edgekit keys generate`",
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} is not an Ed25519 key", hint="make one with `edgekit keys generate`")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load a public key file (PEM), or the public half of a private key file.

    Raises:
        UsageError: the file is missing or holds no Ed25519 key.
    """
    data = _read(path, "public key")
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{path} is not an Ed25519 public key")
    return key


def sign_bytes(private: Ed25519PrivateKey, data: bytes) -> dict[str, str]:
    """A detached signature document for ``data``."""
    return {
        "schema": "edgekit.signature/1",
        "algorithm": ALGORITHM,
        "key_id": key_id(private.public_key()),
        "signature": base64.b64encode(private.sign(data)).decode("ascii"),
    }


def verify_bytes(
    signature: dict[str, object], data: bytes, trusted: list[Ed25519PublicKey]
) -> str:
    """Check a detached signature against the trusted keys; return the signer's key id.

    Raises:
        SignatureError: the document is malformed, no trusted key has its id, or the
            signature does not match.
    """
    if signature.get("algorithm") != ALGORITHM:
        raise SignatureError(f"unsupported signature algorithm {signature.get('algorithm')!r}")
    kid = signature.get("key_id")
    sig_b64 = signature.get("signature")
    if not isinstance(kid, str) or not isinstance(sig_b64, str):
        raise SignatureError("signature document lacks key_id or signature")
    candidates = [k for k in trusted if key_id(k) == kid]
    if not candidates:
        raise SignatureError(
            f"signed by key {kid}, which is not among the trusted keys",
            hint="pass the signer's public key with --trusted-key",
        )
    try:
        raw = base64.b64decode(sig_b64, validate=True)
    except ValueError as exc:
        raise SignatureError("signature is not valid base64") from exc
    try:
        candidates[0].verify(raw, data)
    except InvalidSignature as exc:
        raise SignatureError(
            f"signature by key {kid} does not match the manifest: the package was altered"
        ) from exc
    return kid


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise UsageError(f"{what} file {path} not found") from exc
    except OSError as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc.strerror}") from exc
