"""The model registry: verified packages in a folder of artifacts, their records in the database.

Layout of the artifact folder::

    <store>/<name>/<version>/model.edgepkg    one verified package per registered version
    <store>/.incoming/                        staging for pushes in progress (same filesystem)

A push is committed by its database row: the package is verified, staged, verified again,
moved into place, and only then recorded. A push that fails at any step leaves neither a
file nor a row behind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgekit.artifact import Package, VerifyReport, open_package, sha256_file, verify_package
from edgekit.errors import ArtifactError, EdgekitError, OutputWriteError, UsageError
from edgekit.fsutil import fsync_dir
from edgekit.host.db import Store
from edgekit.host.db._records import ModelRecord
from edgekit.host.db._timeutil import as_utc, utcnow
from edgekit.manifest import Manifest, parse_version

__all__ = ["PushResult", "Registry", "default_store_dir", "evaluation_summary", "parse_ref"]

ENV_STORE = "EDGEKIT_STORE"
PACKAGE_FILE = "model.edgepkg"
_INCOMING = ".incoming"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHANNEL_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# Long enough for a large package on a slow disk; a crashed push frees it after this.
_PUSH_LEASE_S = 600.0


def default_store_dir() -> Path:
    """``$EDGEKIT_STORE``, else ``~/.edgekit/artifacts``."""
    env = os.environ.get(ENV_STORE)
    return Path(env).expanduser() if env else Path.home() / ".edgekit" / "artifacts"


def parse_ref(text: str, *, need_version: bool = False) -> tuple[str, str | None]:
    """Split ``NAME[:VERSION]``.

    Raises:
        UsageError: the name is not a valid model name, the version is not dotted digits,
            or a version is required and missing.
    """
    name, sep, version = text.partition(":")
    if not _NAME_RE.match(name):
        raise UsageError(f"{text!r} does not start with a model name",
                         hint="names are letters, digits, '.', '_' and '-'; write NAME:VERSION")
    if not sep:
        if need_version:
            raise UsageError(f"{text!r} names no version", hint="write NAME:VERSION, e.g. digits:1.2.0")
        return name, None
    try:
        parse_version(version)
    except ArtifactError as err:
        raise UsageError(f"{text!r}: {err.message}", hint=err.hint) from None
    return name, version


def evaluation_summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a manifest's ``metrics`` (None where it has none)."""
    acc = (evaluation.get("accuracy") or {}).get("artifact") or {}
    lat = (evaluation.get("latency") or {}).get("artifact") or {}
    parity = evaluation.get("parity") or {}
    return {
        "accuracy": acc.get("accuracy"),
        "f1": acc.get("f1"),
        "eval_samples": (evaluation.get("accuracy") or {}).get("samples"),
        "latency_p50_ms": lat.get("p50_ms"),
        "latency_p95_ms": lat.get("p95_ms"),
        "parity_passed": parity.get("passed"),
    }


@dataclass(frozen=True)
class PushResult:
    """What a push did: the stored record, whether it is new, where its package lies."""

    record: ModelRecord
    created: bool
    path: Path


class Registry:
    """Packages and their records: push, look up, promote."""

    def __init__(self, store: Store, root: str | os.PathLike[str] | None = None) -> None:
        self.store = store
        self.root = Path(root).expanduser() if root is not None else default_store_dir()

    def path_of(self, record: ModelRecord) -> Path:
        """Where a registered package lies."""
        return self.root / record.path

    def artifact_path(self, name: str, version: str) -> Path:
        """The package file of a registered version, checked to exist.

        Raises:
            UsageError: the version is not registered.
            ArtifactError: its file is missing from the artifact folder.
        """
        record = self.get(name, version)
        path = self.path_of(record)
        if not path.is_file():
            raise ArtifactError(f"the package of {record.ref} is missing at {path}",
                                hint="push the package again to restore it")
        return path

    def get(self, name: str, version: str | None = None) -> ModelRecord:
        """A registered version (the highest one when ``version`` is None).

        Raises:
            UsageError: nothing is registered under that name and version.
        """
        record = self.store.get_model(name, version)
        if record is None:
            what = f"{name}:{version}" if version else name
            raise UsageError(f"model {what} is not in the registry",
                             hint="see `edgekit registry list`")
        return record

    def list_models(self, name: str | None = None) -> list[ModelRecord]:
        """Registered models by name, then version (numerically)."""
        return self.store.list_models(name)

    def lineage(self, record: ModelRecord) -> list[str]:
        """The ancestors of a model, parent first, as ``name:version`` references."""
        chain: list[str] = []
        seen = {record.ref}
        parent = record.parent
        while parent and parent not in seen:
            chain.append(parent)
            seen.add(parent)
            name, version = parse_ref(parent, need_version=True)
            found = self.store.get_model(name, version)
            parent = found.parent if found else None
        return chain

    def promote(self, name: str, version: str, channel: str = "stable") -> ModelRecord:
        """Point ``channel`` at this version.

        Raises:
            UsageError: a bad channel name, or the version is not registered.
        """
        if not _CHANNEL_RE.match(channel):
            raise UsageError(f"channel name {channel!r} is not valid",
                             hint="use lower-case letters, digits, '_' and '-', e.g. stable")
        return self.store.promote_model(name, version, channel)

    def push(self, package: str | os.PathLike[str], *,
             trusted_keys: list[Ed25519PublicKey] | None = None, parent: str | None = None,
             data: str | None = None, now: dt.datetime | None = None) -> PushResult:
        """Verify a package, copy it into the artifact folder and record it.

        With ``trusted_keys`` the package must carry a signature by one of them; without,
        hashes are checked and whether it is signed is recorded. Pushing the same package
        again changes nothing (and restores its file if it went missing).

        Raises:
            ArtifactError: the package is missing, corrupt or altered, its name cannot be a
                folder name, or its name and version are registered with other content.
            SignatureError: a trusted key was given and the signature is missing or wrong.
            UsageError: ``parent`` is malformed, unknown, or the package itself; or another
                push of the same version is in progress.
            OutputWriteError: the artifact folder cannot be written.
        """
        src = Path(package)
        keys: list[Ed25519PublicKey] = list(trusted_keys or [])
        report = verify_package(src, keys or None, require_signature=bool(keys))
        pkg = open_package(src)
        ref = self._check_name_and_parent(src, pkg.manifest, parent)
        sha = sha256_file(src)
        # The lease keeps two pushes of one version apart, from the check on: a push that
        # checked before another one finished must not place its file over the other's.
        lock, owner = f"registry:{ref}", uuid.uuid4().hex
        if not self.store.acquire_lease(lock, owner, _PUSH_LEASE_S):
            raise UsageError(f"another push of {ref} is in progress",
                             hint="wait for it to finish, then push again")
        try:
            return self._push_leased(src, pkg, report, sha, keys, parent=parent, data=data,
                                     now=now)
        finally:
            self.store.release_lease(lock, owner)

    def _check_name_and_parent(self, src: Path, manifest: Manifest, parent: str | None) -> str:
        """The package's ``name:version``, once its name and ``parent`` are fit to record."""
        if not _NAME_RE.match(manifest.name):
            raise ArtifactError(
                f"{src}: model name {manifest.name!r} cannot be used in the registry",
                hint="convert again with --name made of letters, digits, '.', '_' and '-'")
        ref = f"{manifest.name}:{manifest.version}"
        if parent is not None:
            pname, pversion = parse_ref(parent, need_version=True)
            if f"{pname}:{pversion}" == ref:
                raise UsageError(f"{ref} cannot be its own parent")
            if self.store.get_model(pname, pversion) is None:
                raise UsageError(f"parent {parent} is not in the registry",
                                 hint="push the parent model first, or leave out --parent")
        return ref

    def _push_leased(self, src: Path, pkg: Package, report: VerifyReport, sha: str,
                     keys: list[Ed25519PublicKey], *, parent: str | None, data: str | None,
                     now: dt.datetime | None) -> PushResult:
        """The part of :meth:`push` done under the version's lease: place the file, record it."""
        manifest = pkg.manifest
        ref = f"{manifest.name}:{manifest.version}"
        relative = f"{manifest.name}/{manifest.version}/{PACKAGE_FILE}"
        final = self.root / relative
        staged: Path | None = None
        placed = False
        try:
            existing = self.store.get_model(manifest.name, manifest.version)
            if existing is not None and existing.sha256 != sha:
                raise ArtifactError(
                    f"{ref} is already registered with a different package"
                    f" (sha256 {existing.sha256[:12]}..., this one {sha[:12]}...)",
                    hint="give the new package a higher version (edgekit convert --version)")
            if existing is not None and self._intact(existing):
                return PushResult(existing, False, self.path_of(existing))
            staged, size = self._stage_unchanged(src, sha, keys)
            self._place(staged, final)
            placed = existing is None
            signature = pkg.signature or {}
            record = ModelRecord(
                name=manifest.name, version=manifest.version, sha256=sha, size=size,
                format=str(manifest.target["format"]), task=manifest.task, path=relative,
                manifest=manifest.to_dict(), evaluation=dict(manifest.metrics),
                signed=report.signed, signature_verified=report.key_id is not None,
                key_id=report.key_id or signature.get("key_id"), parent=parent,
                recipe=dict(manifest.recipe), data=data,
                created=as_utc(now) if now else utcnow(),
            )
            stored, created = self.store.add_model(record)
            placed = False
            return PushResult(stored, created, final)
        finally:
            if staged is not None:
                staged.unlink(missing_ok=True)
            if placed:
                # Recording failed: the file we placed belongs to no row, take it back.
                final.unlink(missing_ok=True)
                _remove_empty(final.parent, self.root)

    def _stage_unchanged(self, src: Path, sha: str,
                         keys: list[Ed25519PublicKey]) -> tuple[Path, int]:
        """A verified staged copy of ``src`` and its size; the copy is removed on an error.

        Raises:
            ArtifactError: the package changed since it was first verified.
        """
        staged, staged_sha, size = self._stage(src)
        try:
            try:
                verify_package(staged, keys or None, require_signature=bool(keys))
            except EdgekitError as err:
                raise ArtifactError(f"{src} changed while it was being pushed ({err.message})",
                                    hint="push it again once it is complete") from err
            if staged_sha != sha:
                raise ArtifactError(f"{src} changed while it was being pushed",
                                    hint="push it again once it is complete")
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        return staged, size

    def _intact(self, record: ModelRecord) -> bool:
        path = self.path_of(record)
        return path.is_file() and sha256_file(path) == record.sha256

    def _stage(self, src: Path) -> tuple[Path, str, int]:
        incoming = self.root / _INCOMING
        try:
            incoming.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="push-", suffix=".edgepkg", dir=incoming)
        except OSError as err:
            raise OutputWriteError(f"cannot write in the artifact folder {self.root}:"
                                   f" {err.strerror or err}",
                                   hint="check the --store path and its permissions") from err
        staged = Path(name)
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                for block in iter(lambda: inp.read(1 << 20), b""):
                    digest.update(block)
                    size += len(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
        except OSError as err:
            staged.unlink(missing_ok=True)
            raise OutputWriteError(f"could not copy {src} into {self.root}:"
                                   f" {err.strerror or err}",
                                   hint="check free disk space; nothing was registered") from err
        return staged, digest.hexdigest(), size

    def _place(self, staged: Path, final: Path) -> None:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
        except OSError as err:
            raise OutputWriteError(f"could not place the package at {final}:"
                                   f" {err.strerror or err}",
                                   hint="check the --store folder's permissions") from err
        fsync_dir(final.parent)


def _remove_empty(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to ``root`` while they are empty."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent

