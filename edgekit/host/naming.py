"""Default model names and versions for ``edgekit convert``, from the registry.

A name is explicit (``--name``) or stable: the name the registry already has for the same
source (same file hash, or same path), else the file's stem, said out loud. A version is
explicit (``--version``) or the next patch after the registry's highest version of that
name; ``0.1.0`` for a name the registry has not seen. Semantic versions by default mean a
later ``--version 1.0.0`` or ``rollback --to 1.2.0`` stays in order with what came before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.manifest import parse_version

if TYPE_CHECKING:
    from edgekit.host.db import ModelRecord

__all__ = ["FIRST_VERSION", "Naming", "next_patch", "registry_records", "resolve_naming"]

FIRST_VERSION = "0.1.0"


@dataclass
class Naming:
    """The name and version a conversion gets, and what the user should be told."""

    name: str
    version: str
    notices: list[str] = field(default_factory=list)


def next_patch(version: str) -> str:
    """``1.2.3`` -> ``1.2.4``; a shorter version is padded first (``2`` -> ``2.0.1``).

    Raises:
        ArtifactError: the version is not dotted digits.
    """
    major, minor, patch = (list(parse_version(version)) + [0, 0, 0])[:3]
    return f"{major}.{minor}.{patch + 1}"


def registry_records(db_url: str | None) -> list[ModelRecord]:
    """Every registered model, or none when no registry database exists yet (a plain
    ``convert`` must not create one)."""
    from edgekit.host.db import Store
    from edgekit.host.db._engine import ENV_DB, default_db_url

    url = db_url or default_db_url()
    if not db_url and not os.environ.get(ENV_DB):
        local = Path(url.removeprefix("sqlite:///"))
        if not local.is_file():
            return []
    store = Store(url)
    try:
        return store.list_models()
    finally:
        store.close()


def resolve_naming(*, name: str | None, version: str | None, stem: str,
                   source_sha256: str | None, source_ref: str | None,
                   records: list[ModelRecord]) -> Naming:
    """Pick the name and version (see the module docstring)."""
    notices: list[str] = []
    if name is None:
        same = [r for r in records if _same_source(r, source_sha256, source_ref)]
        if same:
            name = same[-1].name
            notices.append(f"naming the model {name!r}: the registry has this source under"
                           " that name (--name to choose another)")
        else:
            name = stem
            known = sorted({r.name for r in records})
            also = f"; the registry has: {', '.join(known)}" if known else ""
            notices.append(f"naming the model {name!r} after the file (--name to choose"
                           f"{', so a new file keeps its fleet' if known else ''}){also}")
    if version is None:
        versions = [r.version for r in records if r.name == name]
        if versions:
            highest = max(versions, key=parse_version)
            version = next_patch(highest)
            notices.append(f"version {version}: the next patch after {name} {highest} in the"
                           " registry (--version to choose)")
        else:
            version = FIRST_VERSION
    return Naming(name, version, notices)


def _same_source(record: ModelRecord, sha: str | None, ref: str | None) -> bool:
    source = record.manifest.get("source") or {}
    if sha and source.get("sha256") == sha:
        return True
    return bool(ref) and source.get("reference") == ref
