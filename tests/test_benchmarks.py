"""The benchmarks still run: each one's ``--quick`` mode, as a user would start it.

Only that each finishes and prints its table is checked; the figures are for people (and
benchmarks/RESULTS.md), never thresholds here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, tmp_path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_convert_bench_quick(tmp_path: Path) -> None:
    out = _run("convert_bench.py", tmp_path=tmp_path)
    assert "## digits (batch 1" in out
    for variant in ("pytorch eager", "onnx none", "onnx int8", "onnx int8 per-tensor"):
        assert any(line.startswith(variant) for line in out.splitlines()), variant
    assert "failed:" not in out
    assert "goal " in out


def test_optimize_bench_quick(tmp_path: Path) -> None:
    out = _run("optimize_bench.py", "--out", str(tmp_path / "out"), tmp_path=tmp_path)
    assert "## digits (threads 1" in out
    assert "onnx:fp32" in out and "onnx:dynamic-per-tensor" in out
    assert "\nchosen: onnx:" in out
    assert (tmp_path / "out" / "results.json").is_file()


def test_ota_bench_quick(tmp_path: Path) -> None:
    from mqtt_broker import mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("the OTA benchmark starts mosquitto, which is not installed (.ci/run installs it)")
    out = _run("ota_bench.py", tmp_path=tmp_path)
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines()
                if re.search(r"\S\s{2,}\S", line))
    assert rows["agents succeeded"] == "2 / 2"
    assert rows["requests failed during the run"] == "0"
    assert "chunk throughput (MB/s)" in out
    # Both raw baselines ran (the script stops if a subscriber misses a byte).
    assert float(rows["raw broker throughput (MB/s)"]) > 0
    assert float(rows["raw broker, subscriber reading in place like the agents (MB/s)"]) > 0


def test_ota_wire_bench_quick(tmp_path: Path) -> None:
    out = _run("ota_wire_bench.py", tmp_path=tmp_path)
    for call in ("parse_request", "decode_chunk", "parse_desired"):
        assert any(line.startswith(call) for line in out.splitlines()), call


def test_variants_bench_quick(tmp_path: Path) -> None:
    out = _run("variants_bench.py", tmp_path=tmp_path)
    assert "## digits: 3 loads" in out
    assert "onnx-none on CPUExecutionProvider" in out and "1.00x" in out
    assert "load ratio (variants / plain)" in out


def test_delta_bench_quick(tmp_path: Path) -> None:
    from mqtt_broker import mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("the delta benchmark starts mosquitto, which is not installed")
    out = _run("delta_bench.py", tmp_path=tmp_path)
    assert "## delta updates" in out
    rows = [line for line in out.splitlines() if line.startswith("digits ")]
    assert [r.split("  ")[0] for r in rows] == ["digits last layer", "digits full retrain"]
    assert "rebuilt every target exactly" in out


def test_estimate_bench_quick(tmp_path: Path) -> None:
    out = _run("estimate_bench.py", tmp_path=tmp_path)
    assert "## digits CNN" in out
    rows = [line.split() for line in out.splitlines()]
    # Every estimate on the control and on the demo's strongest drift.
    for method, data in (("isotonic", "clean"), ("atc", "clean"), ("isotonic", "augmented"),
                         ("atc", "augmented"), ("logistic", "augmented"),
                         ("logistic", "pooled")):
        assert [method, data, "none", "(control)"] in [r[:4] for r in rows]
        assert [method, data, "35,", "0.15"] in [r[:4] for r in rows]
    assert "worst estimate error on drifted data:" in out and "goal: within 5 points" in out
    assert "estimate over one interval of" in out


@pytest.mark.slow
def test_text_bench_quick(tmp_path: Path) -> None:
    out = _run("text_bench.py", tmp_path=tmp_path)
    assert "## MiniLM intents (2 layers" in out
    for variant in ("PyTorch eager fp32", "PyTorch eager fp32, unpadded", "ONNX fp32",
                    "ONNX fp32 fused", "ONNX int8 optimized", "ONNX int8, padding kept",
                    "student int8"):
        assert any(line.startswith(variant) for line in out.splitlines()), variant
    assert "head retrain (+2 intents): package" in out
    assert "'Attention': 2" in out
    assert "goal int8 <= 0.25x eager" in out and "against unpadded eager" in out


def test_text_steps_bench_quick(tmp_path: Path) -> None:
    out = _run("text_steps_bench.py", tmp_path=tmp_path)
    assert "## int8 MiniLM corrections (2 layers" in out
    for graph in ("plain", "split", "smoothed + split", "trimmed recipe"):
        assert any(line.startswith(f"{graph} ") for line in out.splitlines()), graph


def test_shadow_bench_quick(tmp_path: Path) -> None:
    out = _run("shadow_bench.py", tmp_path=tmp_path)
    assert "## digits: serving latency of Agent.predict" in out
    rows = [line for line in out.splitlines() if line.startswith(("plain ", "shadow "))]
    assert len(rows) == 2 and all(line.split()[1] == "600" for line in rows)
    assert "p95 ratio (shadow / plain)" in out
    # Only the shadow blocks offer requests to the runner, and it compares some of them.
    assert re.search(r"shadowed [1-9]\d* of 600 offered", out), out


def test_verify_bench_quick(tmp_path: Path) -> None:
    out = _run("verify_bench.py", tmp_path=tmp_path)
    rows = {line.rsplit(None, 2)[0]: line.split()[-2:] for line in out.splitlines()
            if line.startswith(("before", "after a"))}
    assert set(rows) == {"before", "after a download", "after a restart"}, out
    assert all(float(cpu_ms) > 0 and float(ratio) > 0 for cpu_ms, ratio in rows.values()), out
