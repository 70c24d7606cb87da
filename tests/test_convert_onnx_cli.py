"""``edgekit convert`` to ONNX from the command line: signing and every bad input the
converter must refuse with a clear message, a non-zero exit and nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from convert_cases import digits_split, export_digits_onnx, trained_digits_state

from edgekit.data import save_npz
from edgekit.host.cli import cli


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    root = tmp_path_factory.mktemp("convert-cli")
    calib, evald, _ = digits_split()
    save_npz(root / "calib.npz", calib.inputs)
    save_npz(root / "eval.npz", evald.inputs, evald.labels)
    torch.save(trained_digits_state(), root / "state.pt")
    export_digits_onnx(root / "digits.onnx")
    return {"root": root, "calib": root / "calib.npz", "eval": root / "eval.npz",
            "state": root / "state.pt", "onnx": root / "digits.onnx"}


def run_cli(*args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---- signing ---------------------------------------------------------------------------


def test_signed_package_verifies_and_a_tampered_one_does_not(files: dict[str, Path],
                                                             tmp_path: Path) -> None:
    keys = run_cli("keys", "generate", tmp_path / "signing", "--json")
    assert keys.exit_code == 0, keys.output
    key = json.loads(keys.stdout)
    out = tmp_path / "signed.edgepkg"
    conv = run_cli("convert", files["onnx"], "--quantize", "dynamic", "--eval", files["eval"],
                   "--sign-key", key["private"], "-o", out)
    assert conv.exit_code == 0, conv.output
    assert "(signed)" in conv.stdout
    ok = run_cli("verify", out, "--trusted-key", key["public"], "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["key_id"] == key["key_id"]

    # One byte of the model changed, the manifest and signature kept: the hash check fails.
    tampered = tmp_path / "tampered.edgepkg"
    with zipfile.ZipFile(out) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "model.onnx":
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            dst.writestr(info, data)
    bad = run_cli("verify", tampered, "--trusted-key", key["public"])
    assert bad.exit_code != 0 and "model.onnx" in bad.output

    # A key the package was not signed with is not trusted.
    other = run_cli("keys", "generate", tmp_path / "other", "--json")
    wrong = run_cli("verify", out, "--trusted-key", json.loads(other.stdout)["public"])
    assert wrong.exit_code != 0 and "error:" in wrong.output


# ---- bad input -------------------------------------------------------------------------


def test_missing_model_file(tmp_path: Path) -> None:
    res = run_cli("convert", tmp_path / "nothere.pt2", "-o", tmp_path / "out.edgepkg")
    assert res.exit_code == 2  # a missing file argument is a usage error (docs/cli.md)
    assert "nothere.pt2 not found" in res.output and "hint:" in res.output
    assert listing(tmp_path) == set()


@pytest.mark.parametrize("name,expected", [
    ("broken.onnx", "is not a valid ONNX file"),
    ("broken.pt2", "is not a readable torch.export program"),
    ("broken.pt", "is not a readable TorchScript file"),
])
def test_corrupt_model_file(files: dict[str, Path], tmp_path: Path, name: str,
                            expected: str) -> None:
    data = files["onnx"].read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 3])  # a truncated copy
    res = run_cli("convert", tmp_path / name, "--eval", files["eval"], "-o",
                  tmp_path / "out.edgepkg")
    assert res.exit_code == 1, res.output
    assert expected in res.output and "hint:" in res.output
    assert listing(tmp_path) == {name}


def test_state_dict_given_as_model(files: dict[str, Path], tmp_path: Path) -> None:
    res = run_cli("convert", files["state"], "--eval", files["eval"], "-o",
                  tmp_path / "out.edgepkg")
    assert res.exit_code == 1
    assert "state_dict" in res.output and "--weights" in res.output
    assert "package.module:factory" in res.output
    assert listing(tmp_path) == set()


def test_factory_without_example_input_asks_for_input_shape(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "edgekit_test_noexample.py").write_text(
        "from convert_cases import digits_cnn_class\n\n\n"
        "def build():\n    return digits_cnn_class()()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = run_cli("convert", "edgekit_test_noexample:build", "-o", tmp_path / "out.edgepkg")
    assert res.exit_code == 1
    assert "needs an example input (x)" in res.output and "--input-shape x:1x" in res.output
    assert "out.edgepkg" not in listing(tmp_path)


def test_calibration_with_the_wrong_shape(files: dict[str, Path], tmp_path: Path) -> None:
    save_npz(tmp_path / "calib.npz", {"x": np.zeros((20, 1, 7, 7), np.float32)})
    res = run_cli("convert", files["onnx"], "--quantize", "int8", "--calibration",
                  tmp_path / "calib.npz", "-o", tmp_path / "out.edgepkg")
    assert res.exit_code == 1
    assert "input 'x': expected shape [batch, 1, 8, 8], found [20, 1, 7, 7]" in res.output
    assert listing(tmp_path) == {"calib.npz"}


def test_strict_parity_failure_writes_nothing(files: dict[str, Path], tmp_path: Path) -> None:
    res = run_cli("convert", files["onnx"], "--quantize", "int8", "--calibration",
                  files["calib"], "--eval", files["eval"], "--min-cosine", "1.0", "--strict",
                  "-o", tmp_path / "out.edgepkg")
    assert res.exit_code == 1
    assert "parity check failed: mean cosine" in res.output and "nothing was written" in res.output
    assert listing(tmp_path) == set()


def test_output_folder_missing(files: dict[str, Path], tmp_path: Path) -> None:
    res = run_cli("convert", files["onnx"], "--eval", files["eval"], "-o",
                  tmp_path / "no" / "such" / "out.edgepkg")
    assert res.exit_code == 2
    assert "does not exist" in res.output
    assert listing(tmp_path) == set()


def test_full_disk_leaves_no_partial_file(files: dict[str, Path], tmp_path: Path) -> None:
    """A real write failure: the child process may write at most 4 KiB per file
    (RLIMIT_FSIZE, with SIGXFSZ ignored so the write fails with EFBIG), and the package is
    larger. fp16 from an ONNX source writes no other file on the way."""
    out = tmp_path / "out.edgepkg"
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from edgekit.host.cli import main
        sys.argv = ["edgekit", "convert", {str(files["onnx"])!r}, "--quantize", "fp16",
                    "--eval", {str(files["eval"])!r}, "-o", {str(out)!r}]
        main()
    """)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"could not write {out}" in proc.stderr and "disk space" in proc.stderr
    assert listing(tmp_path) == set()
