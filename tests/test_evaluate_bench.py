"""``edgekit evaluate`` and ``edgekit bench`` on real packages and source models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from zoo import digits
from zoo.commands import cli_json, run_cli

from converters import ConvertOptions, convert
from converters.evaluate import evaluate, package_predictor, run_model
from edgekit.artifact import open_package
from edgekit.data import Dataset


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("evaluate")
    paths = digits.write_digits_npz(folder)
    xt, yt, xe, ye = digits.digits_split()
    torch.manual_seed(0)
    model = digits.train_classifier(digits.student(), xt, yt, epochs=4)
    paths["pt2"] = digits.save_pt2(model, folder / "student.pt2")
    ev = Dataset({"x": xe}, ye, "eval")
    for tag, opts in (("onnx", ConvertOptions()),
                      ("fixed", ConvertOptions(dynamic_batch=False)),
                      ("tflite", ConvertOptions(target="tflite"))):
        paths[tag] = folder / f"{tag}.edgepkg"
        convert(paths["pt2"], opts, output=paths[tag], eval_data=ev)
    # A regression model: predict the digit's value as a float from the pixels.
    reg = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))
    w, *_ = np.linalg.lstsq(np.c_[xt.reshape(len(xt), -1), np.ones(len(xt))], yt, rcond=None)
    with torch.no_grad():
        reg[1].weight[:] = torch.from_numpy(w[:64].astype(np.float32))[None, :]
        reg[1].bias[:] = float(w[64])
    paths["reg_eval"] = folder / "reg_eval.npz"
    np.savez(paths["reg_eval"], x=xe, y=ye.astype(np.float32))
    paths["reg"] = folder / "reg.edgepkg"
    convert(reg, ConvertOptions(), output=paths["reg"],
            eval_data=Dataset({"input": xe}, ye.astype(np.float32), "reg"))
    paths["folder"] = folder
    return paths


def _torch_logits(path: Path, x: np.ndarray) -> np.ndarray:
    module = torch.export.load(str(path)).module()
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _check_report(doc: dict, y: np.ndarray, pred: np.ndarray) -> None:
    assert doc["count"] == len(y)
    assert doc["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    assert (doc["precision"], doc["recall"], doc["f1"]) == pytest.approx((p, r, f), abs=1e-12)
    np.testing.assert_array_equal(doc["confusion"],
                                  skm.confusion_matrix(y, pred, labels=list(range(10))))


def test_source_and_package_give_the_same_report(work: dict[str, Path]) -> None:
    _, _, xe, ye = digits.digits_split()
    torch_pred = _torch_logits(work["pt2"], xe).argmax(1)
    predict, _ = package_predictor(work["onnx"])
    onnx_pred = run_model(predict, Dataset({"x": xe}, None, "eval"))["output"].argmax(1)
    np.testing.assert_array_equal(torch_pred, onnx_pred)

    source = cli_json(run_cli("evaluate", work["pt2"], "--data", work["eval"], "--json"))
    package = cli_json(run_cli("evaluate", work["onnx"], "--data", work["eval"], "--json"))
    assert source["kind"] == "pytorch" and package["kind"] == "package"
    _check_report(source, ye, torch_pred)
    for key in ("accuracy", "precision", "recall", "f1", "confusion", "per_class", "count"):
        assert source[key] == package[key], key
    # A fixed-batch package runs one sample per call, padding nothing away.
    fixed = cli_json(run_cli("evaluate", work["fixed"], "--data", work["eval"], "--json"))
    assert fixed["confusion"] == package["confusion"]


def test_onnx_source_and_tflite_package_are_scored_the_same_way(work: dict[str, Path],
                                                                tmp_path: Path) -> None:
    _, _, xe, ye = digits.digits_split()
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(open_package(work["onnx"]).model_bytes())
    as_onnx = evaluate(onnx_file, work["eval"])
    assert as_onnx.kind == "onnx"
    assert as_onnx.to_dict()["confusion"] == evaluate(work["onnx"], work["eval"]).to_dict()[
        "confusion"]
    lite = cli_json(run_cli("evaluate", work["tflite"], "--data", work["eval"], "--json"))
    predict, manifest = package_predictor(work["tflite"])
    assert manifest.target["runtime"] == "litert"
    lite_pred = run_model(predict, Dataset({"x": xe}, None, "eval"))["output"].argmax(1)
    _check_report(lite, ye, lite_pred)


def test_keras_source(tmp_path: Path, work: dict[str, Path]) -> None:
    keras = pytest.importorskip("keras")
    _, _, xe, ye = digits.digits_split()
    model = keras.Sequential([keras.Input((1, 8, 8)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    path = tmp_path / "dense.keras"
    model.save(path)
    doc = cli_json(run_cli("evaluate", path, "--data", work["eval"], "--json"))
    assert doc["kind"] == "keras"
    _check_report(doc, ye, np.asarray(model.predict(xe, verbose=0)).argmax(1))


def test_regression_report(work: dict[str, Path]) -> None:
    _, _, xe, ye = digits.digits_split()
    doc = cli_json(run_cli("evaluate", work["reg"], "--data", work["reg_eval"], "--json"))
    assert doc["task"] == "regression"
    predict, _ = package_predictor(work["reg"])
    out = run_model(predict, Dataset({"input": xe}, None, "eval"))
    pred = next(iter(out.values()))[:, 0].astype(np.float64)
    assert doc["mae"] == pytest.approx(skm.mean_absolute_error(ye, pred), rel=1e-9)
    assert doc["rmse"] == pytest.approx(skm.root_mean_squared_error(ye, pred), rel=1e-9)
    # The least-squares fit is informative: well below predicting the mean.
    assert doc["rmse"] < np.std(ye)


def test_human_report_lists_classes_and_confusion(work: dict[str, Path]) -> None:
    result = run_cli("evaluate", work["onnx"], "--data", work["eval"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "confusion (rows: true" in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("    ")]) == 10


def test_evaluate_needs_labels(work: dict[str, Path]) -> None:
    result = run_cli("evaluate", work["onnx"], "--data", work["unlabelled"])
    assert result.exit_code == 1
    assert "has no labels" in result.output and "hint:" in result.output


def test_evaluate_names_a_mismatching_input(work: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 3, 8, 8), np.float32), y=np.zeros(4, np.int64))
    result = run_cli("evaluate", work["onnx"], "--data", bad)
    assert result.exit_code == 1
    assert "input 'x'" in result.output and "[batch, 1, 8, 8]" in result.output


@pytest.mark.parametrize("tag", ["onnx", "tflite"])
def test_bench_reports_every_figure(work: dict[str, Path], tag: str) -> None:
    doc = cli_json(run_cli("bench", work[tag], "--threads", "1", "--batch", "4", "--runs", "20",
                           "--warmup", "3", "--json"))
    assert doc["runtime"] == ("onnxruntime" if tag == "onnx" else "litert")
    assert (doc["threads"], doc["batch"], doc["inputs"]) == (1, 4, "golden samples")
    lat = doc["latency"]
    assert (lat["runs"], lat["warmup_runs"]) == (20, 3)
    assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"]
    assert lat["warmup_ms"] > 0 and doc["first_run_ms"] > 0
    assert doc["throughput_per_s"] == pytest.approx(4 * 1000.0 / lat["mean_ms"])
    load = doc["load"]
    assert load["total_ms"] == pytest.approx(load["read_ms"] + load["session_ms"])
    mem = doc["memory"]
    assert mem["rss_peak_mb"] >= mem["rss_before_mb"] > 0
    assert mem["python_peak_mb"] > 0


def test_bench_with_data_and_human_output(work: dict[str, Path]) -> None:
    result = run_cli("bench", work["onnx"], "--data", work["eval"], "--runs", "5")
    assert result.exit_code == 0, result.output
    assert f"inputs: {work['eval']}" in result.output
    for word in ("load", "first run", "warm-up", "latency p99", "throughput", "memory"):
        assert word in result.output


def test_bench_bad_input(work: dict[str, Path], tmp_path: Path) -> None:
    fixed = run_cli("bench", work["fixed"], "--batch", "2")
    assert fixed.exit_code == 2 and "fixed batch of 1" in fixed.output
    broken = tmp_path / "broken.edgepkg"
    broken.write_bytes(b"not a zip")
    result = run_cli("bench", broken)
    assert result.exit_code == 1 and "error:" in result.output
    assert run_cli("bench", work["onnx"], "--runs", "0").exit_code == 2
