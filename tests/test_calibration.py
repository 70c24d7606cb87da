"""The confidence calibration a package carries: fitted by the real converter on its
evaluation data, stored in the signed manifest, read back the way a device reads it; and the
fitting itself (isotonic, small, the same for logits and probabilities)."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from converters import ConvertOptions, convert
from converters.calibrate import fit_calibration
from edgekit.artifact import open_package, verify_package
from edgekit.calibration import MAX_BINS, Calibration, confidences
from edgekit.data import Dataset
from edgekit.errors import ArtifactError, SignatureError
from edgekit.signing import generate_keypair, load_private_key, load_public_key

sys.path.insert(0, str(Path(__file__).resolve().parent / "agent"))
from _digits import digits_data, onnx_classifier, ridge_weights, write_digits_package  # noqa: E402


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_fit_is_monotone_small_and_keeps_the_mean() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2000, 10)) * 3
    right = rng.random(2000) < 0.3 + 0.6 * confidences(logits)  # confidence says something
    labels = np.where(right, logits.argmax(axis=1), (logits.argmax(axis=1) + 1) % 10)
    cal = fit_calibration(logits, labels)
    assert cal is not None and cal.samples == 2000
    assert 2 <= len(cal.edges) <= MAX_BINS and cal.edges[0] == 0.0
    assert all(b > a for a, b in zip(cal.edges, cal.edges[1:], strict=False))
    assert all(b >= a for a, b in zip(cal.probs, cal.probs[1:], strict=False))
    # Isotonic regression keeps the mean: on its own data the estimate is the accuracy.
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    assert cal.estimate(confidences(logits)) == pytest.approx(accuracy)
    # Logits or the same rows as probabilities: one confidence, one map.
    assert fit_calibration(_softmax(logits), labels) == cal
    # A prediction more confident than any seen takes the top bin; less, the bottom one.
    assert cal.lookup(np.array([1.0, 0.0])).tolist() == [cal.probs[-1], cal.probs[0]]


def test_too_few_samples_or_no_scores_give_no_map() -> None:
    assert fit_calibration(np.eye(10)[:10], np.arange(10)) is None
    assert fit_calibration(np.zeros((50, 1)), np.zeros(50)) is None


@pytest.mark.parametrize("bad", [
    "not an object",
    {"edges": [0.0, 0.5], "probs": [0.5]},
    {"edges": [0.0, 0.5], "probs": [0.5, 1.5]},
    {"edges": [0.5, 0.0], "probs": [0.5, 0.9]},
    {"edges": [0.0, "x"], "probs": [0.5, 0.9]},
    {"edges": [0.0] + [i / 100 for i in range(1, 80)], "probs": [0.5] * 80},
])
def test_a_malformed_map_is_refused(bad: object) -> None:
    with pytest.raises(ArtifactError, match="metrics.calibration"):
        Calibration.from_manifest({"calibration": bad})


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("calibration")
    x, y = digits_data()
    w, b = ridge_weights(x[:1200], y[:1200], 1.0)
    (root / "ridge.onnx").write_bytes(onnx_classifier(w, b))
    keys = generate_keypair(root / "release")
    convert(root / "ridge.onnx", ConvertOptions(name="digits"), output=root / "d.edgepkg",
            eval_data=Dataset({"x": x[1200:]}, y[1200:], "digits evaluation"),
            sign_key=load_private_key(keys.private_path))
    return root / "d.edgepkg", keys.public_path


def test_the_converter_stores_the_map_in_the_signed_manifest(converted: tuple[Path, Path]
                                                              ) -> None:
    path, public = converted
    assert verify_package(path, [load_public_key(public)], require_signature=True).signed
    manifest = open_package(path).manifest
    doc = manifest.metrics["calibration"]
    assert doc["data"] == "digits evaluation" and doc["output"] == "probs"
    assert doc["samples"] == manifest.metrics["accuracy"]["samples"] == 597
    cal = Calibration.from_manifest(manifest.metrics)
    assert cal is not None
    # Fitted on the evaluation data: there, the estimate is the accuracy the manifest states.
    x, y = digits_data()
    import onnxruntime as ort

    with zipfile.ZipFile(path) as zf:
        session = ort.InferenceSession(zf.read("model.onnx"), providers=["CPUExecutionProvider"])
    probs = np.asarray(session.run(["probs"], {"x": x[1200:]})[0])
    assert cal.estimate(confidences(probs)) == pytest.approx(
        manifest.metrics["accuracy"]["artifact"]["accuracy"], abs=1e-6)


def test_a_changed_map_breaks_the_signature(converted: tuple[Path, Path], tmp_path: Path
                                            ) -> None:
    path, public = converted
    forged = tmp_path / "forged.edgepkg"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(forged, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "manifest.json":
                doc = json.loads(data)
                doc["metrics"]["calibration"]["probs"] = [1.0] * len(
                    doc["metrics"]["calibration"]["probs"])  # always looks perfect
                data = json.dumps(doc).encode()
            dst.writestr(item, data)
    with pytest.raises(SignatureError):
        verify_package(forged, [load_public_key(public)], require_signature=True)


def test_a_package_without_a_map_has_none(tmp_path: Path) -> None:
    path = write_digits_package(tmp_path / "old.edgepkg", version="1.0.0")
    metrics = open_package(path).manifest.metrics
    assert "calibration" not in metrics
    assert Calibration.from_manifest(metrics) is None
