"""The accuracy estimate a package carries: fitted by the real converter on its evaluation
data or on separate estimate data (with groups), stored in the signed manifest, read back the
way a device reads it (older maps too); and the fitting itself (the logistic model with each
group held to its accuracy; ATC and isotonic maps, small, the same for logits and
probabilities)."""

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
from edgekit.calibration import (
    FEATURES,
    MAX_BINS,
    Calibration,
    Logistic,
    confidences,
    estimator_from_manifest,
    features,
)
from edgekit.data import Dataset, load_npz, save_npz
from edgekit.errors import ArtifactError, DataError, SignatureError
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
    cal = fit_calibration(logits, labels, "isotonic")
    assert isinstance(cal, Calibration) and cal.samples == 2000 and cal.method == "isotonic"
    assert 2 <= len(cal.edges) <= MAX_BINS and cal.edges[0] == 0.0
    assert all(b > a for a, b in zip(cal.edges, cal.edges[1:], strict=False))
    assert all(b >= a for a, b in zip(cal.probs, cal.probs[1:], strict=False))
    # Isotonic regression keeps the mean: on its own data the estimate is the accuracy.
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    assert cal.estimate(confidences(logits)) == pytest.approx(accuracy)
    # Logits or the same rows as probabilities: one confidence, one map.
    assert fit_calibration(_softmax(logits), labels, "isotonic") == cal
    # A prediction more confident than any seen takes the top bin; less, the bottom one.
    assert cal.lookup(np.array([1.0, 0.0])).tolist() == [cal.probs[-1], cal.probs[0]]


def test_atc_is_one_threshold_that_keeps_the_accuracy() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1000, 10)) * 3
    right = rng.random(1000) < 0.7
    labels = np.where(right, logits.argmax(axis=1), (logits.argmax(axis=1) + 1) % 10)
    cal = fit_calibration(logits, labels, "atc")
    assert isinstance(cal, Calibration) and cal.method == "atc" and cal.probs == (0.0, 1.0)
    conf = confidences(logits)
    # On its own data the share at or above the threshold is the accuracy (no equal
    # confidences here), and the stored map is exactly that threshold.
    assert cal.estimate(conf) == pytest.approx(float(right.mean()))
    assert cal.lookup(np.array([cal.edges[1], np.nextafter(cal.edges[1], 0)])).tolist() == [1, 0]
    # The manifest form reads back to the same map, method included.
    assert Calibration.from_manifest({"calibration": cal.to_dict()}) == cal
    # Every prediction right: a constant 1; equal confidences stay on one side together.
    everything = fit_calibration(logits, logits.argmax(axis=1), "atc")
    assert isinstance(everything, Calibration) and everything.estimate(conf) == 1.0
    tied = np.tile(np.eye(10)[:2] * 5, (50, 1))  # two confidence values only, 50 each
    tied_map = fit_calibration(tied, np.zeros(100, np.int64), "atc")
    assert tied_map is not None and (tied_map.edges, tied_map.probs) == ((0.0,), (1.0,))


def test_an_old_map_without_a_method_reads_as_isotonic() -> None:
    cal = Calibration.from_manifest({"calibration": {"edges": [0.0, 0.5], "probs": [0.2, 0.9]}})
    assert cal is not None and cal.method == "isotonic"
    assert cal.estimate(np.array([0.1, 0.7])) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="calibration method"):
        fit_calibration(np.eye(10)[np.arange(30) % 10], np.arange(30) % 10, "mean")


def test_the_logistic_estimate_holds_each_group_to_its_accuracy() -> None:
    # The ridge classifier's probabilities on clean digits and on two noisier copies: three
    # groups the model is less and less often right in.
    x, y = digits_data()
    w, b = ridge_weights(x[:1200], y[:1200], 1.0)
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(3), 597)
    noisy = np.concatenate([x[1200:] + rng.normal(0, s, x[1200:].shape) for s in (0, 4, 8)])
    probs = _softmax(noisy @ w + b)
    labels = np.tile(y[1200:], 3)
    right = probs.argmax(axis=1) == labels
    truth = [float(right[groups == g].mean()) for g in range(3)]
    assert truth[0] - truth[2] > 0.2
    held = fit_calibration(probs, labels, groups=groups)
    pooled = fit_calibration(probs, labels)
    assert isinstance(held, Logistic) and isinstance(pooled, Logistic)
    assert held.groups == 3 and pooled.groups == 1 and held.samples == len(probs)
    held_gap = [abs(held.estimate_scores(probs[groups == g]) - truth[g]) for g in range(3)]
    pooled_gap = [abs(pooled.estimate_scores(probs[groups == g]) - truth[g]) for g in range(3)]
    assert max(held_gap) < 0.01 and max(held_gap) <= max(pooled_gap)
    # Both keep the overall accuracy; group names work as well as numbers.
    for fit in (held, pooled):
        assert fit.estimate_scores(probs) == pytest.approx(float(right.mean()), abs=1e-3)
    named = fit_calibration(probs, labels, groups=np.array(["clean", "4", "8"])[groups])
    assert isinstance(named, Logistic) and named.coef == pytest.approx(held.coef)
    # The manifest form reads back to the same model; rows of another width get no estimate.
    assert estimator_from_manifest({"calibration": held.to_dict()}) == held
    assert held.estimate_scores(probs[:, :5]) is None and held.estimate_scores(probs[:0]) is None
    with pytest.raises(ValueError, match="groups: expected one per sample"):
        fit_calibration(probs, labels, groups=groups[:10])
    # Rows holding NaN are left out of the fit, groups and all.
    broken = probs.copy()
    broken[::2, 0] = np.nan
    kept = fit_calibration(broken, labels, groups=groups)
    assert isinstance(kept, Logistic) and kept.samples == len(probs) // 2
    assert kept == fit_calibration(probs[1::2], labels[1::2], groups=groups[1::2])


def test_the_features_of_logits_and_of_probabilities() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    f = features(logits)
    assert f.shape == (2, 3 + len(FEATURES) - 1)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert f[:, :3] == pytest.approx(log_p)
    assert f[:, 3] == pytest.approx(np.exp(log_p).max(axis=1))  # top-1 probability
    assert f[1, 4] == 0.0 and f[1, 5] == pytest.approx(np.log(3))  # margin; entropy
    # Probabilities (zeros included) are read as their logarithms, floored, never NaN.
    probs = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    g = features(probs)
    assert np.isfinite(g).all() and g[0, :2] == pytest.approx([0.0, np.log(1e-12)], abs=1e-9)
    assert features(_softmax(logits))[:, :3] == pytest.approx(log_p)


def _logistic_doc(**changes: object) -> dict[str, object]:
    doc = {"method": "logistic", "features": ["confidence", "log_softmax"],
           "coef": [1.0, 0.1, 0.2, 0.3], "intercept": -0.5, "classes": 3, "samples": 40,
           "edges": [0.0, 0.6], "probs": [0.0, 1.0]}
    doc.update(changes)
    return doc


@pytest.mark.parametrize("change", [
    {"coef": [1.0, 0.1]},
    {"coef": [1.0, 0.1, 0.2, float("nan")]},
    {"coef": [1.0, 0.1, 0.2, True]},
    {"features": ["confidence", "pixels"]},
    {"features": ["confidence", "confidence", "log_softmax"]},
    {"classes": 1},
    {"intercept": "x"},
    {"probs": [0.0, 2.0]},
])
def test_a_malformed_logistic_estimate_is_refused(change: dict[str, object]) -> None:
    with pytest.raises(ArtifactError, match="metrics.calibration"):
        estimator_from_manifest({"calibration": _logistic_doc(**change)})


def test_a_logistic_estimate_reads_back_and_older_readers_get_its_map() -> None:
    estimator = estimator_from_manifest({"calibration": _logistic_doc()})
    assert isinstance(estimator, Logistic) and estimator.features == ("confidence",
                                                                       "log_softmax")
    row = np.array([[2.0, 0.0, -1.0]])
    f = features(row, estimator.features)[0]
    expected = 1 / (1 + np.exp(-(-0.5 + f @ np.array([1.0, 0.1, 0.2, 0.3]))))
    assert estimator.estimate_scores(row) == pytest.approx(expected)
    # What an agent that knows only maps reads: the ATC map beside it.
    old = Calibration.from_manifest({"calibration": _logistic_doc()})
    assert old is not None and old.method == "atc" and old.edges == (0.0, 0.6)
    # An older package's map is still read as a map.
    plain = estimator_from_manifest({"calibration": {"edges": [0.0, 0.5], "probs": [0.2, 0.9]}})
    assert isinstance(plain, Calibration) and plain.estimate_scores(row) == pytest.approx(0.9)


def test_groups_travel_in_the_data_file(tmp_path: Path) -> None:
    x = np.zeros((4, 2), np.float32)
    save_npz(tmp_path / "d.npz", {"x": x}, np.arange(4), np.array([0, 0, 1, 1]))
    data = load_npz(tmp_path / "d.npz")
    assert data.groups is not None and data.groups.tolist() == [0, 0, 1, 1]
    assert data.take(2, 1).groups.tolist() == [0, 1] and list(data.inputs) == ["x"]
    np.savez(tmp_path / "bad.npz", x=x, y=np.arange(4), group=np.arange(3))
    with pytest.raises(DataError, match="groups of shape"):
        load_npz(tmp_path / "bad.npz")


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
    estimator = estimator_from_manifest(manifest.metrics)
    assert isinstance(estimator, Logistic) and doc["method"] == "logistic"  # the default
    assert estimator.classes == 10 and estimator.groups == 1 and len(estimator.coef) == 16
    # Fitted on the evaluation data: there, the estimate is the accuracy the manifest states
    # (the intercept is not penalised, so the fit keeps the mean), and so is the ATC map
    # beside it that older agents read.
    x, y = digits_data()
    import onnxruntime as ort

    with zipfile.ZipFile(path) as zf:
        session = ort.InferenceSession(zf.read("model.onnx"), providers=["CPUExecutionProvider"])
    probs = np.asarray(session.run(["probs"], {"x": x[1200:]})[0])
    accuracy = manifest.metrics["accuracy"]["artifact"]["accuracy"]
    assert estimator.estimate_scores(probs) == pytest.approx(accuracy, abs=1e-4)
    old_reader = Calibration.from_manifest(manifest.metrics)
    assert old_reader == estimator.fallback and old_reader.method == "atc"
    assert old_reader.estimate(confidences(probs)) == pytest.approx(accuracy, abs=1e-6)


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


def test_estimate_data_fit_the_map_and_the_accuracy_stays_on_the_evaluation_data(
        tmp_path: Path) -> None:
    x, y = digits_data()
    w, b = ridge_weights(x[:1200], y[:1200], 1.0)
    (tmp_path / "ridge.onnx").write_bytes(onnx_classifier(w, b))
    # Noisy copies stand for the field's variation: the model is less often right there.
    noisy = np.clip(x[1200:] + np.random.default_rng(3).normal(0, 0.6, x[1200:].shape), 0, 1)
    estimate = Dataset({"x": noisy.astype(np.float32)}, y[1200:], "noisy digits")
    result = convert(tmp_path / "ridge.onnx", ConvertOptions(name="digits",
                                                             estimate_method="isotonic"),
                     output=tmp_path / "d.edgepkg", estimate_data=estimate,
                     eval_data=Dataset({"x": x[1200:]}, y[1200:], "digits evaluation"))
    doc = result.manifest.metrics["calibration"]
    assert doc["data"] == "noisy digits" and doc["method"] == "isotonic"
    assert result.manifest.metrics["accuracy"]["data"] == "digits evaluation"
    import onnxruntime as ort

    with zipfile.ZipFile(tmp_path / "d.edgepkg") as zf:
        session = ort.InferenceSession(zf.read("model.onnx"), providers=["CPUExecutionProvider"])
    probs = np.asarray(session.run(["probs"], {"x": estimate.inputs["x"]})[0])
    noisy_accuracy = float(np.mean(probs.argmax(axis=1) == y[1200:]))
    assert noisy_accuracy < result.manifest.metrics["accuracy"]["artifact"]["accuracy"] - 0.05
    cal = Calibration.from_manifest(result.manifest.metrics)
    assert cal is not None
    assert cal.estimate(confidences(probs)) == pytest.approx(noisy_accuracy, abs=1e-6)
    with pytest.raises(DataError, match="estimate data unlabelled have no labels"):
        convert(tmp_path / "ridge.onnx", ConvertOptions(name="digits"), output=None,
                estimate_data=Dataset({"x": noisy}, None, "unlabelled"))


def test_a_retrained_candidate_keeps_the_map_method_of_the_package_it_replaces() -> None:
    from edgekit.host.controller._candidates import options_from_manifest

    for method in ("atc", "isotonic", "logistic"):
        manifest = {"target": {"format": "onnx"},
                    "metrics": {"calibration": {"method": method, "edges": [0.0],
                                                "probs": [1.0]}}}
        opts = options_from_manifest(manifest, name="digits", version="1.0.1")
        assert opts.estimate_method == method
    # A package from before the method was recorded: the converter's default.
    assert options_from_manifest({"metrics": {"calibration": {"edges": [0.0], "probs": [1.0]}}},
                                 name="digits", version="1.0.1").estimate_method == "logistic"


def test_the_cli_fits_the_map_on_estimate_data(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgekit.host.cli import cli

    x, y = digits_data()
    w, b = ridge_weights(x[:1200], y[:1200], 1.0)
    (tmp_path / "ridge.onnx").write_bytes(onnx_classifier(w, b))
    save_npz(tmp_path / "eval.npz", {"x": x[1200:]}, y[1200:])
    save_npz(tmp_path / "field.npz", {"x": x[:300]}, y[:300])
    save_npz(tmp_path / "unlabelled.npz", {"x": x[:300]}, None)
    base = ["convert", str(tmp_path / "ridge.onnx"), "--name", "digits", "--version", "1.0.0",
            "--eval", str(tmp_path / "eval.npz")]
    done = CliRunner().invoke(cli, [*base, "--estimate-data", str(tmp_path / "field.npz"),
                                    "--estimate-method", "isotonic",
                                    "-o", str(tmp_path / "d.edgepkg")])
    assert done.exit_code == 0, done.output
    doc = open_package(tmp_path / "d.edgepkg").manifest.metrics["calibration"]
    assert doc["method"] == "isotonic" and doc["samples"] == 300
    assert doc["data"].endswith("field.npz")
    # Groups in the file reach the fit: the default logistic estimate holds each to its
    # accuracy.
    save_npz(tmp_path / "grouped.npz", {"x": x[:300]}, y[:300], np.arange(300) % 3)
    done = CliRunner().invoke(cli, [*base, "--estimate-data", str(tmp_path / "grouped.npz"),
                                    "-o", str(tmp_path / "g.edgepkg")])
    assert done.exit_code == 0, done.output
    doc = open_package(tmp_path / "g.edgepkg").manifest.metrics["calibration"]
    assert doc["method"] == "logistic" and doc["groups"] == 3 and doc["samples"] == 300
    refused = CliRunner().invoke(cli, [*base, "--estimate-data",
                                       str(tmp_path / "unlabelled.npz"),
                                       "-o", str(tmp_path / "u.edgepkg")])
    assert refused.exit_code != 0 and "have no labels" in refused.output
    assert not (tmp_path / "u.edgepkg").exists()
