"""The ``.edgepkg`` file: one zip archive with the model, its manifest and a signature.

Members::

    manifest.json     the manifest (see :mod:`edgekit.manifest`); pins the sha256 of every
                      other member except the signature
    signature.json    optional detached Ed25519 signature over the exact manifest bytes
    model.onnx | model.tflite
    golden.npz        golden samples: ``input:<name>`` and ``output:<name>`` arrays

Reading never extracts anything outside the destination folder: member names with ``..``,
absolute paths or backslashes are refused, and so are members or manifests larger than the
limits below (zip bombs included, since the limits apply to the decompressed size).

Verification is ordered so that a hostile file costs little: the central directory is checked
first (member count, names, each member's declared size against the manifest and the limits,
its compression ratio), then the signature over the manifest bytes, and only then are members
decompressed, as a stream into the hash, never whole into memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgekit.errors import ArtifactError, SignatureError
from edgekit.fsutil import atomic_write, fsync_dir
from edgekit.manifest import FileEntry, Manifest
from edgekit.signing import sign_bytes, verify_bytes

__all__ = [
    "DEFLATE_MIN_SAVING",
    "MAX_COMPRESSION_RATIO",
    "MAX_MANIFEST_BYTES",
    "MAX_MEMBERS",
    "MAX_MEMBER_BYTES",
    "Package",
    "VerifyReport",
    "extract_package",
    "golden_from_npz",
    "golden_to_npz",
    "member_compression",
    "open_package",
    "sha256_bytes",
    "sha256_file",
    "sign_package",
    "verify_package",
    "write_package",
]

MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_MEMBER_BYTES = 2 * 1024 * 1024 * 1024
MAX_MEMBERS = 64
# Model weights compress by a few times at most; deflate reaches ~1000x only on runs of one
# byte, which is what a zip bomb is made of. Small members are exempt (a tiny zero-filled
# tensor is legitimate and cannot hurt).
MAX_COMPRESSION_RATIO = 200
_RATIO_EXEMPT_BYTES = 1024 * 1024
_MAX_SIGNATURE_BYTES = 64 * 1024
_STREAM_BLOCK = 1 << 20
# A member is deflated only when that saves at least this share of it. Float32 weights save
# about 8 %, and a device pays for it on every load: inflating runs at 200-300 MB/s on an x86
# core (a fifth of the CPU of verifying a downloaded package) and slower on an ARM board.
# Int8 weights save about 35 % and stay deflated; so do manifests and golden samples.
DEFLATE_MIN_SAVING = 0.10
_SAMPLE_BYTES = 256 * 1024  # bytes per sample when judging a large member (4 samples)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def golden_to_npz(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> bytes:
    """Serialise golden samples (batched along axis 0) to npz bytes."""
    buf = io.BytesIO()
    arrays = {f"input:{k}": v for k, v in inputs.items()}
    arrays.update({f"output:{k}": v for k, v in outputs.items()})
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def golden_from_npz(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inverse of :func:`golden_to_npz`.

    Raises:
        ArtifactError: the bytes are not an npz file of golden samples.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            inputs = {k[6:]: npz[k] for k in npz.files if k.startswith("input:")}
            outputs = {k[7:]: npz[k] for k in npz.files if k.startswith("output:")}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"golden samples are unreadable: {exc}") from exc
    return inputs, outputs


def write_package(
    path: str | os.PathLike[str],
    manifest: Manifest,
    members: dict[str, bytes],
    *,
    sign_key: Ed25519PrivateKey | None = None,
) -> Manifest:
    """Write a package atomically; fill ``manifest.files`` from ``members``.

    Raises:
        ArtifactError: a member name is unsafe or reserved.
        OutputWriteError: the file could not be written (nothing is left behind).
    """
    for name in members:
        _check_member_name(name)
        if name in (MANIFEST, SIGNATURE):
            raise ArtifactError(f"member name {name} is reserved")
    manifest.files = {
        name: FileEntry(sha256=sha256_bytes(data), size=len(data)) for name, data in members.items()
    }
    manifest_bytes = _dump_manifest(manifest)
    with atomic_write(path) as handle:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MANIFEST, manifest_bytes)
            if sign_key is not None:
                zf.writestr(SIGNATURE, json.dumps(sign_bytes(sign_key, manifest_bytes), indent=2))
            for name, data in members.items():
                zf.writestr(name, data, compress_type=member_compression(data))
    return manifest


def member_compression(data: bytes) -> int:
    """``zipfile.ZIP_DEFLATED``, or ``ZIP_STORED`` when deflate saves less than
    :data:`DEFLATE_MIN_SAVING` of ``data`` (judged on four samples of a large member)."""
    if len(data) <= 4 * _SAMPLE_BYTES:
        samples = [data]
    else:
        step = (len(data) - _SAMPLE_BYTES) // 3
        samples = [data[i * step:i * step + _SAMPLE_BYTES] for i in range(4)]
    raw = sum(len(sample) for sample in samples)
    if raw == 0:
        return zipfile.ZIP_DEFLATED
    packed = sum(len(zlib.compress(sample, 6)) for sample in samples)
    return zipfile.ZIP_STORED if packed > (1 - DEFLATE_MIN_SAVING) * raw else zipfile.ZIP_DEFLATED


@dataclass
class Package:
    """An opened package: manifest parsed, members readable on demand (size-checked)."""

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    signature: dict[str, Any] | None

    def read_member(self, name: str) -> bytes:
        """Read one member and check it against the manifest's sha256 and size.

        Raises:
            ArtifactError: the member is missing, too large, or does not match the manifest.
        """
        entry = self.manifest.files.get(name)
        if entry is None:
            raise ArtifactError(f"{self.path}: member {name} is not listed in the manifest")
        with _open_zip(self.path) as zf:
            info = _member_info(zf, name, self.path)
            if info.file_size != entry.size:
                raise ArtifactError(
                    f"{self.path}: member {name} is {info.file_size} bytes, the manifest says"
                    f" {entry.size}"
                )
            data = _read_bounded(zf, info, min(entry.size, MAX_MEMBER_BYTES), self.path)
        if sha256_bytes(data) != entry.sha256:
            raise ArtifactError(
                f"{self.path}: member {name} does not match its sha256 in the manifest"
                " (the package is corrupt or was altered)"
            )
        return data

    def check_member(self, name: str) -> None:
        """Hash one member as a stream (bounded memory) and compare it with the manifest.

        Raises:
            ArtifactError: the member is missing, larger than declared, or altered.
        """
        entry = self.manifest.files.get(name)
        if entry is None:
            raise ArtifactError(f"{self.path}: member {name} is not listed in the manifest")
        digest = hashlib.sha256()
        seen = 0
        with _open_zip(self.path) as zf:
            info = _member_info(zf, name, self.path)
            try:
                with zf.open(info) as handle:
                    # Read at most one byte past the signed size: a member that inflates
                    # beyond what its header says stops here.
                    while block := handle.read(min(_STREAM_BLOCK, entry.size + 1 - seen)):
                        seen += len(block)
                        if seen > entry.size:
                            raise ArtifactError(
                                f"{self.path}: member {name} is larger than its manifest entry")
                        digest.update(block)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                raise ArtifactError(f"{self.path}: member {name} is corrupt: {exc}") from exc
        if seen != entry.size or digest.hexdigest() != entry.sha256:
            raise ArtifactError(
                f"{self.path}: member {name} does not match its sha256 in the manifest"
                " (the package is corrupt or was altered)"
            )

    def model_bytes(self) -> bytes:
        return self.read_member(self.manifest.model_file)

    def golden(self, member: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The golden samples of ``member`` (default: the manifest's ``golden.file``).

        Raises:
            ArtifactError: the member is unreadable or altered.
        """
        name = member if member is not None else self.manifest.golden.get("file", "golden.npz")
        if not isinstance(name, str) or name not in self.manifest.files:
            return {}, {}
        return golden_from_npz(self.read_member(name))


def open_package(path: str | os.PathLike[str]) -> Package:
    """Open a package and parse its manifest (members are read later, on demand).

    Raises:
        ArtifactError: the file is missing, not a package, or its manifest is invalid.
    """
    p = Path(path)
    with _open_zip(p) as zf:
        names = zf.namelist()
        infos = {info.filename: info for info in zf.infolist()}
        if len(names) > MAX_MEMBERS:
            raise ArtifactError(f"{p}: {len(names)} members, more than the limit of {MAX_MEMBERS}")
        for name in names:
            _check_member_name(name)
        if len(set(names)) != len(names):
            raise ArtifactError(f"{p}: duplicate member names")
        info = _member_info(zf, MANIFEST, p)
        manifest_bytes = _read_bounded(zf, info, MAX_MANIFEST_BYTES, p)
        signature = None
        if SIGNATURE in names:
            sig_info = _member_info(zf, SIGNATURE, p)
            sig_raw = _read_bounded(zf, sig_info, _MAX_SIGNATURE_BYTES, p)
            try:
                signature = json.loads(sig_raw)
            except ValueError as exc:
                raise SignatureError(f"{p}: signature.json is not valid JSON") from exc
            if not isinstance(signature, dict):
                raise SignatureError(f"{p}: signature.json is not an object")
    try:
        doc = json.loads(manifest_bytes)
    except ValueError as exc:
        raise ArtifactError(f"{p}: manifest.json is not valid JSON: {exc}") from exc
    manifest = Manifest.from_dict(doc)
    listed = set(manifest.files)
    present = set(names) - {MANIFEST, SIGNATURE}
    if present != listed:
        extra = sorted(present - listed)
        missing = sorted(listed - present)
        raise ArtifactError(
            f"{p}: members do not match the manifest (unlisted: {extra or '-'},"
            f" missing: {missing or '-'})"
        )
    if manifest.model_file not in listed:
        raise ArtifactError(f"{p}: the model file {manifest.model_file} is not in the package")
    _check_variant_members(manifest, p)
    _check_declared_sizes(infos, manifest, p)
    return Package(p, manifest, manifest_bytes, signature)


@dataclass
class VerifyReport:
    """What :func:`verify_package` checked."""

    path: str
    name: str
    version: str
    files_checked: int
    signed: bool
    key_id: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "name": self.name,
            "version": self.version,
            "files_checked": self.files_checked,
            "signed": self.signed,
            "key_id": self.key_id,
            "ok": True,
        }


def verify_package(
    path: str | os.PathLike[str],
    trusted: list[Ed25519PublicKey] | None = None,
    *,
    require_signature: bool = True,
    deferred: Collection[str] = (),
) -> VerifyReport:
    """Check the signature over the manifest, then every member's sha256 against it.

    Nothing is decompressed before the signature verifies (the manifest and the signature
    members are read with small caps); members are then hashed as a stream, so memory stays
    bounded whatever their size.

    ``deferred``: members the caller reads next with :meth:`Package.read_member`, which
    checks them against the same signed manifest as it reads them: they are not inflated
    and hashed twice (a model of 20 MB is a third of a device's verification). They are not
    counted in ``files_checked``.

    Raises:
        ArtifactError: a member is missing, altered, unsafe or over a size limit.
        SignatureError: a signature is required and missing, or does not verify.
    """
    pkg = open_package(path)
    kid = None
    if pkg.signature is None:
        if require_signature:
            raise SignatureError(
                f"{path} is not signed",
                hint="sign it with `edgekit sign PKG --key KEY`, or allow unsigned packages",
            )
    else:
        if trusted:
            kid = verify_bytes(pkg.signature, pkg.manifest_bytes, trusted)
        elif require_signature:
            raise SignatureError("no trusted keys given to check the signature against",
                                 hint="pass --trusted-key PUB")
    checked = [name for name in pkg.manifest.files if name not in deferred]
    for name in checked:
        pkg.check_member(name)
    return VerifyReport(
        path=str(path),
        name=pkg.manifest.name,
        version=pkg.manifest.version,
        files_checked=len(checked),
        signed=pkg.signature is not None,
        key_id=kid,
    )


def sign_package(path: str | os.PathLike[str], key: Ed25519PrivateKey,
                 out: str | os.PathLike[str] | None = None) -> str:
    """(Re)sign a package; write it to ``out`` or in place, atomically. Returns the key id.

    Raises:
        ArtifactError: the package is corrupt (members are checked before signing).
    """
    pkg = open_package(path)
    members = {name: pkg.read_member(name) for name in pkg.manifest.files}
    with _open_zip(pkg.path) as zf:  # each member keeps the compression it was written with
        kinds = {name: zf.getinfo(name).compress_type for name in members}
    sig = sign_bytes(key, pkg.manifest_bytes)
    with atomic_write(out or path) as handle:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MANIFEST, pkg.manifest_bytes)
            zf.writestr(SIGNATURE, json.dumps(sig, indent=2))
            for name, data in members.items():
                zf.writestr(name, data, compress_type=kinds[name])
    return sig["key_id"]


def extract_package(path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Extract the verified members into ``dest`` (created), never writing outside it.

    Raises:
        ArtifactError: a member is unsafe, too large or does not match the manifest.
    """
    pkg = open_package(path)
    root = Path(dest).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for name in [*pkg.manifest.files, MANIFEST]:
        data = pkg.manifest_bytes if name == MANIFEST else pkg.read_member(name)
        target = (root / name).resolve()
        if root not in target.parents:
            raise ArtifactError(f"member {name} would be written outside {root}")
        with atomic_write(target) as handle:
            handle.write(data)
    fsync_dir(root)
    return root


def _dump_manifest(manifest: Manifest) -> bytes:
    return json.dumps(manifest.to_dict(), indent=2, sort_keys=False).encode("utf-8")


def _check_variant_members(manifest: Manifest, path: Path) -> None:
    """Every variant names members that are safe and pinned in ``files``.

    Raises:
        ArtifactError: a variant's model or golden file is unsafe or not pinned.
    """
    for variant in manifest.variants:
        for what, name in (("model file", variant.model_file), ("golden file", variant.golden_file)):
            if name is None:
                continue
            _check_member_name(name)
            if name not in manifest.files:
                raise ArtifactError(
                    f"{path}: variant {variant.id}'s {what} {name!r} is not pinned in the"
                    " manifest's files",
                    hint="this package was not made by edgekit, or was tampered with")


def _check_member_name(name: str) -> None:
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or ".." in parts
        or ":" in parts[0]
        or any(p in ("", ".") for p in parts)
    ):
        raise ArtifactError(
            f"unsafe member name {name!r} in package (path traversal refused)",
            hint="this package was not made by edgekit, or was tampered with",
        )


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise ArtifactError(f"package {path} not found")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ArtifactError(
            f"{path} is not an edgekit package (not a zip archive, or truncated)",
            hint="make packages with `edgekit convert`",
        ) from exc
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror}") from exc


def _member_info(zf: zipfile.ZipFile, name: str, path: Path) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(name)
    except KeyError as exc:
        raise ArtifactError(f"{path}: member {name} is missing") from exc


def _check_declared_sizes(infos: dict[str, zipfile.ZipInfo], manifest: Manifest,
                          path: Path) -> None:
    """Refuse, from the central directory alone, members whose declared size disagrees with
    the manifest, is over :data:`MAX_MEMBER_BYTES`, or inflates suspiciously."""
    for name, entry in manifest.files.items():
        info = infos[name]  # open_package checked that every listed member is present
        if entry.size < 0 or entry.size > MAX_MEMBER_BYTES:
            raise ArtifactError(
                f"{path}: member {name} is declared as {entry.size} bytes, over the limit of"
                f" {MAX_MEMBER_BYTES}")
        if info.file_size != entry.size:
            raise ArtifactError(
                f"{path}: member {name} is {info.file_size} bytes, the manifest says"
                f" {entry.size}")
        if info.file_size > _RATIO_EXEMPT_BYTES and \
                info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
            raise ArtifactError(
                f"{path}: member {name} inflates {info.file_size // max(info.compress_size, 1)}"
                f" times, over the limit of {MAX_COMPRESSION_RATIO} (a zip bomb?)",
                hint="this package was not made by edgekit, or was tampered with")


def _read_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, path: Path) -> bytes:
    if info.file_size > limit:
        raise ArtifactError(
            f"{path}: member {info.filename} is {info.file_size} bytes, over the limit of {limit}"
        )
    try:
        with zf.open(info) as handle:
            data = handle.read(limit + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ArtifactError(f"{path}: member {info.filename} is corrupt: {exc}") from exc
    if len(data) > limit:
        raise ArtifactError(f"{path}: member {info.filename} is larger than declared")
    return data
