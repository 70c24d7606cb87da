"""Issue 11, item by item: what a new user meets in the first hour, from the README and
docs/devices.md. Each test names its item."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from edgekit.host.cli import cli

ROOT = Path(__file__).resolve().parents[2]


def run(*args: Any, **kw: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# ---- 1. the distribution name -------------------------------------------------------------

def _installs_old_name(text: str) -> list[str]:
    """``pip install`` commands that name ``edgekit`` (another project on PyPI)."""
    found = []
    for match in re.finditer(r"pip3? install([^\n]*)", text):
        args = re.split(r"&&|;|\|", match.group(1))[0].split()
        if any(re.fullmatch(r"edgekit(\[.*\])?", a.strip("\"'`")) for a in args):
            found.append(match.group(0))
    return found


def test_1_docs_install_the_distribution_by_its_name() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^name = "edgekit-fleet"$', pyproject, re.M)
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "docker").iterdir(),
             *(ROOT / "edgekit").rglob("*.py"), *(ROOT / "device_agent").rglob("*.py"),
             *(ROOT / "converters").rglob("*.py")]
    offenders = [f"{path.relative_to(ROOT)}: {line}" for path in files if path.is_file()
                 for line in _installs_old_name(path.read_text())]
    assert offenders == []
    assert 'pip install "edgekit-fleet[agent]"' in (ROOT / "docs" / "devices.md").read_text()
    assert 'pip install "edgekit-fleet[agent]"' in (ROOT / "README.md").read_text()


# ---- 2. data checked before the model runs; no tracebacks ----------------------------------

def test_2_wrong_shape_calibration_is_an_error_with_a_hint(first: dict[str, Path],
                                                           tmp_path: Path) -> None:
    result = run("convert", first["pt2"], "--quantize", "int8", "--calibration", first["wrong"],
                 "--eval", first["eval"], "-o", tmp_path / "x.edgepkg")
    assert result.exit_code == 1, result.output
    no_traceback(result)
    assert "error: calibration data" in result.output and "wrong_shape.npz" in result.output
    assert "input 'x': expected shape [batch, 64]" in result.output
    assert "hint:" in result.output and "Guard" not in result.output
    assert not (tmp_path / "x.edgepkg").exists()


def test_2_int64_data_for_a_float_model_is_cast_with_a_warning(first: dict[str, Path],
                                                               tmp_path: Path) -> None:
    result = run("convert", first["pt2"], "--quantize", "int8", "--calibration", first["int64"],
                 "--eval", first["eval"], "-o", tmp_path / "y.edgepkg")
    no_traceback(result)
    assert result.exit_code == 0, result.output
    assert "holds int64, cast to the model's float32" in result.output


def test_2_a_module_failing_on_the_data_is_a_data_error(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "edgekit_fh_net.py").write_text(
        "import torch\n\n\ndef build():\n    return torch.nn.Linear(64, 10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    np.savez(tmp_path / "ints.npz", x=np.ones((8, 64), np.int64))
    result = run("convert", "edgekit_fh_net:build", "--calibration", tmp_path / "ints.npz",
                 "-o", tmp_path / "z.edgepkg")
    assert result.exit_code == 1, result.output
    no_traceback(result)
    assert "the model fails on calibration data" in result.output
    assert "int64[1, 64]" in result.output and "hint:" in result.output


@pytest.mark.parametrize("command", ["evaluate", "bench", "prune", "optimize"])
def test_2_every_command_that_takes_data_checks_it(first: dict[str, Path], tmp_path: Path,
                                                   command: str) -> None:
    np.savez(tmp_path / "bad.npz", x=np.zeros((8, 32), np.float32), y=np.zeros(8, np.int64))
    bad = tmp_path / "bad.npz"
    package = tmp_path / "m.edgepkg"
    if command == "bench":  # bench times packages
        made = run("convert", first["pt2"], "-o", package)
        assert made.exit_code == 0, made.output
    args = {"evaluate": ["evaluate", first["pt2"], "--data", bad],
            "bench": ["bench", package, "--data", bad],
            "prune": ["prune", first["pt2"], "--sparsity", "0.5", "--eval", bad, "-o",
                      tmp_path / "p.pt2"],
            "optimize": ["optimize", first["pt2"], "--eval", bad, "-o", tmp_path / "o.edgepkg"]}
    result = run(*args[command])
    assert result.exit_code in (1, 2), result.output
    no_traceback(result)
    assert "error:" in result.output and "hint:" in result.output
    assert "[batch, 64]" in result.output or "does not fit" in result.output


def test_2_an_unexpected_error_is_one_line_and_debug_shows_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug cannot be produced on demand: a function of the command is replaced by one that
    # raises what a bug would.
    import edgekit.host.cli._convert as convert_cmds

    def broken(_path: str) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(convert_cmds, "open_package", broken)
    (tmp_path / "m.edgepkg").write_bytes(b"x")
    result = run("inspect", tmp_path / "m.edgepkg")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error: unexpected RuntimeError: boom" in result.output
    assert "hint: rerun with --debug" in result.output
    debug = run("--debug", "inspect", tmp_path / "m.edgepkg")
    assert isinstance(debug.exception, RuntimeError)


# ---- 3. files honour the umask -----------------------------------------------------------

def test_3_written_files_honour_the_umask_and_private_keys_stay_private(
        tmp_path: Path) -> None:
    from edgekit.data import save_npz
    from edgekit.signing import generate_keypair

    old = os.umask(0o022)
    try:
        generate_keypair(tmp_path / "k")
        save_npz(tmp_path / "d.npz", {"x": np.zeros((1, 2), np.float32)})
        os.umask(0o077)
        save_npz(tmp_path / "private.npz", {"x": np.zeros((1, 2), np.float32)})
    finally:
        os.umask(old)
    mode = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert mode == {"k.key": 0o600, "k.pub": 0o644, "d.npz": 0o644, "private.npz": 0o600}


# ---- 4 and 6. versions and names ---------------------------------------------------------

def _record(name: str, version: str, sha: str = "s", ref: str = "m.pt2") -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(name=name, version=version,
                           manifest={"source": {"sha256": sha, "reference": ref}})


def test_4_versions_are_semantic_and_follow_the_registry() -> None:
    from edgekit.host.naming import next_patch, resolve_naming

    first = resolve_naming(name="m", version=None, stem="m", source_sha256=None,
                           source_ref=None, records=[])
    assert first.version == "0.1.0"
    later = resolve_naming(name="m", version=None, stem="m", source_sha256=None, source_ref=None,
                           records=[_record("m", "0.1.0"), _record("m", "1.2.9"),
                                    _record("other", "7.0.0")])
    assert later.version == "1.2.10" and any("1.2.9" in n for n in later.notices)
    assert next_patch("2") == "2.0.1"
    explicit = resolve_naming(name="m", version="9.0.0", stem="m", source_sha256=None,
                              source_ref=None, records=[_record("m", "1.0.0")])
    assert explicit.version == "9.0.0"


def test_6_names_are_explicit_or_stable() -> None:
    from edgekit.host.naming import resolve_naming

    records = [_record("model", "0.1.3", sha="abc", ref="model.pt2")]
    same = resolve_naming(name=None, version=None, stem="model_v3", source_sha256="abc",
                          source_ref="v3/model_v3.pt2", records=records)
    assert (same.name, same.version) == ("model", "0.1.4")
    other = resolve_naming(name=None, version=None, stem="model_v3", source_sha256="def",
                           source_ref="v3/model_v3.pt2", records=records)
    assert other.name == "model_v3" and other.version == "0.1.0"
    assert any("after the file" in n and "the registry has: model" in n for n in other.notices)


def test_4_6_convert_takes_name_and_version_from_the_registry(first: dict[str, Path],
                                                             tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'reg.db'}"
    one = run("convert", first["pt2"], "--eval", first["eval"], "-o", tmp_path / "a.edgepkg",
              "--db", db, "--json")
    assert one.exit_code == 0, one.output
    assert (json.loads(one.stdout)["name"], json.loads(one.stdout)["version"]) == \
        ("model", "0.1.0")
    assert "notice: naming the model 'model' after the file" in one.stderr
    pushed = run("registry", "push", tmp_path / "a.edgepkg", "--db", db, "--store",
                 tmp_path / "store")
    assert pushed.exit_code == 0, pushed.output
    renamed = tmp_path / "v3"
    renamed.mkdir()
    (renamed / "model_v3.pt2").write_bytes(first["pt2"].read_bytes())
    two = run("convert", renamed / "model_v3.pt2", "--eval", first["eval"], "-o",
              tmp_path / "b.edgepkg", "--db", db, "--json")
    assert two.exit_code == 0, two.output
    doc = json.loads(two.stdout)
    assert (doc["name"], doc["version"]) == ("model", "0.1.1")


# ---- 5. deploy: see tests/ota/test_deploy_preflight.py for the broker end ------------------

def test_5_preflight_findings() -> None:
    from edgekit.host.ota.preflight import DeviceView, PreflightError, preflight
    from edgekit.host.ota.store import ArtifactInfo

    info = ArtifactInfo(sha256="a" * 64, size=1, path=Path("m.edgepkg"), name="m",
                        version="1.0.0", key_id="k1")
    assert [f.code for f in preflight("f", info, {}, devices=None).findings] == \
        ["unknown_fleet"]
    views = {"d1": DeviceView("d1", "online", "m", "2.0.0", trusted_keys=["k1"]),
             "d2": DeviceView("d2", "online", "other", "0.1.0", trusted_keys=["k2"])}
    report = preflight("f", info, views, devices=["d1", "d2", "ghost"])
    assert sorted((f.code, f.device) for f in report.findings) == [
        ("name_change", "d2"), ("older_version", "d1"), ("unknown_device", "ghost"),
        ("untrusted_key", "d2")]
    with pytest.raises(PreflightError, match="ghost"):
        report.raise_if_refused()
    signed = preflight("f", info, {"d1": views["d1"]}, devices=None, signed_rollback=True)
    assert signed.refusals == [] and [f.code for f in signed.warnings] == ["older_version"]


# ---- 7. exit codes as docs/cli.md says ---------------------------------------------------

def test_7_exit_codes_and_messages(tmp_path: Path, first: dict[str, Path]) -> None:
    missing = run("convert", tmp_path / "nothere.pt2", "-o", tmp_path / "o.edgepkg")
    assert missing.exit_code == 2 and "hint:" in missing.output
    nope = run("evaluate", first["pt2"], "--data", "nope.npz")
    assert nope.exit_code == 2 and "Usage:" not in nope.output
    assert nope.output.startswith("error: ") and "evaluate --help`" in nope.output
    gone = run("inspect", tmp_path / "gone.edgepkg")
    assert gone.exit_code == 2 and "hint:" in gone.output
    (tmp_path / "junk.edgepkg").write_bytes(b"not a zip")
    junk = run("inspect", tmp_path / "junk.edgepkg")
    assert junk.exit_code == 1 and "hint:" in junk.output
    verify = run("verify", tmp_path / "junk.edgepkg")
    assert verify.exit_code == 2 and "--trusted-key" in verify.output
    unknown = run("no-such-command")
    assert unknown.exit_code == 2 and unknown.output.startswith("error: ")


# ---- 8. Prometheus: see tests/agent/test_http_api.py and tests/host/test_controller_metrics.py

def test_8_latency_histogram_is_cumulative_in_seconds() -> None:
    from device_agent._stats import RequestStats

    stats = RequestStats()
    for latency in (0.00002, 0.0004, 0.003, 20.0):
        stats.record("python", latency, None)
    stats.take()  # a telemetry interval ends: the histogram does not reset
    hist = stats.latency_histogram()
    assert hist.count == 4 and hist.sum_s == pytest.approx(20.00342)
    counts = [n for _, n in hist.buckets]
    assert counts == sorted(counts) and counts[-1] == 4 and hist.buckets[-1][0] == float("inf")
    assert dict(hist.buckets)[0.0005] == 2


# ---- 9. a fast, quiet doctor -------------------------------------------------------------

def test_9_doctor_imports_no_framework_and_knows_every_version() -> None:
    code = ("import sys, json; from click.testing import CliRunner;"
            " from edgekit.host.cli import cli;"
            " r = CliRunner().invoke(cli, ['doctor', '--json']);"
            " heavy = [m for m in ('torch', 'tensorflow', 'ai_edge_quantizer', 'litert_torch')"
            " if m in sys.modules];"
            " print(json.dumps({'out': r.output, 'heavy': heavy, 'code': r.exit_code}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["code"] == 0 and doc["heavy"] == []
    assert proc.stderr == ""  # no TF/absl/torchao start-up chatter
    sdks = json.loads(doc["out"])["converter_sdks"]
    installed = {k: v for k, v in sdks.items() if v["available"]}
    assert "ai_edge_quantizer" in installed and "torch" in installed
    assert all(v["version"] and v["version"] != "?" for v in installed.values())


# ---- 10. a torch.export program carries its example input ----------------------------------

def test_10_convert_pt2_without_data_or_input_shape(first: dict[str, Path],
                                                   tmp_path: Path) -> None:
    result = run("convert", first["pt2"], "--to", "onnx", "-o", tmp_path / "m.edgepkg", "--json")
    assert result.exit_code == 0, result.output
    from edgekit.artifact import open_package

    spec = open_package(tmp_path / "m.edgepkg").manifest.inputs[0]
    assert (spec.name, spec.dtype, spec.shape) == ("x", "float32", ["batch", 64])


# ---- 11. the small things ----------------------------------------------------------------

def test_11_inspect_prints_the_recipe_readably() -> None:
    from edgekit.host.cli._convert import format_recipe

    text = format_recipe({"format": "onnx", "quantize": "int8", "per_channel": True,
                          "calibration_method": None, "nodes_to_exclude": [],
                          "graph_optimization": {"applied": True, "level": "basic"}})
    assert text.splitlines() == ["onnx, quantize int8, per channel yes",
                                 "    graph optimization: applied yes, level basic"]
    assert "{" not in text and "None" not in text


def _row(name: str, p50: float, size: int, drop: float = 0.0) -> dict[str, Any]:
    return {"name": name, "status": "ok", "meets_budget": True, "metric": 0.9 - drop,
            "drop": drop, "latency_p50_ms": p50, "size_bytes": size, "latency_ratio": 1.0,
            "nodes_in_float": []}


def test_11_optimize_prefers_the_smaller_on_a_timing_tie_and_says_gain() -> None:
    from converters.compress.report import change_text, choose, format_table

    rows = [_row("fp16", 0.100, 20_000, drop=-0.0044), _row("int8-static", 0.102, 6_000)]
    best, reason = choose(rows, metric="accuracy", max_drop=0.01, objective="latency",
                          fallback=None)
    assert best is not None and best["name"] == "int8-static"
    assert "tied for fastest" in reason
    clear = [_row("fp16", 0.050, 20_000), _row("int8-static", 0.100, 6_000)]
    assert choose(clear, metric="accuracy", max_drop=0.01, objective="latency",
                  fallback=None)[0]["name"] == "fp16"  # type: ignore[index]
    assert change_text(-0.0044) == "gain 0.0044" and change_text(0.003) == "drop 0.0030"
    table = format_table(rows, metric="accuracy", source={"framework": "pytorch",
                                                         "metric": 0.9}, chosen="int8-static")
    assert "gain 0.0044" in table and "-0.0044" not in table


def test_11_help_and_documented_defaults() -> None:
    help_text = run("convert", "--help").output
    for option in ("--min-cosine", "--min-top1"):
        line = help_text[help_text.index(option):].split("\n  -")[0]
        assert len(line.split()) > 3, line  # more than the option, its type and default
    for prefix in ("edgekit-release", "edgekit-operator"):
        assert prefix in (ROOT / "docs" / "cli.md").read_text()
        assert prefix in run("keys", "generate", "--help").output


def _overlaps(fig: Any, texts: list[Any]) -> int:
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    return sum(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_11_plot_labels_do_not_overlap() -> None:
    from matplotlib import pyplot as plt

    from converters.compress.report import draw_plot
    from edgekit.host.demo.report import accuracy_figure
    from edgekit.host.demo.traffic import Record

    rows = [_row(f"c{i}", 1.0 + 0.0005 * i, 1000) for i in range(8)]
    fig = draw_plot(rows, metric="accuracy", threshold=0.8, chosen="c0", title="t",
                    source={"framework": "pytorch", "metric": 0.9, "latency_p50_ms": 2.0})
    try:
        assert _overlaps(fig, fig.axes[0].texts) == 0
    finally:
        plt.close(fig)
    records = [Record(float(t), "d1", "base", "1.0.0", True, 1.0) for t in range(100)]
    markers = [(40.0, "deploy 2.0.0"), (41.0, "d1 updated"), (41.5, "d2 updated"),
               (42.0, "fleet updated")]
    fig = accuracy_figure(records, markers, 0.0)
    try:
        assert _overlaps(fig, fig.axes[0].texts) == 0
    finally:
        plt.close(fig)
