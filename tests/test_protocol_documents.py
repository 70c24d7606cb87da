"""The device documents of edgekit.protocol: round trips, bounds, size caps and schemas."""

from __future__ import annotations

import copy
import re
from typing import Any

import msgspec
import numpy as np
import pytest

import edgekit.protocol as protocol
from edgekit.errors import ProtocolError
from edgekit.protocol import (
    DeviceState,
    Document,
    ErrorCode,
    ErrorInfo,
    EventLevel,
    EventPayload,
    FeedbackMessage,
    FeedbackReply,
    HardwareInfo,
    LatencySection,
    MetricsPayload,
    ModelRef,
    PredictionsSection,
    PredictReply,
    PredictRequest,
    QualitySection,
    RequestsSection,
    RuntimeInfo,
    SamplePayload,
    Schema,
    StatusPayload,
    SystemSection,
    TelemetrySection,
    decode,
    encode,
    encode_array,
    schema_of,
)
from edgekit.protocol.ota import UpdateModel, UpdateStatus

MODEL = ModelRef(name="digits", version="1.0.0", sha256="ab" * 32, format="onnx",
                 runtime="onnxruntime")
HARDWARE = HardwareInfo(hostname="pi-1", system="Linux", machine="aarch64", release="6.6",
                        os="Debian GNU/Linux 12", board="Raspberry Pi 5", cpu_count=4,
                        memory_total_bytes=8 << 30, python="3.11.2")


def documents() -> dict[str, Document]:
    """One valid instance of every device document, by a short name."""
    return {
        "status": StatusPayload(
            state=DeviceState.ONLINE, device="pi-1", fleet="lab", session=7, ts=1.7e9,
            agent_version="0.1.0", hardware=HARDWARE, model=MODEL, http="127.0.0.1:8080",
            started=1.7e9, update=UpdateStatus(deployment="r1-ab", step="succeeded",
                                               model=UpdateModel(name="digits")),
            runtimes=[RuntimeInfo(key="onnxruntime", format="onnx", available=True,
                                  version="1.32", providers=["CPUExecutionProvider"])]),
        "metrics": MetricsPayload(
            device="pi-1", fleet="lab", seq=412, ts=1.7e9, interval_s=10.0, model=MODEL,
            requests=RequestsSection(total=5, interval=2, errors_total=1, errors_interval=0,
                                     by_channel={"http": 2}, errors_by_code={}),
            latency=LatencySection(count=2, mean_ms=0.2, p50_ms=0.2, p95_ms=0.3, p99_ms=0.3),
            throughput_rps=0.2,
            system=SystemSection(cpu_percent=3.0, rss_bytes=1 << 26, memory_percent=2.0,
                                 temperature_c=None, load1=0.1),
            predictions=PredictionsSection(count=2, histogram={"digit-3": 2},
                                           mean_confidence=0.9),
            quality=QualitySection(window=500, labels=2, accuracy=1.0, f1_macro=1.0,
                                   confusion=[[1, 0], [0, 1]], feedback_total=2,
                                   feedback_rejected=0),
            telemetry=TelemetrySection(queue_depth=0, dropped_total=0)),
        "event": EventPayload(device="pi-1", fleet="lab", seq=9, session=7, ts=1.7e9,
                              kind="model.activated", level=EventLevel.INFO,
                              message="serving digits 1.0.0", reason="ok",
                              data={"model": MODEL.as_dict()}),
        "sample": SamplePayload(device="pi-1", fleet="lab", seq=3, ts=1.7e9,
                                prediction_id="3fa1-88", model=MODEL,
                                inputs={"x": encode_array(np.ones((1, 4), np.float32))},
                                label=[3], prediction=[5]),
        "predict": PredictRequest(request_id="r1", reply_to="app/replies",
                                  inputs={"x": [[1.0, 2.0]],
                                          "y": encode_array(np.zeros(2, np.int8))},
                                  outputs="encoded"),
        "reply": PredictReply(request_id="r1", ok=True, prediction_id="p-1", model=MODEL,
                              outputs={"y": [[0.1, 0.9]]}, classes=[1], labels=["one"],
                              confidence=[0.9]),
        "error-reply": PredictReply(request_id="r2", ok=False,
                                    error=ErrorInfo(code=ErrorCode.NO_MODEL, message="none")),
        "feedback": FeedbackMessage(prediction_id="p-1", labels=[1, "digit-2"],
                                    request_id="f1", reply_to="app/replies"),
        "feedback-reply": FeedbackReply(request_id="f1", ok=True),
    }


def test_every_document_round_trips() -> None:
    for name, doc in documents().items():
        back = decode(encode(doc), type(doc))
        assert back == doc, name


def test_schema_strings_stay_what_the_wire_carries() -> None:
    expected = {StatusPayload: Schema.STATUS, MetricsPayload: Schema.METRICS,
                EventPayload: Schema.EVENT, SamplePayload: Schema.SAMPLE,
                PredictRequest: Schema.PREDICT_REQUEST, PredictReply: Schema.PREDICT_REPLY,
                FeedbackMessage: Schema.FEEDBACK, FeedbackReply: Schema.FEEDBACK_REPLY}
    for cls, schema in expected.items():
        assert schema_of(cls) == schema.value
        assert msgspec.json.decode(encode(documents_of(cls)))["schema"] == schema.value
    public = [getattr(protocol, n) for n in protocol.__all__]
    docs = [c for c in public if isinstance(c, type) and issubclass(c, Document)
            and c is not Document]
    assert set(docs) == set(expected)
    for cls in docs:
        assert re.fullmatch(r"edgekit\.[a-z-]+/[0-9]+", schema_of(cls))
        assert 0 < cls.max_bytes <= 64 * 1024 * 1024


def documents_of(cls: type[Document]) -> Document:
    return next(d for d in documents().values() if type(d) is cls)


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    *parents, last = path.split(".")
    target: Any = out
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return out


# (document, field to spoil, bad value, where msgspec says the error is)
BOUNDS = [
    ("status", "session", -1, "$.session"), ("status", "device", "a/b", "$.device"),
    ("status", "fleet", "_fleet", "$.fleet"), ("status", "state", "dancing", "$.state"),
    ("status", "model.sha256", "xyz", "$.model.sha256"),
    ("status", "model.name", "", "$.model.name"),
    ("status", "hardware.cpu_count", -2, "$.hardware.cpu_count"),
    ("status", "agent_version", "v" * 65, "$.agent_version"),
    ("status", "runtimes.0.available", "yes", "$.runtimes[0].available"),
    ("status", "update.step", "", "$.update.step"),
    ("status", "update.deployment", 7, "$.update.deployment"),
    ("status", "update.model.sha256", "zz", "$.update.model.sha256"),
    ("status", "update.message", "m" * (16 * 1024 + 1), "$.update.message"),
    ("metrics", "seq", -1, "$.seq"), ("metrics", "seq", "nine", "$.seq"),
    ("metrics", "quality.accuracy", 1.5, "$.quality.accuracy"),
    ("metrics", "requests.total", -3, "$.requests.total"),
    ("metrics", "throughput_rps", -1.0, "$.throughput_rps"),
    ("metrics", "latency.count", 0.5, "$.latency.count"),
    ("metrics", "quality.confusion", [[1]] * 33, "$.quality.confusion"),
    ("event", "kind", "", "$.kind"), ("event", "kind", "k" * 65, "$.kind"),
    ("event", "level", "loud", "$.level"), ("event", "message", "m" * 2001, "$.message"),
    ("event", "reason", "r" * 65, "$.reason"), ("event", "session", -1, "$.session"),
    ("sample", "prediction_id", "", "$.prediction_id"), ("sample", "inputs", {}, "$.inputs"),
    ("sample", "inputs.x.dtype", "object", "$.inputs[...].dtype"),
    ("sample", "inputs.x.shape", [-1], "$.inputs[...].shape[0]"),
    ("sample", "label", "3", "$.label"),
    ("predict", "request_id", "r" * 129, "$.request_id"),
    ("predict", "reply_to", "", "$.reply_to"), ("predict", "outputs", "pdf", "$.outputs"),
    ("predict", "inputs", [1, 2], "$.inputs"), ("predict", "inputs.x", "text", "$.inputs[...]"),
    ("feedback", "prediction_id", "p" * 129, "$.prediction_id"),
    ("feedback", "labels", [True], "$.labels[0]"), ("reply", "ok", "yes", "$.ok"),
    ("error-reply", "error.code", "oops", "$.error.code"),
]


@pytest.mark.parametrize(("name", "path", "value", "where"), BOUNDS,
                         ids=[f"{n}.{p}" for n, p, _, _ in BOUNDS])
def test_each_bound_is_refused_naming_the_field(name: str, path: str, value: Any,
                                                where: str) -> None:
    doc = documents()[name]
    bad = _set(msgspec.to_builtins(doc), path, value)
    with pytest.raises(ProtocolError) as info:
        decode(msgspec.json.encode(bad), type(doc))
    assert info.value.message.endswith(f"at `{where}`")
    assert schema_of(type(doc)) in info.value.message


def test_oversize_is_refused_before_parsing() -> None:
    for cls in (StatusPayload, MetricsPayload, EventPayload, FeedbackMessage):
        payload = b"{" + b" " * cls.max_bytes  # not JSON either: the size is checked first
        with pytest.raises(ProtocolError, match=f"over the {cls.max_bytes}-byte limit"):
            decode(payload, cls)
    small = encode(documents()["event"])
    with pytest.raises(ProtocolError, match="over the 10-byte limit"):
        decode(small, EventPayload, max_bytes=10)


def test_unknown_or_missing_schema_is_refused() -> None:
    status = msgspec.to_builtins(documents()["status"])
    for schema in ("edgekit.status/2", "edgekit.unknown/1", "", 7):
        with pytest.raises(ProtocolError, match=r"\$\.schema"):
            decode(msgspec.json.encode({**status, "schema": schema}), StatusPayload)
    with pytest.raises(ProtocolError, match="missing required field `schema`"):
        decode(msgspec.json.encode({k: v for k, v in status.items() if k != "schema"}),
               StatusPayload)
    with pytest.raises(ProtocolError, match="edgekit.status/1"):
        decode(encode(documents()["status"]), MetricsPayload)
    # The HTTP API takes a body without ``schema``, but never one of another schema.
    body = {"inputs": {"x": [[1.0]]}}
    assert decode(msgspec.json.encode(body), PredictRequest, require_schema=False).inputs == \
        body["inputs"]
    with pytest.raises(ProtocolError):
        decode(msgspec.json.encode({**body, "schema": "edgekit.feedback/1"}), PredictRequest,
               require_schema=False)


def test_not_json_and_not_objects_are_protocol_errors() -> None:
    for raw in (b"\xff", b"{", b"[1, 2]", b"null", b"", "\u00e9"):
        with pytest.raises(ProtocolError):
            decode(raw, MetricsPayload)


def test_newer_minor_revision_is_accepted() -> None:
    doc = msgspec.to_builtins(documents()["event"])
    doc["added_later"] = {"any": "thing"}
    assert decode(msgspec.json.encode(doc), EventPayload) == documents()["event"]
    # An event without ``session`` (an older agent) is session 0.
    del doc["session"]
    assert decode(msgspec.json.encode(doc), EventPayload).session == 0


def test_an_older_agents_status_update_still_decodes() -> None:
    """The ``update`` an agent sent before it was typed (a dict with every key, nulls in
    the model) decodes as :class:`UpdateStatus`."""
    status = msgspec.to_builtins(documents()["status"])
    status["update"] = {"deployment": "r1-ab", "step": "failed", "message": "refused",
                        "model": {"name": "digits", "version": None, "sha256": None},
                        "reason": "bad_signature"}
    update = decode(msgspec.json.encode(status), StatusPayload).update
    assert update == UpdateStatus(deployment="r1-ab", step="failed", message="refused",
                                  model=UpdateModel(name="digits"), reason="bad_signature")
    del status["update"]
    assert decode(msgspec.json.encode(status), StatusPayload).update is None


def test_an_http_error_body_reads_as_a_predict_reply() -> None:
    """The agent's HTTP error body carries no request id (the connection pairs it); a reader
    of /predict answers takes it as a refused prediction, not as garbage."""
    from edgekit.protocol import PredictReply, decode

    body = b'{"ok": false, "error": {"code": "no_model", "message": "no model is active"}}'
    reply = decode(body, PredictReply, require_schema=False)
    assert reply.ok is False and reply.error is not None and reply.error.code == "no_model"
    assert reply.request_id == ""
