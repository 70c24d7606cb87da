"""``edgekit optimize`` on real conversions: budget, fallback to float nodes, table, plot.

The outlier model (see ``zoo.digits.OutlierMLP``) is built so that every plain int8 recipe
collapses its accuracy, while keeping its last two layers in float restores it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from zoo import digits
from zoo.commands import cli_json, run_cli

from converters.compress import Recipe, all_recipes, optimize
from converters.evaluate import evaluate
from edgekit.artifact import open_package, verify_package
from edgekit.signing import generate_keypair, load_public_key


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("optimize")
    paths = digits.write_digits_npz(folder)
    xt, yt, _, _ = digits.digits_split()
    paths["outlier"] = digits.save_pt2(digits.make_outlier_model(xt, yt),
                                       folder / "outlier.pt2")
    torch.manual_seed(0)
    student = digits.train_classifier(digits.student(), xt, yt, epochs=4)
    paths["student"] = digits.save_pt2(student, folder / "student.pt2")
    paths["folder"] = folder
    return paths


def test_full_onnx_set_keeps_just_the_sensitive_nodes_in_float(work: dict[str, Path]) -> None:
    out = work["folder"] / "outlier-best.edgepkg"
    doc = cli_json(run_cli("optimize", work["outlier"], "--eval", work["eval"], "--calibration",
                           work["calib"], "--metric", "accuracy", "--max-drop", "0.01",
                           "--objective", "size", "--latency-runs", "10", "-o", out, "--json"))
    rows = {r["name"]: r for r in doc["candidates"]}
    plain = [r.name for r in all_recipes(("onnx",))]
    assert list(rows)[: len(plain)] == plain
    assert all(rows[n]["status"] == "ok" for n in plain)
    # The model does what it was built for: float is fine, every plain int8 recipe breaks.
    assert rows["onnx:fp32"]["meets_budget"] and rows["onnx:fp16"]["meets_budget"]
    for name in plain:
        if rows[name]["quantize"] in ("dynamic", "int8"):
            assert rows[name]["drop"] > 0.5, name

    sens = doc["sensitivity"]
    assert len(sens["nodes"]) == 4 and len(sens["probes"]) == 4
    assert sens["kept_in_float"] == sens["nodes"][2:]
    chosen = rows[doc["chosen"]]
    assert chosen["nodes_in_float"] == sens["kept_in_float"]
    assert chosen["quantize"] == "int8" and chosen["meets_budget"]
    assert chosen["drop"] <= 0.01
    assert chosen["size_bytes"] < rows["onnx:fp16"]["size_bytes"]
    assert all(node in doc["reason"] for node in chosen["nodes_in_float"])
    assert doc["settings"]["calibration"] == str(work["calib"])

    pkg = open_package(out)
    record = pkg.manifest.extra["optimize"]
    assert record["chosen"] == doc["chosen"] and record["reason"] == doc["reason"]
    assert [r["name"] for r in record["candidates"]] == list(rows)
    assert pkg.manifest.recipe["nodes_to_exclude"] == chosen["nodes_in_float"]
    # Measured again, independently: the written artifact honours the budget.
    source = evaluate(work["outlier"], work["eval"]).report.headline()["accuracy"]
    written = evaluate(out, work["eval"]).report.headline()["accuracy"]
    assert written >= source - 0.01
    assert written == pytest.approx(chosen["metric"])
    plot = Path(doc["plot"])
    assert plot == out.with_suffix(".optimize.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_set_on_both_targets_picks_the_fastest_within_budget(work: dict[str, Path]
                                                                   ) -> None:
    out = work["folder"] / "student-best.edgepkg"
    result = run_cli("optimize", work["student"], "--eval", work["eval"], "--quick",
                     "--target", "both", "--max-drop", "0.02", "--latency-runs", "10",
                     "-o", out)
    assert result.exit_code == 0, result.output
    assert "candidate" in result.stdout and "reason:" in result.stdout
    record = open_package(out).manifest.extra["optimize"]
    rows = record["candidates"]
    assert {r["target"] for r in rows} == {"onnx", "tflite"}
    within = [r for r in rows if r["status"] == "ok" and r["meets_budget"]]
    fastest = min(within, key=lambda r: (r["latency_p50_ms"], r["size_bytes"]))
    assert record["chosen"] == fastest["name"]
    assert f"* {fastest['name']}" in result.stdout
    for row in rows:
        if row["status"] == "ok":
            assert row["latency_ratio"] == pytest.approx(
                row["latency_p50_ms"] / record["source"]["latency_p50_ms"])
    # Static int8 fell back on the evaluation data for calibration, and says so.
    assert any("calibrated on the evaluation data" in n for n in record["notes"])


def test_cosine_scores_agreement_without_labels(work: dict[str, Path],
                                               tmp_path: Path) -> None:
    out = work["folder"] / "cosine.edgepkg"
    keys = generate_keypair(tmp_path / "signing")
    doc = cli_json(run_cli("optimize", work["student"], "--eval", work["unlabelled"], "--metric",
                           "cosine", "--max-drop", "0.01", "--candidates",
                           "fp32,fp16,dynamic-per-tensor", "--latency-runs", "5", "--no-plot",
                           "--sign-key", keys.private_path, "-o", out, "--json"))
    # The re-packaged artifact carries a valid signature over the optimize record too.
    assert verify_package(out, [load_public_key(keys.public_path)]).key_id == keys.key_id
    assert "optimize" in open_package(out).manifest.extra
    assert doc["settings"]["baseline"] == 1.0
    rows = {r["name"]: r for r in doc["candidates"]}
    assert rows["onnx:fp32"]["metric"] > 0.99999
    for row in rows.values():
        assert row["drop"] == pytest.approx(1.0 - row["metric"])
    assert doc["plot"] is None and not out.with_suffix(".optimize.png").exists()


def test_a_candidate_that_fails_is_reported_and_skipped(work: dict[str, Path],
                                                        tmp_path: Path) -> None:
    broken = Recipe("onnx", "int8", nodes_to_exclude=("no-such-node",), label="int8-broken")
    out = tmp_path / "best.edgepkg"
    result = optimize(work["student"], eval_data=work["eval"], output=out,
                      candidates=["fp32", broken], latency_runs=3, plot=False)
    rows = {r["name"]: r for r in result.rows}
    assert rows["onnx:int8-broken"]["status"] == "failed"
    assert "no-such-node" in rows["onnx:int8-broken"]["error"]
    assert result.chosen["name"] == "onnx:fp32"
    assert "failed to convert" in result.reason
    assert "failed: " in result.table


@pytest.mark.parametrize(
    ("extra", "code", "needle"),
    [
        (["--max-drop", "1.5"], 2, "--max-drop 1.5"),
        (["--max-drop", "-0.1"], 2, "--max-drop -0.1"),
        (["--max-drop", "nan"], 2, "--max-drop nan"),
        (["--candidates", "int9"], 2, "unknown candidate 'int9'"),
        (["--eval", "UNLABELLED"], 1, "needs labels"),
        (["--candidates", "dynamic-per-tensor,dynamic-per-channel"], 1,
         "no candidate keeps the accuracy drop within 0.01"),
    ],
)
def test_bad_input_writes_nothing(work: dict[str, Path], tmp_path: Path, extra: list[str],
                                  code: int, needle: str) -> None:
    out = tmp_path / "best.edgepkg"
    args = ["optimize", work["outlier"], "--eval", work["eval"], "--latency-runs", "3",
            "-o", out]
    args += [str(work["unlabelled"]) if a == "UNLABELLED" else a for a in extra]
    result = run_cli(*args)
    assert result.exit_code == code, result.output
    assert needle in result.output
    assert list(tmp_path.iterdir()) == []


def test_budget_miss_error_carries_the_table(work: dict[str, Path], tmp_path: Path) -> None:
    result = run_cli("optimize", work["outlier"], "--eval", work["eval"], "--candidates",
                     "dynamic-per-channel", "--latency-runs", "3", "-o", tmp_path / "x.edgepkg")
    assert result.exit_code == 1
    assert "onnx:dynamic-per-channel" in result.output and "MISS" in result.output
    assert "no static ONNX int8 candidate" in result.output
    assert list(tmp_path.iterdir()) == []
