"""The agent stays light: what it imports, what it exports, and what it installs on a Pi."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import device_agent
import edgekit.protocol

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "tensorflow", "keras", "onnx", "sklearn", "scipy", "converters", "tf2onnx",
         "litert_torch", "transformers", "matplotlib")


def test_importing_the_agent_pulls_in_nothing_heavy() -> None:
    script = (
        "import sys, json\n"
        "import device_agent, device_agent.cli, device_agent._http, device_agent._mqtt,"
        " device_agent._mqtt_api, device_agent._telemetry\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO, timeout=120, check=True)
    loaded = json.loads(result.stdout)
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
    assert heavy == [], f"device_agent imports {heavy}"
    assert not [m for m in loaded if m.startswith("edgekit.host.cli")]
    assert "onnxruntime" not in loaded  # runtimes are imported when a model loads


def test_agent_source_imports_only_the_light_core() -> None:
    allowed = {"edgekit", "edgekit.artifact", "edgekit.manifest", "edgekit.metrics",
               "edgekit.runtimes", "edgekit.errors", "edgekit.protocol", "edgekit.data",
               "edgekit.fsutil", "edgekit.typedconfig", "edgekit.signing", "edgekit.protocol.ota",
               "edgekit.protocol.signed", "edgekit.redact", "edgekit.calibration",
               "edgekit.delta", "edgekit.protocol.ota.shadow"}
    for path in (REPO / "device_agent").rglob("*.py"):
        for match in re.finditer(r"^\s*(?:from|import)\s+(edgekit[\w.]*)", path.read_text(),
                                 re.M):
            assert match.group(1) in allowed, f"{path.name} imports {match.group(1)}"


def test_public_names_are_exported_and_exist() -> None:
    for module in (device_agent, edgekit.protocol):
        assert sorted(module.__all__) == sorted(set(module.__all__))
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name} is listed but missing"
    public = {n for n in vars(device_agent) if not n.startswith("_")} - {"annotations", "cli",
                                                                         "config", "errors",
                                                                         "ota"}
    assert public <= set(device_agent.__all__), public - set(device_agent.__all__)
    assert (REPO / "device_agent" / "py.typed").exists()


def _agent_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["agent"]]


def test_agent_dependencies_resolve_for_raspberry_pi(tmp_path: Path) -> None:
    """linux aarch64, CPython 3.11, wheels only: what a 64-bit Raspberry Pi OS (bookworm,
    glibc 2.36) can install. pip matches --platform tags exactly, so every manylinux tag a
    glibc 2.36 system accepts is listed."""
    platforms = ["manylinux2014_aarch64"] + [f"manylinux_2_{v}_aarch64" for v in range(17, 37)]
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
           "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
           "--target", str(tmp_path / "target"), "--report", str(report), "--quiet",
           *[arg for p in platforms for arg in ("--platform", p)], *_agent_requirements()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"the agent extra does not resolve for aarch64:\n{result.stderr}"
    installs = json.loads(report.read_text())["install"]
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in installs}
    assert {"onnxruntime", "ai-edge-litert", "paho-mqtt", "psutil", "numpy"} <= names
    assert not names & {"torch", "tensorflow", "onnx", "scikit-learn", "keras"}, names
    for item in installs:
        wheel = item["download_info"]["url"].rsplit("/", 1)[-1]
        assert wheel.endswith(".whl"), wheel
        assert "aarch64" in wheel or wheel.endswith("-none-any.whl"), wheel
