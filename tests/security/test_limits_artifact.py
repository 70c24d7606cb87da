"""Verify before use: a hostile package costs the verifier little memory and never gets
decompressed before its signature verifies; a crash loop in verification ends the update.

Attacks of issue 9 (item 4): a 1 MB package with a 1 GiB member and a junk signature took the
agent from 99 MB to 2.2 GB, and the journal resumed ``verifying`` after the restart.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
from _limits_support import (  # noqa: F401  (fixtures)
    Fleet,
    LimitsPackages,
    MqttBroker,
    broker,
    build_package,
    file_server,
    limits_pkgs,
    make_agent,
    peak_rss_kib,
    python_peak_growth_mib,
    write_bomb,
)

import edgekit.protocol.ota as ota
from edgekit.artifact import open_package, sha256_file, verify_package
from edgekit.errors import ArtifactError, SignatureError
from edgekit.signing import load_public_key

GIB = 1024**3
MEMORY_BOUND_MIB = 50


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bomb(tmp_path_factory.mktemp("bomb") / "bomb.edgepkg", member_bytes=GIB)


def test_bomb_with_junk_signature_is_refused_with_bounded_memory(
        bomb: Path, limits_pkgs: LimitsPackages) -> None:
    assert bomb.stat().st_size < 4 * 1024 * 1024
    measured = python_peak_growth_mib(
        "verify_package(path, [key])",
        setup="from edgekit.artifact import verify_package\n"
              "from edgekit.signing import load_public_key\n"
              f"path = {str(bomb)!r}\nkey = load_public_key({str(limits_pkgs.public_key)!r})")
    assert measured["result"] is not None and "Error" in measured["result"], measured
    assert measured["growth_mib"] < MEMORY_BOUND_MIB, measured


def test_member_inflating_past_the_ratio_cap_is_refused_from_the_directory(bomb: Path) -> None:
    with pytest.raises(ArtifactError, match="inflates"):
        open_package(bomb)


def test_signature_is_checked_before_any_member(tmp_path: Path,
                                                limits_pkgs: LimitsPackages) -> None:
    """A package signed by an untrusted key whose member is also altered: the refusal is the
    signature's (the member was never read), where it used to be the member's hash."""
    good = build_package(tmp_path / "p.edgepkg", version="1.0.0", seed=3,
                         sign_key=limits_pkgs.ota.other_key)
    altered = tmp_path / "altered.edgepkg"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(altered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "golden.npz":
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.writestr(info, data)
    with pytest.raises(SignatureError):
        verify_package(altered, [load_public_key(limits_pkgs.public_key)])


def test_member_larger_than_its_manifest_entry_is_refused(tmp_path: Path) -> None:
    pkg = build_package(tmp_path / "p.edgepkg", version="1.0.0", seed=3)
    grown = tmp_path / "grown.edgepkg"
    with zipfile.ZipFile(pkg) as src, zipfile.ZipFile(grown, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data + b"\0" if info.filename == "model.onnx" else data)
    with pytest.raises(ArtifactError, match="manifest says"):
        verify_package(grown, [], require_signature=False)


def test_agent_refuses_the_bomb_over_the_air_with_bounded_memory(
        bomb: Path, broker: MqttBroker, make_agent, limits_pkgs: LimitsPackages) -> None:
    fleet = Fleet(broker, "lim-bomb")
    try:
        agent = make_agent("lim-bomb", "d1", env={"EDGEKIT_OTA_MAX_ARTIFACT_BYTES": str(GIB)})
        agent.wait_healthy()
        fleet.wait_serving("d1", "1.0.0")
        assert agent.proc is not None
        before = peak_rss_kib(agent.proc.pid)
        with file_server(bomb) as server:
            doc = ota.make_desired(deployment="d-bomb", fleet=fleet.name, name="bomb", version="9.0.0",
                                   sha256=sha256_file(bomb), size=bomb.stat().st_size,
                                   url=server.url)
            fleet.desire("d1", doc)
            outcome = fleet.outcome("d1", "d-bomb")
        assert outcome["kind"] == "update.failed", outcome
        growth_mib = (peak_rss_kib(agent.proc.pid) - before) / 1024
        assert growth_mib < MEMORY_BOUND_MIB, growth_mib
        assert agent.predict_version() == "1.0.0"
        packages = agent.workdir / "models" / "packages"
        assert not list(packages.glob("*.staged")), os.listdir(packages)
    finally:
        fleet.close()


def test_crash_loop_in_verification_ends_the_update(
        broker: MqttBroker, make_agent, limits_pkgs: LimitsPackages) -> None:
    """An agent that dies every time it checks a package (EDGEKIT_TEST_CRASH_AT=verify stands
    for a verifier that runs out of memory) refuses the update on the fourth start instead of
    resuming into the same work for ever."""
    fleet = Fleet(broker, "lim-loop")
    try:
        agent = make_agent("lim-loop", "d1", env={"EDGEKIT_TEST_CRASH_AT": "verify"})
        agent.wait_healthy()
        fleet.deploy("d1", limits_pkgs.ota.v2, deployment="d-loop")
        assert agent.wait_exit() == 137
        for _ in range(2):
            agent.start()
            assert agent.wait_exit() == 137, agent.log()
        agent.start()
        agent.wait_healthy()
        outcome = fleet.outcome("d1", "d-loop")
        assert (outcome["kind"], outcome.get("reason")) == ("update.failed", "load_failed")
        assert "interrupted 3 times" in outcome["message"]
        assert agent.alive()
        assert agent.predict_version() == "1.0.0"
    finally:
        fleet.close()
