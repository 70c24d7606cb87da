"""The agent and controller benchmarks still run: their --quick modes, as subprocesses, print
their tables (no timing is checked: these are smoke runs on a shared machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_agent_bench_quick_prints_its_table() -> None:
    out = _run("agent_bench.py")
    for row in ("Agent.predict / raw call", "batch 32: raw / Agent.predict",
                "HTTP requests/s", "MQTT requests/s", "agent RSS idle / under load",
                "onnxruntime alone with the model (RSS floor)", "start-up to first HTTP answer"):
        assert row in out, out


@pytest.mark.parametrize("configs", ["sqlite"])
def test_controller_bench_quick_prints_its_table(configs: str) -> None:
    out = _run("controller_bench.py", "--configs", configs)
    for column in ("CONFIGURATION", "MAX FLEET @0.1HZ", "FLOOD MSG/S", "BARE PAHO MSG/S",
                   "RATIO", "1 controller, SQLite"):
        assert column in out, out
