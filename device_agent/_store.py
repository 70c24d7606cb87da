"""The model folder: verified packages on disk and the record of which one is active.

Layout::

    <model.dir>/
        packages/<name>-<version>-<sha12>.edgepkg   copies, named by content
        packages/<sha256>.staged                    a download being verified (OTA)
        active.json                                 which package serves, and the ones before
        state/                                      agent state (telemetry queue, counters)

``active.json`` is replaced atomically (temporary file, fsync, rename, fsync of the folder),
so after a crash at any point it names either the old or the new package, never neither.
It holds the active package and the previous ones, newest first (the last known good
models a rollback goes back to). Packages that no record names are pruned down to
``keep``.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.artifact import open_package, sha256_file
from edgekit.errors import ArtifactError, OutputWriteError
from edgekit.fsutil import atomic_write, fsync_dir

__all__ = ["ACTIVE_SCHEMA", "STAGED_SUFFIX", "ActiveRecord", "ModelStore", "StoredPackage"]

ACTIVE_SCHEMA = "edgekit.active-model/1"
ACTIVE_FILE = "active.json"
PACKAGES_DIR = "packages"
# Downloads wait for verification under their sha256 with this suffix, never under a name
# taken from inside the file; they are not packages of the folder (never listed or pruned).
STAGED_SUFFIX = ".staged"


@dataclass(frozen=True)
class StoredPackage:
    """A package inside the model folder."""

    path: Path
    sha256: str
    name: str
    version: str

    def to_dict(self, root: Path) -> dict[str, str]:
        return {"package": self.path.relative_to(root).as_posix(), "sha256": self.sha256,
                "name": self.name, "version": self.version}


@dataclass(frozen=True)
class ActiveRecord:
    """What ``active.json`` says: the active package and the previous ones, newest first."""

    active: StoredPackage
    previous: tuple[StoredPackage, ...]
    activated: float


class ModelStore:
    """The model folder. One writer at a time (a lock guards the methods that write).

    ``add`` copies a package in (content-addressed), ``activate`` records it as active on
    disk; loading it into a runtime and swapping it into service is the job of
    :func:`device_agent.load_model` and :class:`device_agent.ModelSlot`.
    """

    def __init__(self, root: str | os.PathLike[str], keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = max(1, keep)
        self.packages_dir = self.root / PACKAGES_DIR
        self._lock = threading.Lock()
        try:
            self.packages_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputWriteError(f"cannot create the model folder {self.root}: {exc.strerror}",
                                   hint="create it, or give a writable folder with --model-dir"
                                   ) from exc

    @property
    def active_file(self) -> Path:
        return self.root / ACTIVE_FILE

    def active(self) -> ActiveRecord | None:
        """The record, or None when no model was ever activated.

        Raises:
            ArtifactError: ``active.json`` exists but is unreadable or not a record.
        """
        try:
            doc = json.loads(self.active_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{self.active_file} is unreadable: {exc}",
                                hint="remove it and start the agent with --model PKG") from exc
        if not isinstance(doc, dict) or doc.get("schema") != ACTIVE_SCHEMA:
            raise ArtifactError(f"{self.active_file} is not an active-model record")
        try:
            active = self._entry(doc["active"])
            previous = tuple(self._entry(e) for e in doc.get("previous", []))
            activated = float(doc.get("activated", 0.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{self.active_file}: malformed entry ({exc})") from exc
        return ActiveRecord(active, previous, activated)

    def add(self, src: str | os.PathLike[str], *, sha256: str | None = None) -> StoredPackage:
        """Copy a package into the folder (once per content) and return it there.

        ``sha256``: the source's, when the caller has just computed it (a verified model's);
        else the source is hashed here. A copy is hashed again either way.

        The package is opened (manifest parsed) but not verified; verify before activating.
        A staged download of this folder (``<sha256>.staged``) is moved, not copied.

        Raises:
            ArtifactError: the file is missing or not a package.
            OutputWriteError: the copy could not be written (nothing partial is left).
        """
        source = Path(src)
        manifest = open_package(source).manifest
        digest = sha256 or sha256_file(source)
        target = self.packages_dir / f"{manifest.name}-{manifest.version}-{digest[:12]}.edgepkg"
        staged = source.parent.resolve() == self.packages_dir.resolve() and \
            source.name == f"{digest}{STAGED_SUFFIX}"
        with self._lock:
            if target.exists() and sha256_file(target) == digest:
                if staged:
                    source.unlink(missing_ok=True)
                return StoredPackage(target, digest, manifest.name, manifest.version)
            if staged:
                os.replace(source, target)
                fsync_dir(self.packages_dir)
                return StoredPackage(target, digest, manifest.name, manifest.version)
            with atomic_write(target) as out, open(source, "rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 20)
        if sha256_file(target) != digest:
            target.unlink(missing_ok=True)
            raise ArtifactError(f"{source} changed while it was copied into {self.packages_dir}")
        return StoredPackage(target, digest, manifest.name, manifest.version)

    def activate(self, package: StoredPackage, *, demote_current: bool = True) -> ActiveRecord:
        """Record ``package`` as active, atomically, and prune unreferenced packages.

        With ``demote_current`` the package that was active becomes the newest previous one
        (a normal update); without it, it is dropped from the record (it failed, so it is no
        last known good model).

        Raises:
            ArtifactError: the package is not inside this folder.
            OutputWriteError: the record could not be written; the old one stays in force.
        """
        if package.path.parent.resolve() != self.packages_dir.resolve():
            raise ArtifactError(f"{package.path} is not in {self.packages_dir}; add() it first")
        with self._lock:
            try:
                old = self.active()
            except ArtifactError:
                old = None
            chain: list[StoredPackage] = []
            if old is not None:
                if demote_current:
                    chain.append(old.active)
                chain.extend(old.previous)
            previous: list[StoredPackage] = []
            for entry in chain:
                if entry.sha256 != package.sha256 and entry.sha256 not in {p.sha256 for p in previous}:
                    previous.append(entry)
            previous = previous[: self.keep - 1]
            record = ActiveRecord(package, tuple(previous), time.time())
            doc: dict[str, Any] = {
                "schema": ACTIVE_SCHEMA,
                "active": package.to_dict(self.root),
                "previous": [p.to_dict(self.root) for p in previous],
                "activated": record.activated,
            }
            with atomic_write(self.active_file) as handle:
                handle.write(json.dumps(doc, indent=2).encode("utf-8"))
            self._prune({package.path.name, *(p.path.name for p in previous)})
        return record

    def discard(self, package: StoredPackage) -> None:
        """Remove a package that was added but refused, unless the record names it."""
        with self._lock:
            try:
                record = self.active()
            except ArtifactError:
                return
            named = set() if record is None else {
                p.path.name for p in (record.active, *record.previous)}
            if package.path.name not in named:
                package.path.unlink(missing_ok=True)

    def packages(self) -> list[Path]:
        """Package files in the folder, oldest first."""
        return sorted(self.packages_dir.glob("*.edgepkg"), key=lambda p: p.stat().st_mtime)

    def _entry(self, doc: Any) -> StoredPackage:
        rel = Path(doc["package"])
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"package path {rel} leaves the model folder")
        return StoredPackage(self.root / rel, str(doc["sha256"]), str(doc["name"]),
                             str(doc["version"]))

    def _prune(self, referenced: set[str]) -> None:
        # Unreferenced packages go, oldest first, until ``keep`` files remain; a package
        # being staged by an update is written under another suffix and never matches.
        files = [p for p in self.packages() if p.name not in referenced]
        excess = len(files) + len(referenced) - self.keep
        for path in files[: max(0, excess)]:
            path.unlink(missing_ok=True)
        fsync_dir(self.packages_dir)
