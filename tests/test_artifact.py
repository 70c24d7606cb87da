"""The .edgepkg format: write, open, verify, sign, and refuse what is unsafe or altered."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from _pkgutil import make_package
from click.testing import CliRunner

from edgekit import artifact
from edgekit.artifact import (
    extract_package,
    open_package,
    sign_package,
    verify_package,
)
from edgekit.errors import ArtifactError, SignatureError, UsageError
from edgekit.host.cli import cli
from edgekit.signing import generate_keypair, load_private_key, load_public_key


@pytest.fixture
def keys(tmp_path: Path):
    pair = generate_keypair(tmp_path / "k")
    return load_private_key(pair.private_path), load_public_key(pair.public_path), pair


def test_round_trip_reads_members_and_golden(tmp_path: Path) -> None:
    path = make_package(tmp_path / "m.edgepkg", model=b"abc" * 1000)
    pkg = open_package(path)
    assert pkg.model_bytes() == b"abc" * 1000
    inputs, outputs = pkg.golden()
    assert inputs["x"].shape == (2, 4) and np.all(outputs["y"] == 1)
    assert pkg.manifest.files["model.onnx"].size == 3000
    assert pkg.signature is None


def test_signed_package_verifies_and_tamper_is_caught(tmp_path: Path, keys) -> None:
    priv, pub, _ = keys
    path = make_package(tmp_path / "m.edgepkg", sign_key=priv)
    report = verify_package(path, [pub])
    assert report.signed and report.key_id == keys[2].key_id

    # Rewrite the model member with other bytes but keep the manifest: hash mismatch.
    tampered = tmp_path / "t.edgepkg"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, b"evil-bytes!" if info.filename == "model.onnx" else data)
    with pytest.raises(ArtifactError, match="sha256|bytes"):
        verify_package(tampered, [pub])

    # Change the manifest (and the hash of the model with it): signature mismatch.
    forged = tmp_path / "f.edgepkg"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(forged, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "manifest.json":
                doc = json.loads(data)
                doc["version"] = "9.9.9"
                data = json.dumps(doc).encode()
            dst.writestr(info.filename, data)
    with pytest.raises(SignatureError, match="does not match"):
        verify_package(forged, [pub])


def test_unsigned_refused_unless_allowed(tmp_path: Path, keys) -> None:
    path = make_package(tmp_path / "m.edgepkg")
    with pytest.raises(SignatureError, match="not signed"):
        verify_package(path, [keys[1]])
    assert verify_package(path, [], require_signature=False).signed is False


def test_untrusted_key_refused(tmp_path: Path, keys) -> None:
    other = generate_keypair(tmp_path / "other")
    path = make_package(tmp_path / "m.edgepkg", sign_key=load_private_key(other.private_path))
    with pytest.raises(SignatureError, match="not among the trusted keys"):
        verify_package(path, [keys[1]])


def test_sign_existing_package(tmp_path: Path, keys) -> None:
    path = make_package(tmp_path / "m.edgepkg")
    kid = sign_package(path, keys[0])
    assert kid == keys[2].key_id
    assert verify_package(path, [keys[1]]).key_id == kid


@pytest.mark.parametrize(
    "member",
    ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt", "dir\\evil.txt", "C:evil.txt"],
)
def test_path_traversal_member_refused(tmp_path: Path, member: str) -> None:
    path = make_package(tmp_path / "m.edgepkg")
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(member, b"x")
    dest = tmp_path / "out"
    with pytest.raises(ArtifactError, match="unsafe member name"):
        extract_package(path, dest)
    assert not (tmp_path / "evil.txt").exists()
    assert not dest.exists() or not any(dest.iterdir())


def test_unlisted_member_refused(tmp_path: Path) -> None:
    path = make_package(tmp_path / "m.edgepkg")
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("extra.bin", b"x")
    with pytest.raises(ArtifactError, match="unlisted"):
        open_package(path)


def test_oversized_manifest_and_member_refused(tmp_path: Path, monkeypatch) -> None:
    path = make_package(tmp_path / "m.edgepkg", model=b"\0" * 100_000)
    monkeypatch.setattr(artifact, "MAX_MANIFEST_BYTES", 10)
    with pytest.raises(ArtifactError, match="over the limit"):
        open_package(path)
    monkeypatch.undo()
    monkeypatch.setattr(artifact, "MAX_MEMBER_BYTES", 1000)
    # Refused from the central directory, before any member is decompressed.
    with pytest.raises(ArtifactError, match="over the limit"):
        open_package(path)


def test_not_a_package_and_truncated(tmp_path: Path) -> None:
    junk = tmp_path / "junk.edgepkg"
    junk.write_bytes(b"this is not a zip")
    with pytest.raises(ArtifactError, match="not an edgekit package"):
        open_package(junk)
    good = make_package(tmp_path / "m.edgepkg")
    truncated = tmp_path / "trunc.edgepkg"
    truncated.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(ArtifactError):
        verify_package(truncated, [], require_signature=False)
    with pytest.raises(ArtifactError, match="not found"):
        open_package(tmp_path / "missing.edgepkg")


def test_extract_writes_only_inside(tmp_path: Path) -> None:
    path = make_package(tmp_path / "m.edgepkg")
    dest = extract_package(path, tmp_path / "out")
    assert sorted(p.name for p in dest.iterdir()) == ["golden.npz", "manifest.json", "model.onnx"]


def test_cli_keys_sign_verify_inspect(tmp_path: Path) -> None:
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path):
        res = runner.invoke(cli, ["keys", "generate", "dev", "--json"])
        assert res.exit_code == 0, res.output
        kid = json.loads(res.output)["key_id"]
        assert (Path("dev.key").stat().st_mode & 0o777) == 0o600
        res = runner.invoke(cli, ["keys", "generate", "dev"])
        assert res.exit_code == 2 and "already exists" in res.output

        make_package(Path("m.edgepkg"))
        res = runner.invoke(cli, ["verify", "m.edgepkg", "--trusted-key", "dev.pub"])
        assert res.exit_code == 1 and "not signed" in res.output
        assert runner.invoke(cli, ["sign", "m.edgepkg", "--key", "dev.key"]).exit_code == 0
        res = runner.invoke(cli, ["verify", "m.edgepkg", "--trusted-key", "dev.pub", "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["key_id"] == kid

        res = runner.invoke(cli, ["inspect", "m.edgepkg", "--json"])
        doc = json.loads(res.output)
        assert doc["name"] == "tiny" and doc["signature"]["key_id"] == kid
        res = runner.invoke(cli, ["inspect", "m.edgepkg"])
        assert "input  x: float32['batch', 4]" in res.output

        Path("bad.key").write_text("not a key")
        res = runner.invoke(cli, ["sign", "m.edgepkg", "--key", "bad.key"])
        assert res.exit_code == 2 and "not a PEM private key" in res.output


def test_load_private_key_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load_private_key(tmp_path / "nope.key")


def test_members_are_deflated_only_where_it_saves_a_tenth(tmp_path: Path, keys) -> None:
    """Float32 weights (deflate saves ~7 % here) are stored, so a device reads them without
    inflating; int8 weights of a trained-looking distribution and the small members are
    deflated. Reading, verifying and re-signing work either way, and re-signing keeps each
    member's compression."""
    rng = np.random.default_rng(0)
    float_weights = (rng.normal(size=400_000) / 8).astype(np.float32).tobytes()  # 1.6 MB
    int8_weights = np.clip(np.round(rng.normal(size=1_600_000) * 20), -127, 127) \
        .astype(np.int8).tobytes()
    priv, pub, pair = keys
    stored = make_package(tmp_path / "f.edgepkg", model=float_weights, sign_key=priv)
    deflated = make_package(tmp_path / "q.edgepkg", model=int8_weights, sign_key=priv)
    for path, weights, kind in [(stored, float_weights, zipfile.ZIP_STORED),
                                (deflated, int8_weights, zipfile.ZIP_DEFLATED)]:
        with zipfile.ZipFile(path) as zf:
            assert zf.getinfo("model.onnx").compress_type == kind
            assert zf.getinfo("manifest.json").compress_type == zipfile.ZIP_DEFLATED
            assert zf.getinfo("golden.npz").compress_type == zipfile.ZIP_DEFLATED
        assert open_package(path).model_bytes() == weights
        assert verify_package(path, [pub]).files_checked >= 2
    other = generate_keypair(tmp_path / "other")
    sign_package(stored, load_private_key(other.private_path), out=tmp_path / "re.edgepkg")
    with zipfile.ZipFile(tmp_path / "re.edgepkg") as zf:
        assert zf.getinfo("model.onnx").compress_type == zipfile.ZIP_STORED
    assert verify_package(tmp_path / "re.edgepkg", [load_public_key(other.public_path)]).signed


def test_member_compression_judges_a_large_member_by_samples() -> None:
    rng = np.random.default_rng(1)
    noise = rng.bytes(3_000_000)
    assert artifact.member_compression(noise) == zipfile.ZIP_STORED
    assert artifact.member_compression(bytes(3_000_000)) == zipfile.ZIP_DEFLATED
    assert artifact.member_compression(b"") == zipfile.ZIP_DEFLATED
    half = noise[:1_500_000] + bytes(1_500_000)  # two samples of noise, two of zeros
    assert artifact.member_compression(half) == zipfile.ZIP_DEFLATED
