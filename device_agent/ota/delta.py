"""Fetching an update as a delta against a package this device keeps (docs/ota.md, "Delta
updates").

When the signed desired document lists a delta whose base this device keeps, the delta is
downloaded like a package (MQTT chunks or HTTP Range, capped at its named size, checked
against its named sha256) and applied with :func:`edgekit.delta.apply_delta` into the
update's partial file; the caller then checks the rebuilt file's sha256 against the
document's as for any download. Anything wrong (no base kept, a server without the delta, a
corrupt or hostile delta, a rebuild that does not hash right) ends in an event that says why,
and the full package is fetched instead. Nothing here is journalled: after a restart the
update starts its fetch again, with the delta first.
"""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.artifact import sha256_file
from edgekit.delta import ApplyStats, apply_delta
from edgekit.errors import ArtifactError, ProtocolError
from edgekit.protocol.ota import DeltaSource, UpdateReason, UpdateStep

from .download import DownloadSettings, HttpDownload, PartialFile
from .errors import UpdateFailure

if TYPE_CHECKING:
    from .steps import UpdateRun

__all__ = ["fetch_delta"]

log = logging.getLogger("device_agent.ota")

_DELTA_STALL_S = 30.0  # a delta nobody serves is given up sooner than a package


def fetch_delta(run: UpdateRun, partial: PartialFile) -> bool:
    """Rebuild the update's package into ``partial`` from a delta; False (with an event that
    says why) when there is none to use or it failed, so the caller downloads the package.

    Raises:
        UpdateFailure: superseded (a newer document arrived) or no_space; every other
            failure falls back to the full package.
    """
    deltas = run.doc.sources.deltas or []
    if not deltas:
        return False
    choice = _choose(run, deltas)
    if choice is None:
        _fall_back(run, "no package this device keeps is the base of a listed delta")
        return False
    entry, base = choice
    folder = run.store.packages_dir
    delta_path = folder / f".{entry.sha256}.delta-part"
    scratch = folder / ".delta-scratch"
    try:
        _download(run, entry, delta_path)
        digest = sha256_file(delta_path)
        if digest != entry.sha256:
            raise ArtifactError(f"the delta's sha256 is {digest[:16]}..., the desired document"
                                f" names {entry.sha256[:16]}...")
        stats = _apply(run, delta_path, base, partial, scratch)
    except UpdateFailure as failure:
        if failure.reason in (UpdateReason.SUPERSEDED, UpdateReason.NO_SPACE):
            raise
        _fall_back(run, failure.message)
        return False
    except (ArtifactError, ProtocolError) as exc:
        _fall_back(run, exc.message)
        return False
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UpdateFailure(UpdateReason.NO_SPACE, "the disk filled up while the delta was"
                                " applied") from exc
        _fall_back(run, f"{type(exc).__name__}: {exc}")
        return False
    finally:
        delta_path.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
    size = run.doc.model.size or 0
    run.u.emit(UpdateStep.DOWNLOADING, run.record,
               f"rebuilt from a {entry.size}-byte delta against {entry.base_sha256[:12]}",
               source="delta", progress=(size, size),
               details={"delta": {"base_sha256": entry.base_sha256, "bytes": entry.size,
                                  "copied": stats.copied, "inserted": stats.inserted}})
    return True


def _choose(run: UpdateRun, deltas: list[DeltaSource]) -> tuple[DeltaSource, Path] | None:
    """The first listed delta whose base this device keeps (hash checked), within its size
    limit and smaller than the package."""
    model = run.doc.model
    for entry in deltas:
        if entry.size >= (model.size or 0) or \
                entry.size > run.u.settings.max_artifact_bytes:
            continue
        base = run.u.find_kept(model.name, model.version, entry.base_sha256)
        if base is not None:
            return entry, base
    return None


def _download(run: UpdateRun, entry: DeltaSource, path: Path) -> None:
    settings = run.u.settings
    dl = DownloadSettings(chunk_bytes=settings.chunk_bytes, window=settings.window,
                          request_timeout_s=settings.request_timeout_s,
                          stall_timeout_s=min(settings.stall_timeout_s, _DELTA_STALL_S))
    partial = PartialFile(path, entry.size, direct=settings.direct_io)
    try:
        if entry.url is not None:
            try:
                HttpDownload(entry.url, entry.size, dl, run.cancel).run(
                    partial, 0, _no_progress)
                return
            except UpdateFailure as failure:
                if failure.reason != UpdateReason.DOWNLOAD_FAILED or \
                        entry.request_topic is None:
                    raise
        if entry.request_topic is None:
            return
        download = run.u.mqtt_download(entry.request_topic, entry.sha256, entry.size,
                                       dl, run.cancel)
        run.u.current_download = download
        try:
            download.run(partial, 0, _no_progress)
        finally:
            run.u.current_download = None
    finally:
        partial.close()


def _apply(run: UpdateRun, delta_path: Path, base: Path, partial: PartialFile,
           scratch: Path) -> ApplyStats:
    from .steps import crash_point  # imported here: the steps module imports this one

    model = run.doc.model
    assert model.sha256 is not None and model.size is not None
    scratch.mkdir(exist_ok=True)
    partial.truncate(0)
    position = 0

    def write(block: bytes) -> None:
        nonlocal position
        partial.write_at(position, block)
        position += len(block)

    with open(delta_path, "rb") as delta:
        stats = apply_delta(delta, base, write, scratch, target_sha256=model.sha256,
                            target_size=model.size,
                            checkpoint=lambda: crash_point("rebuilding"))
    partial.sync()
    return stats


def _no_progress(_offset: int) -> None:
    """The delta's progress is not journalled: a restart fetches it again from the start."""


def _fall_back(run: UpdateRun, why: str) -> None:
    log.warning("delta update not used: %s; fetching the full package", why)
    run.u.emit(UpdateStep.DOWNLOADING, run.record,
               f"delta not used ({why}); fetching the full package",
               source="delta", details={"delta": {"fallback": why}})
