"""The steps of an update, the reason codes of its failures, and the events that report them.

An agent sends one ``events`` payload (:class:`edgekit.protocol.EventPayload`) per step, with
``kind`` ``update.<step>``, the reason code in ``reason`` when the step is a failure or a
rollback, and :class:`UpdateEventData` in ``data``; its status carries :class:`UpdateStatus`
in ``update`` (decoded with the status). The agent builds both through these classes, and a
reader decodes the event's data with :func:`update_data` (strict, one
:class:`~edgekit.errors.ProtocolError`). docs/ota.md draws the state machine.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from edgekit.errors import ProtocolError
from edgekit.protocol.telemetry import EventPayload, UpdateModel, UpdateStatus

__all__ = [
    "EVENT_PREFIX",
    "FINAL_STEPS",
    "UpdateEventData",
    "UpdateModel",
    "UpdateProgress",
    "UpdateReason",
    "UpdateStatus",
    "UpdateStep",
    "event_kind",
    "step_of",
    "update_data",
]

EVENT_PREFIX = "update."


class UpdateStep(StrEnum):
    """One step of an update, in the order an update goes through them."""

    QUEUED = "queued"  # a desired document asks for a model the device does not serve
    DOWNLOADING = "downloading"  # repeated with progress
    VERIFYING = "verifying"  # sha256, signature, version, runtime load, inputs and outputs
    STAGED = "staged"  # golden samples and latency passed in a second session
    SHADOW = "shadow"  # shadow mode: the candidate runs beside the model in service
    ACTIVATING = "activating"  # on-disk switch, then the in-memory swap
    PROBATION = "probation"  # serving, watched for errors, non-finite outputs, latency
    SUCCEEDED = "succeeded"  # committed as the last known good model (or already served)
    ROLLED_BACK = "rolled_back"  # the new model served and was replaced by the previous one
    FAILED = "failed"  # refused before serving; the running model never stopped
    SHADOWED = "shadowed"  # shadow mode ended: report sent, candidate dropped, never served


FINAL_STEPS = frozenset({UpdateStep.SUCCEEDED, UpdateStep.ROLLED_BACK, UpdateStep.FAILED,
                         UpdateStep.SHADOWED})


class UpdateReason(StrEnum):
    """Why an update failed or was rolled back (the event's ``reason``)."""

    INVALID_DESIRED = "invalid_desired"  # the desired document is not JSON or not valid
    UNTRUSTED_INTENT = "untrusted_intent"  # unsigned, or not signed by a trusted intent key
    NOT_FOR_DEVICE = "not_for_device"  # signed for another fleet or other devices
    EXPIRED = "expired"  # signed, but past its expiry
    REPLAYED = "replayed"  # issued before the newest document this device acted on
    RENAMED = "renamed"  # another model name than the device's floor, without allow_rename
    TOO_LARGE = "too_large"  # the artifact is larger than the device accepts
    NO_SPACE = "no_space"  # not enough free disk space for the download
    DOWNLOAD_FAILED = "download_failed"  # no server answered, or the transfer kept failing
    SHA256_MISMATCH = "sha256_mismatch"  # the downloaded file is not the one named
    UNSIGNED = "unsigned"  # the device requires signatures and the package has none
    BAD_SIGNATURE = "bad_signature"  # signature wrong, untrusted, or not the key named
    OLDER_VERSION = "older_version"  # not newer than the device's floor, no allow_downgrade
    UNAVAILABLE = "unavailable"  # a rollback to a copy the device does not keep
    INCOMPATIBLE_IO = "incompatible_io"  # inputs/outputs differ and the change is not allowed
    LOAD_FAILED = "load_failed"  # corrupt package, or the runtime cannot load the model
    GOLDEN_MISMATCH = "golden_mismatch"  # outputs on the golden samples out of tolerance
    NONFINITE_OUTPUT = "nonfinite_output"  # NaN or infinity in outputs
    SLOW = "slow"  # latency over the stage budget or the probation threshold
    PROBATION_ERRORS = "probation_errors"  # too many failed requests during probation
    INTERRUPTED = "interrupted"  # the agent stopped mid-update; it went back on restart
    SUPERSEDED = "superseded"  # a newer desired document replaced this one


Count = Annotated[int, Meta(ge=0)]


class UpdateProgress(msgspec.Struct, kw_only=True, frozen=True):
    bytes: Count
    total: Count
    percent: Annotated[float, Meta(ge=0)]


class UpdateEventData(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The ``data`` of an ``update.*`` event (an :class:`~edgekit.protocol.EventPayload`).

    A sender builds one and sends :meth:`as_data` as the event's ``data``; a reader gets it
    back with :func:`update_data`.
    """

    deployment: Annotated[str, Meta(max_length=128)]  # "" for a document too broken to name one
    step: UpdateStep  # the step of the event's kind
    model: UpdateModel | None  # the model the update is about (None: unreadable document)
    serving: UpdateModel | None  # the model in service when the event was sent
    progress: UpdateProgress | None = None  # downloading only
    # downloading: "mqtt" | "http" | "kept" (a copy on disk) | "delta"
    source: Annotated[str, Meta(max_length=16)] | None = None
    details: dict[str, Any] | None = None  # numbers behind a decision (latency, rates)

    def as_data(self) -> dict[str, Any]:
        """The event's ``data`` object."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out


def update_data(event: EventPayload) -> UpdateEventData | None:
    """The typed ``data`` of an ``update.*`` event; None for an event of another kind.

    Raises:
        ProtocolError: an ``update.*`` event whose ``data`` is missing, does not fit
            :class:`UpdateEventData`, or names another step than its kind.
    """
    step = step_of(event.kind)
    if step is None:
        return None
    try:
        data = msgspec.convert(event.data, UpdateEventData, strict=True)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"{event.kind} event data does not fit: {exc}",
                            hint="see docs/ota.md") from None
    if data.step != step:
        raise ProtocolError(f"{event.kind} event data names step {data.step.value!r}")
    return data


def event_kind(step: UpdateStep) -> str:
    """The event ``kind`` of a step, e.g. ``update.downloading``."""
    return EVENT_PREFIX + step.value


def step_of(kind: object) -> UpdateStep | None:
    """The step an event ``kind`` reports; None for an event that is not about an update."""
    if not isinstance(kind, str) or not kind.startswith(EVENT_PREFIX):
        return None
    try:
        return UpdateStep(kind[len(EVENT_PREFIX):])
    except ValueError:
        return None
