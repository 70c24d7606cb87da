"""Shadow evaluation: the request in a desired document, and the report a device sends back.

A desired document of schema :data:`SHADOW_DESIRED_SCHEMA` (otherwise the same fields as
``edgekit.desired/2``, plus ``shadow``) asks a device to fetch and verify a candidate as
for an update, then run it beside the model in service on a sample of live requests
instead of activating it. The schema differs on purpose: an agent that does not know shadow
mode refuses the document instead of serving the candidate. Example of the ``shadow``
field::

    {"requests": 200, "sample": 0.2, "seconds": 600.0}

``requests`` shadowed requests end it (or ``seconds``, or a newer desired document), then
the device sends ``update.shadowed`` with a :class:`ShadowReport` in
``data.details.shadow`` and drops the candidate. The model in service never changes.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from edgekit.errors import ProtocolError
from edgekit.protocol.codec import Document, decode, encode, field_error

__all__ = [
    "SHADOW_DESIRED_SCHEMA",
    "SHADOW_REPORT_SCHEMA",
    "ModelFigures",
    "ShadowReport",
    "ShadowSpec",
    "make_shadow",
    "parse_shadow_report",
]

SHADOW_DESIRED_SCHEMA = "edgekit.desired-shadow/1"
SHADOW_REPORT_SCHEMA = "edgekit.shadow/1"
MAX_SHADOW_REQUESTS = 1_000_000
MAX_SHADOW_SECONDS = 7 * 86400.0
_REPORT_MAX_BYTES = 16 * 1024


class ShadowSpec(msgspec.Struct, kw_only=True, frozen=True):
    """The ``shadow`` field of a shadow desired document; every field is always encoded."""

    # shadowed requests that end the evaluation
    requests: Annotated[int, Meta(ge=1, le=MAX_SHADOW_REQUESTS)]
    # share of live requests the candidate also runs (0 < sample <= 1)
    sample: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.2
    # the longest it runs, whatever the count
    seconds: Annotated[float, Meta(gt=0.0, le=MAX_SHADOW_SECONDS)] = 600.0


def make_shadow(requests: int = 200, sample: float = 0.2, seconds: float = 600.0) -> ShadowSpec:
    """A checked ``shadow`` field.

    Raises:
        ProtocolError: a value is out of range; the message names it (``desired.shadow.<key>``).
    """
    spec = ShadowSpec(requests=requests, sample=float(sample), seconds=float(seconds))
    try:
        return msgspec.convert(msgspec.to_builtins(spec), ShadowSpec, strict=True)
    except msgspec.ValidationError as exc:
        raise ProtocolError(field_error(str(exc), "desired.shadow")) from None


_Rate = Annotated[float, Meta(ge=0.0, le=1.0)]
_Ms = Annotated[float, Meta(ge=0.0, le=3.6e6)]
_Count = Annotated[int, Meta(ge=0, le=2**53)]


class ModelFigures(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One model's figures over the shadowed requests."""

    name: Annotated[str, Meta(max_length=256)]
    version: Annotated[str, Meta(max_length=64)]
    sha256: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
    accuracy: _Rate | None = None  # on the labelled requests (feedback), None without labels
    f1: _Rate | None = None  # macro F1 on the labelled requests
    confidence: _Rate | None = None  # mean top-class probability (classifiers)
    latency_p50_ms: _Ms | None = None
    latency_p95_ms: _Ms | None = None
    errors: _Count = 0  # requests this model failed on


class ShadowReport(Document, tag=SHADOW_REPORT_SCHEMA, kw_only=True):
    """What a device measured while a candidate ran beside the model in service.

    ``agreement`` is the share of rows where both classifiers give the same top class, or
    the mean cosine similarity of the two models' outputs for embeddings (``kind``), None
    when nothing was compared. ``ended``: ``requests`` (the count was reached), ``timeout``,
    ``superseded`` (a newer desired document) or ``stopped``.
    """

    max_bytes: ClassVar[int] = _REPORT_MAX_BYTES

    deployment: Annotated[str, Meta(max_length=64)]
    kind: Literal["classifier", "embedding", "other"]
    target: _Count  # the requests asked for
    requests: _Count  # requests both models answered
    rows: _Count  # rows compared (a request may carry several)
    offered: _Count  # requests the serving model answered while the shadow ran
    dropped: _Count  # sampled requests dropped because the shadow queue was full
    agreement: Annotated[float, Meta(ge=-1.0, le=1.0)] | None = None
    labelled: _Count = 0  # rows with feedback that both models predicted
    ended: Literal["requests", "timeout", "superseded", "stopped"]
    serving: ModelFigures
    candidate: ModelFigures

    @property
    def complete(self) -> bool:
        return self.requests >= self.target

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out


def parse_shadow_report(data: Any) -> ShadowReport:
    """A report read from an event's ``data.details.shadow`` (a device's claim: hostile).

    Raises:
        ProtocolError: over the size cap, or not a valid ``edgekit.shadow/1`` report.
    """
    if not isinstance(data, dict):
        raise ProtocolError("the shadow report is not an object")
    try:
        payload = encode(data)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"the shadow report cannot be read: {exc}") from None
    return decode(payload, ShadowReport)
