"""Delta updates with a real broker and real agent processes: the agent rebuilds the package
from the one it keeps and a delta served in chunks; a corrupt or hostile delta, one against
another base, or a base the device does not keep falls back to the full package; a kill -9
in the middle of the rebuild leaves the old verified model serving and the next start
succeeds."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from _ota_fleet import Fleet, Packages
from _pkgutil import digits_retrain_packages
from mqtt_broker import MqttBroker

from edgekit.artifact import sha256_file
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.delta import DeltaFile, write_delta
from edgekit.host.ota.deploy import delta_source
from edgekit.protocol.ota import DesiredDocument
from edgekit.protocol.ota.delta import decode_header


@pytest.fixture(scope="module")
def host(broker: MqttBroker) -> Iterator[HostClient]:
    client = HostClient(broker.url).connect()
    yield client
    client.close()


@pytest.fixture(scope="module")
def same_weights(pkgs: Packages, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 2.0.0 with v1's weights: a new manifest and golden file around the same model."""
    return pkgs.make(tmp_path_factory.mktemp("delta-ota") / "v1-as-2.edgepkg", version="2.0.0",
                     seed=1)


def _corrupt(delta: DeltaFile) -> DeltaFile:
    """Flip a byte of the literal stream; the document then names the corrupt file's own
    sha256, so only the rebuild can notice."""
    data = bytearray(delta.path.read_bytes())
    data[-8] ^= 0xFF
    delta.path.write_bytes(bytes(data))
    return dataclasses.replace(delta, sha256=hashlib.sha256(data).hexdigest())


def _hostile(delta: DeltaFile) -> DeltaFile:
    """Make the first copy op reach past the end of its source (the header stays well-formed
    JSON of the schema); the document names the hostile file's own sha256."""
    header, at = decode_header(delta.path.read_bytes())
    doc = msgspec.to_builtins(header)
    segment = next(s for s in doc["segments"] if s["ops"][0][0] > 0)
    segment["ops"][0] = [segment["ops"][0][0], 10**9, segment["ops"][0][2]]
    body = msgspec.json.encode(doc)
    data = b"EKDELTA1" + len(body).to_bytes(4, "big") + body + delta.path.read_bytes()[at:]
    delta.path.write_bytes(data)
    return dataclasses.replace(delta, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _deploy(fleet: Fleet, device: str, base: Path, target: Path, folder: Path, *,
            listed_base: str | None = None, corrupt: bool = False,
            hostile: bool = False) -> DesiredDocument:
    info = fleet.serve(target)
    delta = write_delta(base, target, folder)
    if corrupt:
        delta = _corrupt(delta)
    if hostile:
        delta = _hostile(delta)
    fleet.server.serve_delta(delta, info)
    entry = delta_source(delta, fleet.name)
    if listed_base is not None:
        entry = msgspec.structs.replace(entry, base_sha256=listed_base)
    return fleet.deploy(device, target, deltas=[entry])


def _delta_events(fleet: Fleet, device: str, deployment: str) -> list[dict[str, Any]]:
    return [e["data"] for e in fleet.update_events(device, deployment)
            if e["data"].get("source") == "delta"]


def test_delta_rebuilds_the_package(make_agent: Any, broker: MqttBroker, host: HostClient,
                                    same_weights: Path, pkgs: Packages, tmp_path: Path) -> None:
    fleet = Fleet(broker, "delta-ok", client=host)
    agent = make_agent("delta-ok", "dev")
    agent.wait_healthy()
    fleet.wait_serving("dev", "1.0.0")
    doc = _deploy(fleet, "dev", pkgs.v1, same_weights, tmp_path / "deltas")
    event = fleet.outcome("dev", doc.deployment)
    assert event["kind"] == "update.succeeded", event
    model = fleet.wait_serving("dev", "2.0.0")
    assert model["sha256"] == sha256_file(same_weights)
    used = [e["details"]["delta"] for e in _delta_events(fleet, "dev", doc.deployment)]
    assert len(used) == 1 and "fallback" not in used[0], used
    delta_size = doc.sources.deltas[0].size
    # Only the delta crossed the broker (and the server's one-byte reachability probes),
    # and it is a fraction of the package.
    assert used[0]["bytes"] == delta_size
    assert delta_size <= fleet.server.stats.bytes <= delta_size + fleet.server.stats.chunks
    assert delta_size < same_weights.stat().st_size / 2


@pytest.mark.parametrize("case", ["corrupt", "hostile", "other_base", "base_not_kept"])
def test_delta_failures_fall_back_to_the_package(case: str, make_agent: Any,
                                                 broker: MqttBroker, host: HostClient,
                                                 same_weights: Path, pkgs: Packages,
                                                 tmp_path: Path) -> None:
    name = f"delta-{case.replace('_', '-')}"
    fleet = Fleet(broker, name, client=host)
    agent = make_agent(name, "dev")
    agent.wait_healthy()
    fleet.wait_serving("dev", "1.0.0")
    folder = tmp_path / "deltas"
    # A twin of v1 (same weights, another manifest): a small delta, from a base not kept.
    twin = pkgs.make(tmp_path / "twin.edgepkg", version="1.0.1", seed=1)
    if case == "corrupt":
        doc = _deploy(fleet, "dev", pkgs.v1, same_weights, folder, corrupt=True)
    elif case == "hostile":
        doc = _deploy(fleet, "dev", pkgs.v1, same_weights, folder, hostile=True)
    elif case == "other_base":  # listed as against v1, which the device keeps
        doc = _deploy(fleet, "dev", twin, same_weights, folder,
                      listed_base=sha256_file(pkgs.v1))
    else:
        doc = _deploy(fleet, "dev", twin, same_weights, folder)
    event = fleet.outcome("dev", doc.deployment)
    assert event["kind"] == "update.succeeded", event
    assert fleet.wait_serving("dev", "2.0.0")["sha256"] == sha256_file(same_weights)
    why = [e["details"]["delta"]["fallback"] for e in _delta_events(fleet, "dev",
                                                                    doc.deployment)]
    expected = {"corrupt": "literal stream|sha256|writes past", "hostile": "past the end",
                "other_base": "the base here",
                "base_not_kept": "no package this device keeps"}[case]
    assert len(why) == 1 and re.search(expected, why[0]), why
    # The full package crossed the broker.
    assert fleet.server.stats.bytes >= same_weights.stat().st_size


def test_kill_during_rebuild(make_agent: Any, broker: MqttBroker, host: HostClient,
                             same_weights: Path, pkgs: Packages, tmp_path: Path) -> None:
    fleet = Fleet(broker, "delta-crash", client=host)
    agent = make_agent("delta-crash", "dev", env={"EDGEKIT_TEST_CRASH_AT": "rebuilding"})
    agent.wait_healthy()
    fleet.wait_serving("dev", "1.0.0")
    doc = _deploy(fleet, "dev", pkgs.v1, same_weights, tmp_path / "deltas")
    assert agent.wait_exit() == 137, agent.log()
    # Killed in the middle of the rebuild: the model in service is still v1, verified.
    active = json.loads((agent.workdir / "models" / "active.json").read_text())
    assert sha256_file(pkgs.v1)[:12] in json.dumps(active)
    assert sha256_file(same_weights)[:12] not in json.dumps(active)
    assert agent.journal["current"]["step"] == "downloading"

    agent.start(env={"EDGEKIT_TEST_CRASH_AT": ""})
    agent.wait_healthy()
    event = fleet.outcome("dev", doc.deployment)
    assert event["kind"] == "update.succeeded", event
    assert fleet.wait_serving("dev", "2.0.0")["sha256"] == sha256_file(same_weights)
    assert agent.predict_version() == "2.0.0"
    used = [e["details"]["delta"] for e in _delta_events(fleet, "dev", doc.deployment)]
    assert used and "fallback" not in used[-1], used


@pytest.mark.slow
def test_digits_last_layer_retrain_moves_a_small_delta(make_agent: Any, broker: MqttBroker,
                                                       host: HostClient, pkgs: Packages,
                                                       tmp_path: Path) -> None:
    """The demo's digits CNN, converted, then its last layer retrained and converted again:
    the device fetches a delta of at most 15 % of the package over the broker."""
    digits = digits_retrain_packages(tmp_path, pkgs.key)
    fleet = Fleet(broker, "delta-digits", client=host)
    agent = make_agent("delta-digits", "dev", model=digits["base"])
    agent.wait_healthy()
    fleet.wait_serving("dev", "1.0.0")
    target = digits["last_layer"]
    doc = _deploy(fleet, "dev", digits["base"], target, tmp_path / "deltas")
    event = fleet.outcome("dev", doc.deployment)
    assert event["kind"] == "update.succeeded", event
    assert fleet.wait_serving("dev", "1.1.0")["sha256"] == sha256_file(target)
    moved = fleet.server.stats.bytes
    assert doc.sources.deltas[0].size <= moved
    assert moved <= 0.15 * target.stat().st_size, (moved, target.stat().st_size)


def test_deploy_offers_a_delta_from_what_the_fleet_serves(make_agent: Any, broker: MqttBroker,
                                                          host: HostClient, pkgs: Packages,
                                                          same_weights: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """`edgekit deploy` reads the targets' statuses, builds a delta from the package they
    serve (--delta-from) and serves it; the device takes it."""
    from click.testing import CliRunner

    from edgekit.host.cli import cli

    monkeypatch.setenv("EDGEKIT_OPERATOR_KEY", str(pkgs.operator_private))
    fleet = Fleet(broker, "delta-cli", client=host)
    agent = make_agent("delta-cli", "dev")
    agent.wait_healthy()
    fleet.wait_serving("dev", "1.0.0")
    result = CliRunner().invoke(cli, [
        "deploy", str(same_weights), "--fleet", "delta-cli", "--broker", broker.url,
        "--delta-from", str(pkgs.v1), "--json", "--probation-requests", "0",
        "--probation-seconds", "1", "--timeout", "120"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["targets"]["dev"]["outcome"] == "succeeded"
    used = [e["details"]["delta"] for e in _delta_events(fleet, "dev", out["deployment"])]
    assert used and "fallback" not in used[0], used
