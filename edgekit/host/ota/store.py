"""The packages a host offers to devices, by sha256 (what the MQTT and HTTP servers read)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from edgekit.artifact import open_package, sha256_file
from edgekit.errors import ArtifactError

__all__ = ["ArtifactInfo", "ArtifactStore"]


@dataclass(frozen=True)
class ArtifactInfo:
    """A registered package: where it is and what it is."""

    sha256: str
    size: int
    path: Path
    name: str
    version: str
    key_id: str | None  # the key id its signature names (not checked here), or None


class ArtifactStore:
    """A thread-safe map from sha256 to package file."""

    def __init__(self) -> None:
        self._items: dict[str, ArtifactInfo] = {}
        self._lock = threading.Lock()

    def add(self, path: str | os.PathLike[str]) -> ArtifactInfo:
        """Register a package file (its manifest is parsed, its sha256 computed).

        Raises:
            ArtifactError: the file is missing or is not an edgekit package.
        """
        p = Path(path).resolve()
        pkg = open_package(p)
        signature = pkg.signature or {}
        kid = signature.get("key_id")
        info = ArtifactInfo(sha256=sha256_file(p), size=p.stat().st_size, path=p,
                            name=pkg.manifest.name, version=pkg.manifest.version,
                            key_id=kid if isinstance(kid, str) else None)
        with self._lock:
            self._items[info.sha256] = info
        return info

    def add_delta(self, path: str | os.PathLike[str], sha256: str, size: int,
                  target: ArtifactInfo) -> ArtifactInfo:
        """Register a delta file (:mod:`edgekit.host.ota.delta`) that rebuilds ``target``;
        served like a package, by its own sha256.

        Raises:
            ArtifactError: the file is missing or not of ``size`` bytes.
        """
        p = Path(path).resolve()
        try:
            actual = p.stat().st_size
        except OSError as exc:
            raise ArtifactError(f"cannot read the delta {p}: {exc.strerror}") from exc
        if actual != size:
            raise ArtifactError(f"the delta {p} is {actual} bytes, not {size}")
        info = ArtifactInfo(sha256=sha256, size=size, path=p, name=target.name,
                            version=target.version, key_id=None)
        with self._lock:
            self._items[sha256] = info
        return info

    def remove(self, sha256: str) -> ArtifactInfo | None:
        with self._lock:
            return self._items.pop(sha256, None)

    def get(self, sha256: str) -> ArtifactInfo | None:
        with self._lock:
            return self._items.get(sha256)

    def infos(self) -> list[ArtifactInfo]:
        with self._lock:
            return list(self._items.values())

    def read(self, sha256: str, offset: int, length: int) -> tuple[ArtifactInfo, bytes]:
        """Read up to ``length`` bytes at ``offset`` of a registered artifact.

        Raises:
            KeyError: no artifact has this sha256.
            ArtifactError: the file is gone or its size changed since it was registered
                (it was replaced; serving it would hand out the wrong bytes).
        """
        info = self._items[sha256]
        try:
            with open(info.path, "rb") as handle:
                if os.fstat(handle.fileno()).st_size != info.size:
                    raise ArtifactError(f"{info.path} changed since it was registered")
                return info, os.pread(handle.fileno(), max(0, min(length, info.size - offset)),
                                      offset)
        except OSError as exc:
            raise ArtifactError(f"cannot read {info.path}: {exc.strerror}") from exc
