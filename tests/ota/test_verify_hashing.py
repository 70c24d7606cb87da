"""After a download the package file is not hashed again: the download computed its sha256
from the bytes it wrote, and verification, the loaded model and the model folder take that
digest. A restart (no digest at hand) hashes the file; the members' hashes and the signature
are checked either way, so a file changed on disk after the download is still refused. The
model member is inflated and hashed once, as it is read for the runtime.

Real signed packages (a ridge classifier on the digits, onnxruntime); the count of whole-file
hashes is taken by wrapping ``sha256_file`` where the device's modules call it."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest
from agent._digits import write_digits_package

from device_agent import _model, _store
from device_agent._model import TrustPolicy, load_model
from device_agent._store import ModelStore
from device_agent.ota import checks
from device_agent.ota.checks import verify_package_file
from device_agent.ota.errors import UpdateFailure
from edgekit.artifact import Package, sha256_file, verify_package
from edgekit.host.ota.deploy import desired_for_package
from edgekit.host.ota.store import ArtifactStore
from edgekit.protocol.ota import UpdateReason
from edgekit.runtimes import RuntimeOptions
from edgekit.signing import generate_keypair, load_private_key, load_public_key


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrustPolicy]:
    root = tmp_path_factory.mktemp("verify-hashing")
    keys = generate_keypair(root / "signing")
    pkg = write_digits_package(root / "digits-2.0.0.edgepkg", version="2.0.0",
                               sign_key=load_private_key(keys.private_path))
    return pkg, TrustPolicy((load_public_key(keys.public_path),))


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files the device's modules hash whole, in order."""
    seen: list[str] = []

    def counting(path: object) -> str:
        seen.append(Path(str(path)).name)
        return sha256_file(path)  # type: ignore[arg-type]

    for module in (checks, _model, _store):
        monkeypatch.setattr(module, "sha256_file", counting)
    return seen


def _doc(pkg: Path) -> object:
    return desired_for_package(ArtifactStore().add(pkg), "f")


def test_a_digest_checked_by_the_download_is_not_computed_again(
        signed: tuple[Path, TrustPolicy], hashed: list[str], tmp_path: Path) -> None:
    pkg, trust = signed
    sha = hashlib.sha256(pkg.read_bytes()).hexdigest()
    staged = tmp_path / "models" / "packages" / f"{sha}.staged"
    staged.parent.mkdir(parents=True)
    shutil.copy(pkg, staged)
    model = verify_package_file(staged, _doc(pkg), trust, RuntimeOptions(threads=1), 8,
                                checked_sha256=sha)
    stored = ModelStore(tmp_path / "models").add(model.path, sha256=model.sha256)
    assert hashed == []
    assert model.sha256 == sha and stored.sha256 == sha
    assert stored.path.name.endswith(f"-{sha[:12]}.edgepkg") and not staged.exists()


def test_without_a_digest_the_file_is_hashed_once(signed: tuple[Path, TrustPolicy],
                                                  hashed: list[str]) -> None:
    # A restart at `verifying`: the journal names the file, nothing in memory vouches for it.
    pkg, trust = signed
    model = verify_package_file(pkg, _doc(pkg), trust, RuntimeOptions(threads=1), 8)
    assert hashed == [pkg.name]
    assert model.sha256 == hashlib.sha256(pkg.read_bytes()).hexdigest()


def test_a_digest_that_is_not_the_documents_is_not_taken(
        signed: tuple[Path, TrustPolicy], hashed: list[str]) -> None:
    # Only a digest equal to the document's spares the hash: any other is checked on disk.
    pkg, trust = signed
    model = verify_package_file(pkg, _doc(pkg), trust, RuntimeOptions(threads=1), 8,
                                checked_sha256="0" * 64)
    assert hashed == [pkg.name]
    assert model.sha256 == hashlib.sha256(pkg.read_bytes()).hexdigest()


def test_a_file_changed_after_the_download_is_refused_by_its_members_hashes(
        signed: tuple[Path, TrustPolicy], tmp_path: Path) -> None:
    pkg, trust = signed
    sha = hashlib.sha256(pkg.read_bytes()).hexdigest()
    changed = tmp_path / "changed.edgepkg"
    data = bytearray(pkg.read_bytes())
    # A byte inside the model member's data (the largest member, stored after its header).
    with zipfile.ZipFile(pkg) as z:
        info = max(z.infolist(), key=lambda i: i.compress_size)
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    changed.write_bytes(bytes(data))
    with pytest.raises(UpdateFailure) as caught:
        verify_package_file(changed, _doc(pkg), trust, RuntimeOptions(threads=1), 8,
                            checked_sha256=sha)
    assert caught.value.reason in (UpdateReason.LOAD_FAILED, UpdateReason.BAD_SIGNATURE)


def test_the_model_member_is_inflated_and_hashed_once(signed: tuple[Path, TrustPolicy],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # verify_package hashes every member as a stream; the model is then read whole for the
    # runtime, checked against the same signed manifest as it is read: once is enough.
    pkg, trust = signed
    streamed: list[str] = []
    read: list[str] = []
    real_check, real_read = Package.check_member, Package.read_member

    def check_member(self: Package, name: str) -> None:
        streamed.append(name)
        real_check(self, name)

    def read_member(self: Package, name: str) -> bytes:
        read.append(name)
        return real_read(self, name)

    monkeypatch.setattr(Package, "check_member", check_member)
    monkeypatch.setattr(Package, "read_member", read_member)
    model = load_model(pkg, trust, RuntimeOptions(threads=1), check_golden=False)
    model_file = model.manifest.model_file
    others = sorted(set(model.manifest.files) - {model_file})
    assert others and sorted(streamed) == others
    assert read == [model_file]
    # The whole package is still checked where nothing reads the model afterwards.
    streamed.clear()
    report = verify_package(pkg, list(trust.trusted_keys))
    assert sorted(streamed) == sorted(model.manifest.files) and report.files_checked == len(
        streamed)
