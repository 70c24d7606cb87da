"""The agent in process: predict, feedback, trust, the model folder and the hot swap."""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from _agent_support import Models
from _digits import INT8_QUANT
from msgspec import to_builtins

from device_agent import Agent, ModelStore, RequestError, load_config
from edgekit.artifact import open_package, write_package
from edgekit.errors import (
    ArtifactError,
    InputError,
    RuntimeBackendError,
    SignatureError,
    UsageError,
)
from edgekit.metrics import classification_report
from edgekit.protocol import ErrorCode, Kind, Schema


def make_agent(tmp_path: Path, **overrides: object) -> Agent:
    base = {"model.dir": str(tmp_path / "models"), "telemetry.interval_s": 0.0}
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return Agent(load_config(env={}, overrides=base))


def test_predict_matches_the_runtime_and_ids_are_unique(tmp_path: Path, models: Models) -> None:
    x, y = models.data
    agent = make_agent(tmp_path, model__package=str(models.unsigned_v1), model__allow_unsigned=True)
    try:
        pkg = open_package(models.unsigned_v1)
        import onnxruntime as ort

        sess = ort.InferenceSession(pkg.model_bytes(), providers=["CPUExecutionProvider"])
        expected = sess.run(["probs"], {"x": x[:16]})[0]
        p = agent.predict({"x": x[:16]})
        np.testing.assert_allclose(p.outputs["probs"], expected, rtol=1e-6)
        assert list(p.classes) == list(expected.argmax(axis=1))
        assert p.labels == [f"digit-{c}" for c in expected.argmax(axis=1)]
        np.testing.assert_allclose(p.confidence, expected.max(axis=1), rtol=1e-6)
        ids = {agent.predict({"x": x[i : i + 1]}).id for i in range(50)}
        assert len(ids) == 50 and p.id not in ids
        assert agent.model is not None and agent.model.ref.version == "1.0.0"
        metrics = to_builtins(agent.tick())
        assert metrics["requests"]["interval"] == 51 and metrics["requests"]["by_channel"] == {
            "python": 51}
        assert metrics["predictions"]["count"] == 16 + 50
        hist = {f"digit-{c}": int(n) for c, n in enumerate(np.bincount(
            np.concatenate([expected.argmax(axis=1),
                            sess.run(["probs"], {"x": x[:50]})[0].argmax(axis=1)]),
            minlength=10)) if n}
        assert metrics["predictions"]["histogram"] == hist
        assert metrics["latency"]["count"] == 51 and metrics["latency"]["p99_ms"] > 0
    finally:
        agent.stop()


def test_bad_inputs_are_refused_and_the_agent_keeps_serving(tmp_path: Path, models: Models) -> None:
    x, _ = models.data
    agent = make_agent(tmp_path, model__package=str(models.unsigned_v1), model__allow_unsigned=True)
    try:
        bad = [{"x": x[:2, :60]}, {"y": x[:2]}, {"x": x[:2].astype(str)}, {"x": [[1, 2], [3]]},
               {"x": np.full((1, 64), np.inf, np.float32)}, {"x": np.zeros((300, 64))}]
        for feeds in bad:
            with pytest.raises(InputError):
                agent.predict(feeds)
        assert agent.predict({"x": x[:1]}).classes is not None
        metrics = to_builtins(agent.tick())
        assert metrics["requests"]["errors_interval"] == len(bad)
        assert metrics["requests"]["errors_by_code"] == {"invalid_input": len(bad)}
        assert metrics["requests"]["interval"] == 1
    finally:
        agent.stop()


def test_feedback_drives_the_window_metrics(tmp_path: Path, models: Models) -> None:
    x, y = models.data
    agent = make_agent(tmp_path, model__package=str(models.unsigned_v1), model__allow_unsigned=True,
                       quality__window=200)
    try:
        test_x, test_y = x[1300:1500], y[1300:1500]
        preds = [agent.predict({"x": test_x[i : i + 1]}) for i in range(len(test_x))]
        predicted = [int(p.classes[0]) for p in preds]
        for p, label in zip(preds[:100], test_y[:100], strict=True):
            assert agent.feedback(p.id, label=int(label)) == 1
        expected = classification_report(test_y[:100], predicted[:100], num_classes=10)
        q = to_builtins(agent.tick())["quality"]
        assert q["labels"] == 100 and q["accuracy"] == pytest.approx(expected.accuracy)
        assert q["f1_macro"] == pytest.approx(expected.f1)
        assert expected.accuracy > 0.8
        # Labels that disagree with the model (the field has drifted) pull both down.
        wrong = [(lbl + 1) % 10 for lbl in test_y[100:200]]
        for p, label in zip(preds[100:200], wrong, strict=True):
            agent.feedback(p.id, label=f"digit-{label}")
        both = classification_report(list(test_y[:100]) + wrong, predicted, num_classes=10)
        q = to_builtins(agent.tick())["quality"]
        assert q["labels"] == 200 and q["accuracy"] == pytest.approx(both.accuracy)
        assert q["f1_macro"] == pytest.approx(both.f1) and q["f1_macro"] < expected.f1
        assert q["confusion"] == both.confusion
        # Refusals: each names the problem, none counts in the window.
        batch = agent.predict({"x": test_x[:3]})
        cases = [
            (lambda: agent.feedback(preds[0].id, label=1), ErrorCode.ALREADY_LABELLED),
            (lambda: agent.feedback("nope", label=1), ErrorCode.UNKNOWN_PREDICTION),
            (lambda: agent.feedback(batch.id, label=1), ErrorCode.BAD_REQUEST),
            (lambda: agent.feedback(batch.id, labels=[1, 2, 10]), ErrorCode.INVALID_INPUT),
            (lambda: agent.feedback(batch.id, labels=[1, 2, "cat"]), ErrorCode.INVALID_INPUT),
            (lambda: agent.feedback(batch.id), ErrorCode.BAD_REQUEST),
        ]
        for call, code in cases:
            with pytest.raises(RequestError) as err:
                call()
            assert err.value.code == code
        assert agent.feedback(batch.id, labels=[0, "1", "digit-2"]) == 3  # released, then OK
        q = to_builtins(agent.tick())["quality"]
        assert q["labels"] == 200 and q["feedback_rejected"] == len(cases)
        assert q["feedback_total"] == 203
    finally:
        agent.stop()


def test_trust_policy(tmp_path: Path, models: Models) -> None:
    with pytest.raises(SignatureError, match="is not signed"):
        make_agent(tmp_path / "a", model__package=str(models.unsigned_v1),
                   model__trusted_keys=[str(models.public_key)])
    with pytest.raises(SignatureError, match="not among the trusted keys"):
        make_agent(tmp_path / "b", model__package=str(models.signed_v1),
                   model__trusted_keys=[str(models.other_public_key)])
    tampered = tmp_path / "tampered.edgepkg"
    with zipfile.ZipFile(models.signed_v1) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "model.onnx":
                data = data.replace(b"digits", b"digitz")
            dst.writestr(item, data)
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        make_agent(tmp_path / "c", model__package=str(tampered),
                   model__trusted_keys=[str(models.public_key)])
    agent = make_agent(tmp_path / "d", model__package=str(models.signed_v1),
                       model__trusted_keys=[str(models.public_key)])
    try:
        assert agent.model is not None and agent.model.signed and agent.model.key_id
        # Nothing was activated by the refused attempts.
        assert ModelStore(tmp_path / "a" / "models").active() is None
    finally:
        agent.stop()


def test_model_folder_survives_restarts_and_falls_back(tmp_path: Path, models: Models) -> None:
    keys = {"model__trusted_keys": [str(models.public_key)]}
    agent = make_agent(tmp_path, model__package=str(models.signed_v1), **keys)
    agent.stop()
    agent = make_agent(tmp_path, **keys)  # no package: the folder's active model serves
    assert agent.model is not None and agent.model.version == "1.0.0"
    with pytest.raises(UsageError, match="another agent is running"):
        make_agent(tmp_path, **keys)
    agent.stop()
    agent = make_agent(tmp_path, model__package=str(models.signed_v2), **keys)  # newer: wins
    assert agent.model is not None and agent.model.version == "2.0.0"
    agent.stop()
    agent = make_agent(tmp_path, model__package=str(models.signed_v1), **keys)  # older: kept out
    assert agent.model is not None and agent.model.version == "2.0.0"
    agent.stop()
    store = ModelStore(tmp_path / "models")
    record = store.active()
    assert record is not None and record.active.version == "2.0.0"
    assert [p.version for p in record.previous] == ["1.0.0"]
    doc = json.loads(store.active_file.read_text())
    assert doc["schema"] == "edgekit.active-model/1"
    # The active package breaks on disk: the last known good one serves and becomes active.
    record.active.path.write_bytes(b"not a zip")
    agent = make_agent(tmp_path, **keys)
    try:
        assert agent.model is not None and agent.model.version == "1.0.0"
        again = store.active()
        assert again is not None and again.active.version == "1.0.0" and again.previous == ()
    finally:
        agent.stop()


def test_hot_swap_under_load_fails_no_request(tmp_path: Path, models: Models) -> None:
    x, _ = models.data
    keys = {"model__trusted_keys": [str(models.public_key)]}
    agent = make_agent(tmp_path, model__package=str(models.signed_v1), model__keep=2, **keys)
    reference = {}
    for pkg in (models.signed_v1, models.signed_v2):
        import onnxruntime as ort

        opened = open_package(pkg)
        sess = ort.InferenceSession(opened.model_bytes(), providers=["CPUExecutionProvider"])
        reference[opened.manifest.version] = sess.run(["probs"], {"x": x[:4]})[0]
    errors: list[BaseException] = []
    seen: set[str] = set()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                p = agent.predict({"x": x[:4]})
                np.testing.assert_allclose(p.outputs["probs"], reference[p.model.version],
                                           rtol=1e-5)
                seen.add(p.model.version)
            except BaseException as exc:  # every failure counts
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(12):
            agent.activate(models.signed_v2 if i % 2 == 0 else models.signed_v1)
        assert agent.model is not None and agent.model.version == "1.0.0"
    finally:
        stop.set()
        for t in threads:
            t.join()
        agent.stop()
    assert errors == []
    assert seen == {"1.0.0", "2.0.0"}
    assert len(list((tmp_path / "models" / "packages").glob("*.edgepkg"))) == 2


def test_runtime_failures_are_reported_and_serving_goes_on(tmp_path: Path,
                                                            models: Models) -> None:
    """A model that looks rows up in a table: the manifest check cannot know the table's
    size, so an index past it fails in the runtime; the agent reports an internal error,
    tells its observers, and serves the next request."""
    import datetime as dt

    from onnx import TensorProto, helper, numpy_helper

    from edgekit.manifest import Manifest, TensorSpec

    table = np.eye(10, dtype=np.float32) * 0.9 + 0.01
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["probs"], axis=0)], "lookup",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    manifest = Manifest(
        name="lookup", version="1.0.0", created=dt.datetime.now(dt.UTC).isoformat(),
        task="classification", source={}, target={"format": "onnx", "model_file": "model.onnx"},
        inputs=[TensorSpec("idx", "int64", ["batch"])],
        outputs=[TensorSpec("probs", "float32", ["batch", 10])], recipe={}, tools={})
    write_package(tmp_path / "lookup.edgepkg", manifest, {"model.onnx": model.SerializeToString()})
    agent = make_agent(tmp_path, model__package=str(tmp_path / "lookup.edgepkg"),
                       model__allow_unsigned=True)
    seen: list[tuple[str, bool, bool]] = []
    agent.observe(lambda served: seen.append(
        (served.model.name, served.outputs is not None, served.error is not None)))
    try:
        with pytest.raises(RuntimeBackendError, match="inference failed"):
            agent.predict({"idx": [3, 50]})
        with pytest.raises(InputError):
            agent.predict({"idx": [[1]]})
        assert list(agent.predict({"idx": [3, 7]}).classes) == [3, 7]
        assert seen == [("lookup", False, True), ("lookup", True, False)]
        metrics = to_builtins(agent.tick())
        assert metrics["requests"]["errors_by_code"] == {"internal": 1, "invalid_input": 1}
    finally:
        agent.stop()


def test_int8_io_model_takes_real_values(tmp_path: Path, models: Models) -> None:
    x, _ = models.data
    agent = make_agent(tmp_path, model__package=str(models.int8_v1), model__allow_unsigned=True)
    float_agent = make_agent(tmp_path / "f", model__package=str(models.unsigned_v1),
                             model__allow_unsigned=True)
    try:
        real = agent.predict({"x": x[:32]}).outputs["probs"]
        q = np.clip(np.round(x[:32] / INT8_QUANT.scale + INT8_QUANT.zero_point), -128, 127)
        raw = agent.predict({"x": q.astype(np.int8)}).outputs["probs"]
        np.testing.assert_allclose(real, raw, atol=1e-6)
        reference = float_agent.predict({"x": x[:32]}).outputs["probs"]
        assert np.mean(real.argmax(1) == reference.argmax(1)) >= 0.9
        with pytest.raises(InputError, match="outside -0.06275 ... 16.06, the range its int8"):
            agent.predict({"x": np.full((1, 64), 1000, np.int64)})
    finally:
        agent.stop()
        float_agent.stop()


def test_golden_mismatch_refuses_the_model(tmp_path: Path, models: Models) -> None:
    pkg = open_package(models.unsigned_v1)
    members = {name: pkg.read_member(name) for name in pkg.manifest.files}
    gin, gout = pkg.golden()
    from edgekit.artifact import golden_to_npz

    members["golden.npz"] = golden_to_npz(gin, {"probs": gout["probs"][::-1].copy()})
    bad = write_package(tmp_path / "bad.edgepkg", pkg.manifest, members)
    assert bad.version == "1.0.0"
    with pytest.raises(RuntimeBackendError, match="golden samples differ"):
        make_agent(tmp_path, model__package=str(tmp_path / "bad.edgepkg"),
                   model__allow_unsigned=True)


def test_labelled_samples_are_queued(tmp_path: Path, models: Models) -> None:
    x, y = models.data
    agent = make_agent(tmp_path, model__package=str(models.unsigned_v1), model__allow_unsigned=True,
                       mqtt__broker="mqtt://127.0.0.1:9", samples__fraction=1.0,
                       samples__max_per_minute=3)
    try:
        assert agent.outbox is not None
        preds = [agent.predict({"x": x[i : i + 1]}) for i in range(5)]
        for p, label in zip(preds, y[:5], strict=True):
            agent.feedback(p.id, label=int(label))
        queued = [m for m in agent.outbox.peek(0, 100) if m.topic.endswith("/samples")]
        assert len(queued) == 3  # the rate limit
        doc = json.loads(queued[0].payload)
        assert doc["schema"] == Schema.SAMPLE.value and doc["prediction_id"] == preds[0].id
        assert doc["label"] == [int(y[0])] and doc["prediction"] == [int(preds[0].classes[0])]
        from edgekit.protocol import decode_array

        np.testing.assert_array_equal(decode_array(doc["inputs"]["x"]), x[:1])
        topics = {m.topic.rsplit("/", 1)[1] for m in agent.outbox.peek(0, 100)}
        assert topics == {Kind.SAMPLES.value, Kind.EVENTS.value}
    finally:
        agent.stop()


def test_temperature_from_thermal_zones(tmp_path: Path, models: Models) -> None:
    """A Pi's /sys/class/thermal cannot exist on this machine: a folder of the same layout
    stands in for it (the only mock in these tests)."""
    thermal = tmp_path / "thermal"
    for zone, millideg in (("thermal_zone0", "48312"), ("thermal_zone1", "51000\n")):
        (thermal / zone).mkdir(parents=True)
        (thermal / zone / "temp").write_text(millideg)
    (thermal / "thermal_zone2").mkdir()  # a zone without a readable temp is skipped
    (thermal / "cooling_device0").mkdir()
    agent = make_agent(tmp_path, model__package=str(models.unsigned_v1), model__allow_unsigned=True,
                       telemetry__thermal_dir=str(thermal))
    try:
        system = to_builtins(agent.tick())["system"]
        assert system["temperature_c"] == 51.0
        assert system["rss_bytes"] and system["rss_bytes"] > 1_000_000
    finally:
        agent.stop()
    empty = make_agent(tmp_path / "e", model__package=str(models.unsigned_v1),
                       model__allow_unsigned=True, telemetry__thermal_dir=str(tmp_path / "none"))
    try:
        assert to_builtins(empty.tick())["system"]["temperature_c"] is None
    finally:
        empty.stop()


def test_refused_updates_leave_the_folder_as_it_was(tmp_path: Path, models: Models) -> None:
    agent = make_agent(tmp_path, model__package=str(models.signed_v1),
                       model__trusted_keys=[str(models.public_key)])
    try:
        before = sorted(p.name for p in (tmp_path / "models" / "packages").iterdir())
        with pytest.raises(SignatureError):
            agent.activate(models.unsigned_v1)
        assert sorted(p.name for p in (tmp_path / "models" / "packages").iterdir()) == before
        assert agent.model is not None and agent.model.signed
    finally:
        agent.stop()
    # A damaged record does not stop a given package from serving.
    (tmp_path / "models" / "active.json").write_text("{not json")
    agent = make_agent(tmp_path, model__package=str(models.signed_v2),
                       model__trusted_keys=[str(models.public_key)])
    try:
        assert agent.model is not None and agent.model.version == "2.0.0"
    finally:
        agent.stop()
