"""The text example: MiniLM intents from training to a head-only update on two agents.

The pipeline test runs ``python -m examples.text.run`` as a user would, shrunk (a one-layer
teacher, few sentences), with a real mosquitto broker and two real agents. The quality test
converts the full six-layer MiniLM encoder with the example's recipe (fusion, CPU rewrites,
smoothing, outlier split, float fallback) and checks every held-out sentence's embedding against
PyTorch's. The fallback test forces the float
fallback with a floor the plain int8 graph misses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from converters import ConvertOptions, convert
from edgekit.artifact import open_package
from edgekit.data import Dataset
from edgekit.runtimes import RuntimeOptions, load_session
from examples.text.data import BASE_INTENTS, make_split
from examples.text.models import IntentClassifier, SentenceEncoder, load_bert, student_of

REPO = Path(__file__).resolve().parents[1]


def _encoder(layers: int) -> SentenceEncoder:
    bert = load_bert()
    if layers < len(bert.encoder.layer):
        bert = student_of(IntentClassifier(bert, 1), layers).bert
    return SentenceEncoder(bert).eval()


def _cosines(path: Path, encoder: SentenceEncoder, data: Dataset) -> np.ndarray:
    pkg = open_package(path)
    session = load_session(pkg.manifest, pkg.model_bytes(), RuntimeOptions(threads=1))
    out = next(iter(session.run(data.inputs).values()))
    with torch.no_grad():
        ref = encoder(*(torch.from_numpy(data.inputs[k])
                        for k in ("input_ids", "attention_mask"))).numpy()
    return (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))


@pytest.mark.slow
def test_text_example_runs_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "examples.text.run", "--out", str(tmp_path), "--json",
         "--per-intent", "8", "--eval-per-intent", "4", "--calib-per-intent", "3",
         "--teacher-layers", "1", "--student-layers", "1", "--distill-epochs", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    rows = {r["variant"].split(" (")[0]: r for r in result["rows"]}
    assert set(rows) == {"ONNX fp32", "ONNX int8 optimized", "student", "head retrain"}
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["f1"] is not None, row
        assert row["latency_p50_ms"] > 0, row
    int8 = rows["ONNX int8 optimized"]
    assert rows["ONNX fp32"]["accuracy"] - int8["accuracy"] <= 0.01
    assert int8["notes"]["fused_ops"]["Attention"] == 1
    assert int8["size_bytes"] < 0.4 * rows["ONNX fp32"]["size_bytes"]
    retrain = rows["head retrain"]["notes"]
    # Only the head changed: the model's delta is a small part of it.
    assert retrain["model_delta_bytes"] < 0.01 * retrain["model_bytes"]
    # The model-aware delta sends the head, not the encoder.
    assert 0 < retrain["delta_bytes"] <= 0.05 * retrain["full_bytes"]
    for version, outcome in result["deploys"].items():
        assert outcome["ok"], outcome
        assert {d: t["outcome"] for d, t in outcome["targets"].items()} == {
            "text-1": "succeeded", "text-2": "succeeded"}, version
        for target in outcome["targets"].values():
            assert target["serving"]["version"] == version
    # The devices held 1.0.0, so the head update went as a delta.
    assert {t["source"] for t in result["deploys"]["1.1.0"]["targets"].values()} == {"delta"}


@pytest.mark.slow
def test_int8_minilm_keeps_every_held_out_sentence_at_cosine_099(tmp_path: Path) -> None:
    encoder = _encoder(6)
    calib = make_split(BASE_INTENTS, 5, 2, "calibration").dataset()
    held_out = make_split(BASE_INTENTS, 10, 7, "held-out").dataset()
    path = tmp_path / "encoder.edgepkg"
    convert(encoder, ConvertOptions(quantize="dynamic", exporter="torchscript",
                                    optimize_graph=False, float_fallback_cosine=0.992,
                                    latency_runs=2),
            output=path, calibration=calib, eval_data=held_out)
    recipe = open_package(path).manifest.recipe
    assert recipe["transformer_fusion"]["fused_ops"]["Attention"] == 6
    assert recipe["transformer_fusion"]["num_heads"] == 12
    assert recipe["float_fallback"]["final"]["min_cosine"] >= 0.992
    rewrites = recipe["transformer_fusion"]["cpu_rewrites"]
    assert rewrites["attention_masks_set"] == 6 and rewrites["skip_layer_norms_unfused"] == 12
    # MiniLM's feed-forward inputs carry outlier channels (hidden channel 99 above all): the
    # first product's are scaled into its weights in every layer, the split takes the rest.
    smoothed = recipe["smoothing"]["products"]
    assert sorted(smoothed) == [f"/bert/encoder/layer.{i}/intermediate/dense/MatMul"
                                for i in range(6)]
    assert all(p["before"] > 8 > p["after"] for p in smoothed.values())
    assert recipe["outlier_split"]["channels"]
    assert not set(recipe["outlier_split"]["channels"]) & set(smoothed)
    # the sentences are padded to 128 tokens: the graph computes them at their own length
    trim = recipe["padding_trim"]
    assert trim["applied"] and sorted(trim["inputs"]) == ["attention_mask", "input_ids"], trim
    assert _cosines(path, encoder, held_out).min() >= 0.99


@pytest.mark.slow
def test_float_fallback_keeps_costly_nodes_in_float(tmp_path: Path) -> None:
    encoder = _encoder(1)
    calib = make_split(BASE_INTENTS, 2, 2, "calibration").dataset(16)
    path = tmp_path / "encoder.edgepkg"
    plain = tmp_path / "plain.edgepkg"
    opts = ConvertOptions(quantize="dynamic", exporter="torchscript", optimize_graph=False,
                          latency_runs=2)
    convert(encoder, opts, output=plain, calibration=calib)
    worst = _cosines(plain, encoder, calib).min()
    floor = float(1.0 - (1.0 - worst) / 4)  # above what the plain int8 graph reaches
    convert(encoder, opts.replace(float_fallback_cosine=floor), output=path,
            calibration=calib)
    recipe = open_package(path).manifest.recipe
    record = recipe["float_fallback"]
    assert record["plain"]["min_cosine"] < floor
    assert record["met"] and record["kept_in_float"], record["outcome"]
    # The outlier split's float products are in float in every probe; the fallback adds its own.
    split = (recipe["outlier_split"] or {}).get("float_nodes", [])
    assert recipe["nodes_in_float"] == [*split, *record["kept_in_float"]]
    assert record["final"]["min_cosine"] >= floor
    quantizable = sum(len(v) for v in recipe["quantizable_nodes"].values())
    assert len(record["probes"]) == quantizable - len(split)
    assert _cosines(path, encoder, calib).min() >= floor - 1e-6
