"""The steps of one update, each journalled before it acts: fetch, verify, stage, activate,
probation, and the way back (fail or roll back).

:class:`UpdateRun` carries out one :class:`~device_agent.ota.journal.UpdateRecord` from the
step the journal names, so the same code runs a fresh update and one resumed after a
restart. It is driven by :class:`~device_agent.ota.updater.Updater`.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import threading
import time
from typing import TYPE_CHECKING, Any

from edgekit.artifact import sha256_file
from edgekit.errors import ArtifactError, OutputWriteError
from edgekit.fsutil import fsync_dir
from edgekit.protocol.ota import (
    DesiredDocument,
    ShadowDesiredDocument,
    UpdateReason,
    UpdateStep,
)

from .._model import LoadedModel
from .._probation import ProbationWatch
from .._store import STAGED_SUFFIX
from .checks import check_compatible, stage, verify_package_file
from .delta import fetch_delta
from .download import DownloadSettings, HttpDownload, MqttDownload, PartialFile
from .errors import UpdateFailure
from .journal import JournalStep, UpdateRecord
from .priority import run_niced
from .shadow import run_shadow
from .throttle import Pace

if TYPE_CHECKING:
    from .updater import Updater

__all__ = ["UpdateRun", "crash_point"]

log = logging.getLogger("device_agent.ota")

CRASH_ENV = "EDGEKIT_TEST_CRASH_AT"
_PROGRESS_EVERY_S = 2.0
# Starts of verification for one update; a restart in the middle of each one means the
# package itself stops the agent, so it is refused instead of tried again forever.
MAX_VERIFY_ATTEMPTS = 3


def crash_point(name: str) -> None:
    """Fault injection for the crash-safety tests: exit at once, as kill -9 would leave the
    agent, when ``EDGEKIT_TEST_CRASH_AT`` names this point (never set in production)."""
    if os.environ.get(CRASH_ENV) == name:
        logging.shutdown()
        os._exit(137)


class UpdateRun:
    """One update, from the journal's step to an outcome."""

    def __init__(self, updater: Updater, record: UpdateRecord, doc: DesiredDocument,
                 cancel: threading.Event) -> None:
        self.u = updater
        self.slot = updater.slot
        self.store = updater.store
        self.journal = updater.journal
        self.record = record
        self.doc = doc
        self.cancel = cancel
        self.download: MqttDownload | HttpDownload | None = None
        self._last_progress_event = 0.0
        self._last_percent = -100.0
        # The package's sha256 as this run computed it (from the bytes it downloaded, or
        # finding a kept copy): the file is not hashed again to verify it (a restart is).
        self._checked_sha256: str | None = None

    # ---------------------------------------------------------------- driver

    def run(self) -> None:
        """Carry the update to an outcome; every failure before activation leaves the model
        in service as it was."""
        step = JournalStep(self.record.step)
        if step == JournalStep.PROBATION:
            self._resume_probation()
            return
        try:
            if step in (JournalStep.QUEUED, JournalStep.DOWNLOADING):
                self._fetch()
            self._check_cancel()
            self._count_verify_attempt()
            # The CPU-heavy steps yield to the requests the model in service answers.
            model = run_niced(self._verify_and_stage, self.u.settings.nice)
            self._check_cancel()
            if isinstance(self.doc, ShadowDesiredDocument):
                run_shadow(self, model, self.doc.shadow)  # reports and drops the candidate; never activates
                return
        except UpdateFailure as failure:
            if self.u.stopping.is_set():
                # The agent is shutting down: the journal keeps the step, the next start
                # resumes from there.
                log.info("update %s paused at '%s' for the shutdown", self.record.deployment,
                         self.record.step)
                return
            self._fail(failure)
            return
        except Exception as exc:  # a bug or the OS: fail the update, keep serving
            log.exception("update %s stopped", self.record.deployment)
            self._fail(UpdateFailure(UpdateReason.LOAD_FAILED,
                                     f"the update stopped: {type(exc).__name__}: {exc}"))
            return
        self._activate(model)

    def _count_verify_attempt(self) -> None:
        """Journal one more start of verification; refuse the update after too many.

        Raises:
            UpdateFailure: load_failed, when verification was interrupted too often.
        """
        attempts = self.record.verify_attempts
        if attempts >= MAX_VERIFY_ATTEMPTS:
            raise UpdateFailure(UpdateReason.LOAD_FAILED,
                                f"verification of this package was interrupted {attempts} times"
                                " (the agent stopped while checking it); refused")
        self.journal.step(JournalStep(self.record.step), verify_attempts=attempts + 1)
        crash_point("verify")

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise UpdateFailure(UpdateReason.SUPERSEDED, "a newer desired document arrived")

    # ---------------------------------------------------------------- fetch

    def _fetch(self) -> None:
        doc_model = self.doc.model
        kept = self.u.find_kept(doc_model.name, doc_model.version, doc_model.sha256)
        if kept is not None:
            self.u.emit(UpdateStep.DOWNLOADING, self.record, "using the copy kept on disk",
                        source="kept", progress=(kept.stat().st_size, kept.stat().st_size))
            # find_kept compared the copy with the document's sha256 when it names one.
            self._checked_sha256 = doc_model.sha256 or sha256_file(kept)
            self.journal.step(JournalStep.VERIFYING, source="kept",
                              package=self.u.rel(kept), sha256=self._checked_sha256)
            crash_point("verifying")
            return
        if doc_model.sha256 is None or doc_model.size is None:
            raise UpdateFailure(UpdateReason.UNAVAILABLE,
                                f"{doc_model.name} {doc_model.version} is not kept on this"
                                " device, and the rollback names no package to download",
                                hint="roll back with --package PKG")
        sha, size = doc_model.sha256, doc_model.size
        settings = self.u.settings
        if size > settings.max_artifact_bytes:
            raise UpdateFailure(UpdateReason.TOO_LARGE,
                                f"the artifact is {size} bytes, over this device's limit of"
                                f" {settings.max_artifact_bytes} (ota.max_artifact_bytes)")
        partial_path = self.store.packages_dir / f".{sha}.part"
        offset = self.record.offset if partial_path.exists() else 0
        offset = min(offset, partial_path.stat().st_size if partial_path.exists() else 0)
        self._check_space(size - offset)
        sources = self.doc.sources
        plan: list[str] = []
        if sources.url:
            plan.append("http")
        if sources.mqtt:
            plan.append("mqtt")
        if not plan:
            raise UpdateFailure(UpdateReason.UNAVAILABLE,
                                f"{doc_model.name} {doc_model.version} is not kept on this"
                                " device, and the desired document names no source")
        self.journal.step(JournalStep.DOWNLOADING, source=plan[0], offset=offset)
        self.u.emit(UpdateStep.DOWNLOADING, self.record,
                    f"resuming at byte {offset} of {size}" if offset else f"{size} bytes to fetch",
                    source=plan[0], progress=(offset, size), details={"resume_from": offset})
        partial = PartialFile(partial_path, size, direct=self.u.settings.direct_io)
        try:
            # A delta against a kept package first (device_agent/ota/delta.py); on any
            # failure it has said why and the package is downloaded.
            rebuilt = offset == 0 and fetch_delta(self, partial)
            digest: str | None = None  # the whole file's sha256, as the transfer hashed it
            for i, source in enumerate([] if rebuilt else plan):
                try:
                    digest = self._fetch_from(source, partial, offset)
                    break
                except UpdateFailure as failure:
                    if failure.reason != UpdateReason.DOWNLOAD_FAILED or i == len(plan) - 1:
                        raise
                    log.warning("%s; trying %s", failure.message, plan[i + 1])
                    offset = self.record.offset
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise UpdateFailure(UpdateReason.NO_SPACE, "the disk filled up during the"
                                    " download") from exc
            raise
        finally:
            partial.close()
            self.download = None
        # The whole file is on disk: check it is the artifact named, then give it its name.
        if digest is None:  # rebuilt from a delta
            digest = sha256_file(partial_path)
        if digest != sha:
            partial_path.unlink(missing_ok=True)
            raise UpdateFailure(UpdateReason.SHA256_MISMATCH,
                                f"the downloaded file's sha256 is {digest[:16]}..., the desired"
                                f" document names {sha[:16]}...")
        # Named by its sha256 (checked above), never by a field inside the unverified file;
        # the model folder gives it its readable name only after verification (_activate).
        self._checked_sha256 = digest
        target = self.store.packages_dir / f"{sha}{STAGED_SUFFIX}"
        os.replace(partial_path, target)
        fsync_dir(target.parent)
        self.journal.step(JournalStep.VERIFYING, package=self.u.rel(target), sha256=sha)
        crash_point("verifying")

    def _fetch_from(self, source: str, partial: PartialFile, offset: int) -> str | None:
        """Download from ``source``; returns the file's sha256, computed by the transfer from
        the bytes it wrote."""
        sha, size = self.doc.model.sha256, self.doc.model.size
        assert sha is not None and size is not None
        self.record.source = source
        settings = self.u.settings
        dl_settings = DownloadSettings(
            chunk_bytes=self.doc.sources.mqtt.chunk_size or settings.chunk_bytes
            if self.doc.sources.mqtt else settings.chunk_bytes,
            window=settings.window, request_timeout_s=settings.request_timeout_s,
            stall_timeout_s=settings.stall_timeout_s,
            pace=Pace.for_update(settings, self.doc))
        if source == "http":
            url = self.doc.sources.url
            assert url is not None
            http = HttpDownload(url, size, dl_settings, self.cancel)
            self.download = http
            http.run(partial, offset, self._progress)
            return http.digest
        mqtt_source = self.doc.sources.mqtt
        assert mqtt_source is not None
        download = self.u.mqtt_download(mqtt_source.request_topic, sha, size, dl_settings,
                                        self.cancel)
        self.download = download
        self.u.current_download = download
        try:
            download.run(partial, offset, self._progress)
        finally:
            self.u.current_download = None
        return download.digest

    def _progress(self, offset: int) -> None:
        self.journal.progress(offset)
        size = self.doc.model.size or 1
        percent = 100.0 * offset / size
        now = time.monotonic()
        if percent >= 100.0 or percent - self._last_percent >= 10.0 or \
                now - self._last_progress_event >= _PROGRESS_EVERY_S:
            self._last_percent, self._last_progress_event = percent, now
            transfer = self.download.stats if self.download is not None else {}
            self.u.emit(UpdateStep.DOWNLOADING, self.record, f"downloaded {percent:.0f}%",
                        source=self.record.source, progress=(offset, size),
                        details=dict(transfer) if percent >= 100.0 else None)
        crash_point("downloading")

    def _check_space(self, needed: int) -> None:
        folder = self.store.packages_dir
        free = shutil.disk_usage(folder).free
        reserve = self.u.settings.min_free_bytes
        if free - needed < reserve:
            raise UpdateFailure(UpdateReason.NO_SPACE,
                                f"{needed} bytes to download, {free} free in {folder} and"
                                f" {reserve} must stay free (ota.min_free_bytes)",
                                hint="free disk space, or lower model.keep",
                                details={"needed": needed, "free": free, "reserve": reserve})

    # ---------------------------------------------------------------- verify, stage

    def _verify_and_stage(self) -> LoadedModel:
        model = self._verify()
        self._check_cancel()
        self._stage(model)
        return model

    def _verify(self) -> LoadedModel:
        self.u.emit(UpdateStep.VERIFYING, self.record, "checking sha256, signature, version,"
                    " runtime and interface")
        path = self.u.abs(self.record.package)
        loader = self.slot.loader
        model = verify_package_file(path, self.doc, loader.trust, loader.options,
                                    loader.max_batch, checked_sha256=self._checked_sha256)
        serving = self.slot.current
        # The floor again, on the package itself (a resumed update too).
        self.u.gate.check_floor(self.doc, model.manifest.name, model.manifest.version)
        check_compatible(model.manifest, serving, self.doc.allow_breaking)
        return model

    def _stage(self, model: LoadedModel) -> None:
        details = stage(model, self.doc.latency_budget_ms)
        self.journal.step(JournalStep.STAGED)
        self.u.emit(UpdateStep.STAGED, self.record, "golden samples"
                    + (" and latency" if self.doc.latency_budget_ms is not None else "")
                    + " pass in a second session", details=details)
        crash_point("staged")

    # ---------------------------------------------------------------- activate, probation

    def _activate(self, model: LoadedModel) -> None:
        try:
            stored = self.store.add(model.path, sha256=model.sha256)
        except (OutputWriteError, ArtifactError) as exc:
            self._fail(UpdateFailure(UpdateReason.NO_SPACE if isinstance(exc, OutputWriteError)
                                     else UpdateReason.LOAD_FAILED, exc.message))
            return
        if stored.path != model.path:  # a staged download moved to its name in the folder
            model = dataclasses.replace(model, path=stored.path)
        previous = self.slot.stored_serving()
        self.journal.step(JournalStep.ACTIVATING, package=self.u.rel(stored.path),
                          previous=previous.to_dict(self.store.root) if previous else None)
        self.u.emit(UpdateStep.ACTIVATING, self.record, f"switching to {model.name}"
                    f" {model.version}")
        crash_point("activating")
        try:
            self.store.activate(stored)
        except (OutputWriteError, ArtifactError) as exc:
            self._fail(UpdateFailure(UpdateReason.NO_SPACE if isinstance(exc, OutputWriteError)
                                     else UpdateReason.LOAD_FAILED, exc.message))
            return
        crash_point("activated")
        old = self.slot.current
        watch = self.slot.serve(model, self.doc.probation, previous=old)
        assert watch is not None
        self.journal.step(JournalStep.PROBATION, activated=time.time())
        self.u.emit(UpdateStep.PROBATION, self.record, _probation_text(self.doc))
        crash_point("probation")
        self._watch(watch, old)

    def _resume_probation(self) -> None:
        """After a restart in probation with no previous model to go back to: watch again."""
        model = self.slot.current
        if model is None or model.sha256 != self.record.sha256:
            self.u.finish(self.record, UpdateStep.FAILED, UpdateReason.INTERRUPTED,
                          "the agent restarted during the update; the new model is not serving")
            return
        watch = self.slot.serve(model, self.doc.probation)
        assert watch is not None
        self._watch(watch, None)

    def _watch(self, watch: ProbationWatch, old: LoadedModel | None) -> None:
        new = watch.new
        while True:
            verdict = watch.verdict()
            if verdict is not None:
                break
            if self.u.stopping.is_set():
                return  # the journal says probation: the next start decides
            watch.changed.wait(min(0.5, watch.time_left() or 0.5))
            watch.changed.clear()
        if verdict.passed:
            self.slot.end_probation()
            self.u.gate.commit(new.name, new.version)
            self.u.finish(self.record, UpdateStep.SUCCEEDED, None,
                          f"{new.name} {new.version} serves; {verdict.message}",
                          details=verdict.details)
            return
        assert verdict.reason is not None
        self._rollback(verdict.reason, verdict.message, verdict.details, old)

    def _rollback(self, reason: UpdateReason, message: str, details: dict[str, Any],
                 old: LoadedModel | None) -> None:
        """Put the previous model back on disk and in service."""
        previous = self.record.previous
        if previous is None or old is None:
            self.slot.end_probation()
            self.u.finish(self.record, UpdateStep.FAILED, reason,
                          f"{message}; there is no previous model to go back to, so the new"
                          " one keeps serving", details=details)
            return
        self.journal.step(JournalStep.ROLLING_BACK, reason=reason.value)
        crash_point("rolling_back")
        self.slot.rollback(self.u.stored_from(previous), old)
        self.u.finish(self.record, UpdateStep.ROLLED_BACK, reason,
                      f"{message}; back to {old.name} {old.version}", details=details)

    def _fail(self, failure: UpdateFailure) -> None:
        self.u.discard_files(self.record, self.doc)
        self.u.finish(self.record, UpdateStep.FAILED, failure.reason, failure.message,
                      details=failure.details, hint=failure.hint)


def _probation_text(doc: DesiredDocument) -> str:
    p = doc.probation
    parts = []
    if p.requests:
        parts.append(f"{p.requests} requests")
    if p.seconds:
        parts.append(f"{p.seconds:g} s")
    return "watching the new model for " + (" or ".join(parts) or "no time (no probation)")

