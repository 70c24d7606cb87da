"""No network-provided string chooses a path: a download is staged under the sha256 the
desired document names, and a manifest name is validated before it names any file.

Attack of issue 9 (item 5): the download was renamed to ``packages/{manifest.name}-...``
before the signature check, so a package named ``../../../x`` wrote outside the model folder.
"""

from __future__ import annotations

import copy
import json
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
)

import edgekit.protocol.ota as ota
from edgekit.artifact import open_package, sha256_file
from edgekit.errors import ArtifactError
from edgekit.manifest import Manifest, parse_version

TRAVERSAL = "../../../x"


def test_agent_never_writes_outside_its_model_folder(
        tmp_path: Path, broker: MqttBroker, make_agent, limits_pkgs: LimitsPackages) -> None:
    evil = build_package(tmp_path / "evil.edgepkg", version="9.0.0", name=TRAVERSAL, seed=11,
                         sign_key=limits_pkgs.ota.other_key)
    fleet = Fleet(broker, "lim-path")
    try:
        agent = make_agent("lim-path", "d1")
        agent.wait_healthy()
        with file_server(evil) as server:
            doc = ota.make_desired(deployment="d-path", fleet=fleet.name, name="ota-model", version="9.0.0",
                                   sha256=sha256_file(evil), size=evil.stat().st_size,
                                   url=server.url)
            fleet.desire("d1", doc)
            outcome = fleet.outcome("d1", "d-path")
        assert outcome["kind"] == "update.failed", outcome
        escaped = [p for p in tmp_path.parent.rglob("x-*") if p.is_file()]
        assert not escaped, escaped
        assert agent.predict_version() == "1.0.0"
        packages = agent.workdir / "models" / "packages"
        assert all(not p.name.startswith(".") or p.suffix == ".part"
                   for p in packages.iterdir()), list(packages.iterdir())
    finally:
        fleet.close()


@pytest.mark.parametrize("name", [TRAVERSAL, "a/b", "/etc/x", "..", ".hidden", "x\n",
                                  "a b", "", "x" * 129, "\u0661"])
def test_manifest_names_that_could_be_paths_are_refused(
        tmp_path: Path, name: str) -> None:
    pkg = build_package(tmp_path / "p.edgepkg", version="1.0.0", seed=1)
    doc = json.loads(open_package(pkg).manifest_bytes)
    bad = copy.deepcopy(doc)
    bad["name"] = name
    with pytest.raises(ArtifactError, match="manifest name"):
        Manifest.from_dict(bad)
    assert Manifest.from_dict(doc).name == "ota-model"


@pytest.mark.parametrize("version", ["1.0.0\n", "1..0", "-1", "\u0661.0", "1" * 19])
def test_versions_are_plain_dotted_digits(version: str) -> None:
    with pytest.raises(ArtifactError):
        parse_version(version)
