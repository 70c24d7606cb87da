"""The agent's label-free accuracy estimate, in process: a package the real converter
calibrated (the logistic model, or an ATC map as older packages carry), real onnxruntime; the
interval's estimate is the mean estimated probability of every row it answered. Packages
without an estimate (older ones) or with a broken one serve as before, with no estimate.
(Over MQTT, with a controller: tests/host/test_estimate_loop.py.)"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
from _agent_support import Models
from _digits import onnx_classifier, ridge_weights
from msgspec import to_builtins

from converters import ConvertOptions, convert
from device_agent import Agent, load_config
from device_agent._telemetry import prometheus_text
from edgekit.artifact import open_package
from edgekit.calibration import Calibration, Logistic, estimator_from_manifest
from edgekit.data import Dataset


def _calibrated(root: Path, models: Models, method: str) -> Path:
    x, y = models.data
    w, b = ridge_weights(x[:1200], y[:1200], 1.0)
    (root / "ridge.onnx").write_bytes(onnx_classifier(w, b))
    out = root / f"digits-{method}.edgepkg"
    convert(root / "ridge.onnx", ConvertOptions(name="digits", version="1.0.0",
                                                estimate_method=method), output=out,
            eval_data=Dataset({"x": x[1200:]}, y[1200:], "digits eval"))
    return out


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Path:
    return _calibrated(tmp_path_factory.mktemp("calibrated"), models, "logistic")


@pytest.fixture(scope="module")
def atc_calibrated(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Path:
    return _calibrated(tmp_path_factory.mktemp("atc"), models, "atc")


def _agent(tmp_path: Path, package: Path) -> Agent:
    return Agent(load_config(env={}, overrides={
        "model.dir": str(tmp_path / "models"), "telemetry.interval_s": 0.0,
        "model.package": str(package), "model.allow_unsigned": True}))


@pytest.mark.parametrize("kind", [Logistic, Calibration])
def test_the_estimate_is_the_mean_estimated_probability(
        tmp_path: Path, models: Models, calibrated: Path, atc_calibrated: Path,
        kind: type) -> None:
    x, _ = models.data
    noisy = np.clip(x[:300] + np.random.default_rng(0).normal(0, 4, x[:300].shape), 0, 16)
    package = calibrated if kind is Logistic else atc_calibrated
    agent = _agent(tmp_path, package)
    try:
        outputs = [agent.predict({"x": noisy[i:i + 30].astype(np.float32)}).outputs["probs"]
                   for i in range(0, 300, 30)]
        payload = agent.tick()
        metrics = to_builtins(payload)
        estimator = estimator_from_manifest(open_package(package).manifest.metrics)
        assert isinstance(estimator, kind)
        expected = estimator.estimate_scores(np.concatenate(outputs))
        assert metrics["estimate"] == {"method": "cbpe", "accuracy": pytest.approx(expected),
                                       "count": 300}
        gauge = [line for line in prometheus_text(agent, payload).splitlines()
                 if line.startswith("edgekit_agent_estimated_accuracy ")]
        assert [float(g.split()[1]) for g in gauge] == [pytest.approx(expected)]
        # An interval without predictions has nothing to estimate.
        assert "estimate" not in to_builtins(agent.tick())
    finally:
        agent.stop()


def test_a_package_without_a_map_reports_no_estimate(tmp_path: Path, models: Models) -> None:
    x, _ = models.data
    agent = _agent(tmp_path, models.unsigned_v1)
    try:
        agent.predict({"x": x[:20]})
        metrics = to_builtins(agent.tick())
        assert metrics["predictions"]["count"] == 20 and "estimate" not in metrics
    finally:
        agent.stop()


def test_a_broken_map_is_logged_once_and_the_model_serves(
        tmp_path: Path, models: Models, calibrated: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "broken.edgepkg"
    with zipfile.ZipFile(calibrated) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "manifest.json":
                doc = json.loads(data)
                doc["metrics"]["calibration"]["probs"][0] = 7.0
                data = json.dumps(doc).encode()
            dst.writestr(item, data)
    x, _ = models.data
    agent = _agent(tmp_path, broken)
    try:
        with caplog.at_level(logging.WARNING, logger="device_agent.estimate"):
            for _ in range(2):
                assert agent.predict({"x": x[:10]}).classes is not None
                assert "estimate" not in to_builtins(agent.tick())
        assert sum("no accuracy estimate" in r.getMessage() for r in caplog.records) == 1
    finally:
        agent.stop()
