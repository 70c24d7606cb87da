"""Installing a site bundle: the signed intent and the package come from a file, not a broker.

:func:`prepare_install` puts a bundle (:mod:`edgekit.protocol.ota.bundle`) where the updater
takes over. The intent passes the same gate as a desired document from the broker, in the
same order (signature before parsing, fleet and device, expiry and replay, version floor);
the package is copied into the model folder as ``packages/<sha256>.staged`` (its name from
the sha256 the signed intent pins, checked while it is copied, never from the bundle), and
the update is journalled at the ``verifying`` step. From there the updater's own steps carry
it out (verify, stage, activate, probation, commit or roll back), with the journal's crash
safety: a kill at any point leaves a verified model in service.

Refusals at the gate's checks 1 to 3 record nothing (as for a document from the broker); a
refusal at the floor is recorded as the deployment's outcome, as online.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from edgekit.errors import EdgekitError
from edgekit.fsutil import fsync_dir
from edgekit.protocol.ota import (
    BundleParts,
    DesiredDocument,
    UpdateReason,
    UpdateStep,
    read_bundle,
)

from .._store import STAGED_SUFFIX
from .errors import UpdateFailure
from .journal import JournalStep, UpdateRecord

if TYPE_CHECKING:
    from .journal import Outcome
    from .updater import Updater

__all__ = ["BUNDLE_SOURCE", "Prepared", "prepare_install"]

BUNDLE_SOURCE = "bundle"  # the journal's ``source`` of an update installed from a bundle


@dataclass(frozen=True)
class Prepared:
    """A bundle ready for the updater, or (``done``) one with nothing left to do."""

    deployment: str
    model: dict[str, Any]
    done: Outcome | None = None


def prepare_install(path: Path, updater: Updater) -> Prepared:
    """Check a bundle's layout and intent, stage its package and journal the update.

    Call it before the updater's worker starts (the model in service is loaded, nothing
    else runs on the journal). An install of the same bundle that was interrupted is left
    in the journal as it is: the updater resumes it.

    Raises:
        ProtocolError: the file is not a well-formed bundle.
        UpdateFailure: the intent or the package is refused (the reason names the check),
            or an update is already in progress.
    """
    journal = updater.journal
    parts = read_bundle(path, max_package_bytes=updater.settings.max_artifact_bytes)
    doc = _open_intent(parts, updater)
    wanted = doc.model
    short = {"name": wanted.name, "version": wanted.version, "sha256": wanted.sha256}
    current = journal.current
    if current is not None:
        if current.deployment == doc.deployment:
            return Prepared(doc.deployment, short)  # an install that was interrupted
        raise UpdateFailure(UpdateReason.SUPERSEDED,
                            f"update {current.deployment} is in progress (step"
                            f" '{current.step}'); a bundle is installed only between updates",
                            hint="run the agent (`edgekit-agent run`) until it finishes, then"
                                 " install again")
    done = journal.outcome_of(doc.deployment)
    if done is not None:
        return Prepared(doc.deployment, short, done)
    serving = updater.slot.current
    if serving is not None and serving.sha256 == wanted.sha256:
        done = journal.record(doc.deployment, UpdateStep.SUCCEEDED.value, None,
                              "already serving this model", short)
        return Prepared(doc.deployment, short, done)
    updater.gate.check_fresh(doc)
    updater.gate.acted_on(doc)
    try:
        updater.gate.check_floor(doc, wanted.name, wanted.version)
    except UpdateFailure as refusal:
        text = f"{refusal.message} (hint: {refusal.hint})" if refusal.hint else refusal.message
        journal.record(doc.deployment, UpdateStep.FAILED.value, refusal.reason.value, text,
                       short)
        raise
    staged = _stage_package(parts, doc, updater)
    journal.begin(UpdateRecord(deployment=doc.deployment, desired=msgspec.to_builtins(doc),
                               step=JournalStep.VERIFYING.value, source=BUNDLE_SOURCE,
                               package=updater.rel(staged), sha256=wanted.sha256))
    return Prepared(doc.deployment, short)


def _open_intent(parts: BundleParts, updater: Updater) -> DesiredDocument:
    """The gate's checks 1 and 2, and what a bundle's intent must name."""
    gate = updater.gate
    serving = updater.slot.current
    if serving is not None:
        gate.ensure_floor(serving.name, serving.version)
    doc = gate.open(parts.intent)
    gate.check_bound(doc)
    wanted = doc.model
    if doc.revert or wanted.sha256 is None:
        raise UpdateFailure(UpdateReason.INVALID_DESIRED,
                            f"deployment {doc.deployment} names no package to install (a"
                            " revert or a rollback to a kept copy); a bundle carries one")
    if wanted.size != parts.package_size:
        raise UpdateFailure(UpdateReason.SHA256_MISMATCH,
                            f"the bundle's package is {parts.package_size} bytes, the signed"
                            f" intent names {wanted.size}")
    return doc


def _stage_package(parts: BundleParts, doc: DesiredDocument, updater: Updater) -> Path:
    """Copy the package to ``packages/<sha256>.staged``, checking its sha256 on the way.

    Raises:
        UpdateFailure: no_space, sha256_mismatch.
    """
    sha = doc.model.sha256
    assert sha is not None
    folder = updater.store.packages_dir
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    reserve = updater.settings.min_free_bytes
    if free - parts.package_size < reserve:
        raise UpdateFailure(UpdateReason.NO_SPACE,
                            f"the package is {parts.package_size} bytes, {free} are free in"
                            f" {folder} and {reserve} must stay free (ota.min_free_bytes)",
                            hint="free disk space, or lower model.keep")
    partial = folder / f".{sha}.part"
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for block in parts.package_blocks():
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
    except (OSError, EdgekitError) as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UpdateFailure(UpdateReason.NO_SPACE,
                                f"cannot write {partial}: {exc.strerror}") from exc
        raise
    if digest.hexdigest() != sha:
        partial.unlink(missing_ok=True)
        raise UpdateFailure(UpdateReason.SHA256_MISMATCH,
                            f"the bundle's package has sha256 {digest.hexdigest()[:16]}...,"
                            f" the signed intent names {sha[:16]}...",
                            hint="the bundle was altered or damaged; copy it again")
    target = folder / f"{sha}{STAGED_SUFFIX}"
    os.replace(partial, target)
    fsync_dir(folder)
    return target
