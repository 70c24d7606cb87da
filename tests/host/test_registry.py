"""``edgekit registry`` and ``edgekit data export`` through the CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from edgekit.artifact import open_package, sha256_file
from edgekit.data import load_npz
from edgekit.host.cli import cli
from edgekit.host.db import SampleIn, Store
from edgekit.signing import generate_keypair, load_private_key


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory,
         make_package: Callable[..., Path]) -> dict[str, Path]:
    build_package = make_package
    root = tmp_path_factory.mktemp("pkgs")
    good = generate_keypair(root / "signer")
    other = generate_keypair(root / "other")
    out = {
        # 1.10.0 sorts above 1.2.0 only when versions are compared as numbers.
        "v1": build_package(root / "v1.edgepkg", version="1.2.0", seed=1, accuracy=0.91),
        "v2": build_package(root / "v2.edgepkg", version="1.10.0", seed=2, accuracy=0.95),
        "v1_other": build_package(root / "v1b.edgepkg", version="1.2.0", seed=3),
        "signed": build_package(root / "signed.edgepkg", version="2.0.0", seed=4,
                                sign_key=load_private_key(good.private_path)),
        "signed_b": build_package(root / "signed_b.edgepkg", version="2.1.0", seed=5,
                                  sign_key=load_private_key(good.private_path)),
        "good_pub": good.public_path,
        "other_pub": other.public_path,
    }
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


class Cli:
    def __init__(self, db_url: str, store_dir: Path) -> None:
        self.db_url, self.store_dir = db_url, store_dir

    def __call__(self, *args: str, code: int = 0, store: bool = True) -> Result:
        extra = ["--db", self.db_url] + (["--store", str(self.store_dir)] if store else [])
        result = CliRunner().invoke(cli, [*args, *extra])
        assert result.exit_code == code, result.output
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)


@pytest.fixture
def run(db_url: str, tmp_path: Path) -> Cli:
    return Cli(db_url, tmp_path / "artifacts")


def test_push_list_show_promote(run: Cli, pkgs: dict[str, Path]) -> None:
    pushed = run.json("registry", "push", str(pkgs["v1"]))
    assert pushed["created"] is True
    model = pushed["model"]
    stored = run.store_dir / "tiny" / "1.2.0" / "model.edgepkg"
    assert model["artifact"] == str(stored)
    assert sha256_file(stored) == sha256_file(pkgs["v1"]) == model["sha256"]
    assert (model["signed"], model["signature_verified"], model["parent"]) == (False, False, None)
    _runs_like_its_weights(stored)

    out = run("registry", "push", str(pkgs["v2"]), "--parent", "tiny:1.2.0",
              "--data", "digits rotated 15 degrees").stdout
    assert out.startswith("registered tiny:1.10.0: onnx classification")

    listed = run.json("registry", "list")["models"]
    assert [m["version"] for m in listed] == ["1.2.0", "1.10.0"]
    assert [m["summary"]["accuracy"] for m in listed] == [0.91, 0.95]

    shown = run.json("registry", "show", "tiny")  # no version: the highest one
    assert (shown["version"], shown["parent"], shown["lineage"]) == (
        "1.10.0", "tiny:1.2.0", ["tiny:1.2.0"])
    assert shown["data"] == "digits rotated 15 degrees"
    assert shown["evaluation"]["accuracy"]["artifact"]["accuracy"] == 0.95
    assert shown["recipe"] == {"quantize": "none", "opset": 17, "seed": 2}
    assert shown["manifest"]["name"] == "tiny"
    text = run("registry", "show", "tiny:1.10.0").stdout
    assert "lineage     tiny:1.10.0 <- tiny:1.2.0" in text
    assert "accuracy    0.9500 (macro F1 0.9000, 120 samples)" in text

    assert run.json("registry", "promote", "tiny:1.2.0")["channels"] == ["stable"]
    run("registry", "promote", "tiny:1.10.0")  # stable moves on
    run("registry", "promote", "tiny:1.2.0", "--channel", "canary")
    channels = {m["version"]: m["channels"] for m in run.json("registry", "list")["models"]}
    assert channels == {"1.2.0": ["canary"], "1.10.0": ["stable"]}
    assert "tiny:1.10.0" in run("registry", "list").stdout

    err = run("registry", "promote", "tiny:9.9.9", code=2).output
    assert "tiny:9.9.9 is not in the registry" in err
    assert "NAME:VERSION" in run("registry", "promote", "tiny", code=2).output
    assert "not in the registry" in run("registry", "show", "nothing", code=2).output


def _runs_like_its_weights(path: Path) -> None:
    """The stored package is a working model: onnxruntime agrees with its own weights."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model_bytes = open_package(path).model_bytes()
    weights = {t.name: numpy_helper.to_array(t)
               for t in onnx.load_from_string(model_bytes).graph.initializer}
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    logits = x @ weights["W"] + weights["b"]
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    (probs,) = session.run(None, {"x": x})
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_same_package_is_idempotent_other_content_refused(run: Cli,
                                                          pkgs: dict[str, Path]) -> None:
    run("registry", "push", str(pkgs["v1"]))
    stored = run.store_dir / "tiny" / "1.2.0" / "model.edgepkg"
    again = run.json("registry", "push", str(pkgs["v1"]))
    assert again["created"] is False
    out = run("registry", "push", str(pkgs["v1_other"]), code=1).output
    assert "tiny:1.2.0 is already registered with a different package" in out
    assert sha256_file(pkgs["v1_other"])[:12] in out
    assert sha256_file(stored) == sha256_file(pkgs["v1"])
    assert _files(run.store_dir) == [stored]
    assert len(run.json("registry", "list")["models"]) == 1
    # The same push restores a file that went missing from the artifact folder.
    stored.unlink()
    assert run.json("registry", "push", str(pkgs["v1"]))["created"] is False
    assert sha256_file(stored) == sha256_file(pkgs["v1"])


def _corrupt_member(src: Path, dst: Path) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "model.onnx":
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            zout.writestr(info, data)
    return dst


@pytest.mark.parametrize("damage", ["altered_member", "truncated", "not_a_package"])
def test_corrupt_package_is_refused_and_nothing_copied(run: Cli, pkgs: dict[str, Path],
                                                       tmp_path: Path, damage: str) -> None:
    bad = tmp_path / "bad.edgepkg"
    if damage == "altered_member":
        _corrupt_member(pkgs["v1"], bad)
        expected = "does not match its sha256"
    elif damage == "truncated":
        bad.write_bytes(pkgs["v1"].read_bytes()[:-200])
        expected = "not an edgekit package"
    else:
        bad.write_text("hello")
        expected = "not an edgekit package"
    out = run("registry", "push", str(bad), code=1).output
    assert out.startswith("error: ") and expected in out
    assert _files(run.store_dir) == []
    assert run.json("registry", "list")["models"] == []


def test_signatures(run: Cli, pkgs: dict[str, Path]) -> None:
    out = run("registry", "push", str(pkgs["signed"]), "--trusted-key", str(pkgs["other_pub"]),
              code=1).output
    assert "error:" in out and _files(run.store_dir) == []
    out = run("registry", "push", str(pkgs["v1"]), "--trusted-key", str(pkgs["good_pub"]),
              code=1).output
    assert "is not signed" in out and _files(run.store_dir) == []

    model = run.json("registry", "push", str(pkgs["signed"]), "--trusted-key",
                     str(pkgs["good_pub"]))["model"]
    assert (model["signed"], model["signature_verified"]) == (True, True)
    assert model["key_id"] is not None
    assert "(verified)" in run("registry", "show", "tiny:2.0.0").stdout
    # Without a trusted key the signature is recorded as present but unchecked.
    unchecked = run.json("registry", "push", str(pkgs["signed_b"]))["model"]
    assert (unchecked["signed"], unchecked["signature_verified"]) == (True, False)
    assert unchecked["key_id"] == model["key_id"]  # as the signature claims it
    assert "(not checked: no --trusted-key)" in run("registry", "show", "tiny:2.1.0").stdout


def test_concurrent_push_of_one_version_is_refused(run: Cli, pkgs: dict[str, Path]) -> None:
    holder = Store(run.db_url)
    assert holder.acquire_lease("registry:tiny:1.2.0", "another-push", 600)
    out = run("registry", "push", str(pkgs["v1"]), code=2).output
    assert "another push of tiny:1.2.0 is in progress" in out
    assert _files(run.store_dir) == []
    holder.release_lease("registry:tiny:1.2.0", "another-push")
    holder.close()
    assert run.json("registry", "push", str(pkgs["v1"]))["created"] is True


def test_parent_must_be_registered(run: Cli, pkgs: dict[str, Path]) -> None:
    out = run("registry", "push", str(pkgs["v2"]), "--parent", "tiny:1.2.0", code=2).output
    assert "parent tiny:1.2.0 is not in the registry" in out
    assert "NAME:VERSION" in run("registry", "push", str(pkgs["v2"]), "--parent", "tiny",
                                 code=2).output
    assert _files(run.store_dir) == []


def _seed_samples(db_url: str, now: dt.datetime) -> None:
    store = Store(db_url)
    old = now - dt.timedelta(hours=3)
    store.add_samples("lab", "pi-1", [
        SampleIn(f"p{i}", {"x": np.full(4, i, np.float32)}, label=i % 3,
                 ts=old if i < 2 else now - dt.timedelta(minutes=i)) for i in range(6)])
    store.add_samples("lab", "pi-2", [
        SampleIn("q0", {"x": np.full(4, 9, np.float32)}, label=1, ts=now)])
    store.close()


def test_data_export(run: Cli, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    _seed_samples(run.db_url, now)
    out = tmp_path / "recent.npz"
    report = json.loads(run("data", "export", "--since", "1h", "-o", str(out), "--json",
                            store=False).stdout)
    assert report["samples"] == 5
    assert report["arrays"] == {"x": {"shape": [5, 4], "dtype": "float32"},
                                "y": {"shape": [5], "dtype": "int64"}}
    data = load_npz(out, require_labels=True)
    assert sorted(data.inputs) == ["x"]
    # Oldest first: p5 (5 min ago) ... p2 (2 min ago), then q0.
    assert data.inputs["x"][:, 0].tolist() == [5, 4, 3, 2, 9]
    assert data.labels is not None and data.labels.tolist() == [2, 1, 0, 2, 1]

    since = (now - dt.timedelta(hours=4)).isoformat()
    run("data", "export", "--since", since, "--device", "pi-1", "-o", str(out), store=False)
    assert len(load_npz(out)) == 6

    empty = tmp_path / "none.npz"
    msg = run("data", "export", "--since", "1h", "--fleet", "other", "-o", str(empty),
              code=1, store=False).output
    assert "no labelled samples" in msg and not empty.exists()
    msg = run("data", "export", "--since", "yesterday", "-o", str(empty), code=2,
              store=False).output
    assert "neither an ISO time nor a duration" in msg



def test_since_accepts_durations_and_iso_times() -> None:
    from edgekit.errors import UsageError
    from edgekit.host.db import parse_since

    now = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
    assert parse_since("1h30m", now) == now - dt.timedelta(minutes=90)
    assert parse_since("7d", now) == now - dt.timedelta(days=7)
    assert parse_since("2026-05-01T10:00:00Z", now) == now - dt.timedelta(hours=2)
    assert parse_since("2026-05-01T10:00:00", now) == now - dt.timedelta(hours=2)  # naive: UTC
    with pytest.raises(UsageError):
        parse_since("5 minutes", now)
