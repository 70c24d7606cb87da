"""``edgekit deploy`` and ``edgekit rollback`` end to end: real agents, real broker, the CLI
in-process (click's runner), exit codes and ``--json`` output."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _ota_fleet import Fleet, Packages
from click.testing import CliRunner
from mqtt_broker import MqttBroker

from edgekit.host.cli import cli

FLEET = "cli"
FAST = ["--probation-requests", "0", "--probation-seconds", "1", "--timeout", "120"]


@pytest.fixture(scope="module")
def fleet(broker: MqttBroker) -> Iterator[Fleet]:
    f = Fleet(broker, FLEET)
    yield f
    f.close()


def _run(*args: str) -> tuple[int, dict[str, Any], str]:
    result = CliRunner().invoke(cli, list(args))
    try:
        return result.exit_code, json.loads(result.stdout), result.stderr
    except ValueError:
        raise AssertionError(result.output) from None


def test_deploy_rollback_and_a_late_device(make_agent: Any, broker: MqttBroker, fleet: Fleet,
                                           pkgs: Packages, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # deploy signs with the operator key of $EDGEKIT_OPERATOR_KEY; rollback names it.
    monkeypatch.setenv("EDGEKIT_OPERATOR_KEY", str(pkgs.operator_private))
    a, b = make_agent(FLEET, "a"), make_agent(FLEET, "b")
    for agent in (a, b):
        agent.wait_healthy()
        fleet.wait_serving(agent.device, "1.0.0")

    code, out, progress = _run("deploy", str(pkgs.v2), "--fleet", FLEET, "--broker",
                               broker.url, "--json", *FAST)
    assert code == 0, out
    # One progress line per device and step on stderr (not a terminal: no redrawing).
    for device in ("a", "b"):
        assert any(line.startswith(device) and "succeeded" in line
                   for line in progress.splitlines()), progress
    assert "%" in progress
    assert set(out["targets"]) == {"a", "b"} and out["ok"] is True
    for device in ("a", "b"):
        target = out["targets"][device]
        assert target["outcome"] == "succeeded"
        assert target["serving"]["version"] == "2.0.0"
        assert fleet.wait_serving(device, "2.0.0")

    # A device that joins later converges on the fleet's retained document by itself (the
    # deploy command has exited, so a server keeps serving the package).
    fleet.serve(pkgs.v2)
    late = make_agent(FLEET, "c")
    late.wait_healthy()
    fleet.wait_serving("c", "2.0.0", timeout=120)

    # A failing deploy to one device (forced past the pre-flight, which sees that b accepts
    # only signed packages): exit 1, the reason in the JSON, the model unchanged.
    unsigned = pkgs.make(tmp_path / "unsigned-2.5.edgepkg", version="2.5.0", seed=22,
                         sign_key=None)
    code, out, _ = _run("deploy", str(unsigned), "--fleet", FLEET, "--device", "b",
                     "--broker", broker.url, "--json", "--force", *FAST)
    assert code == 1
    assert out["targets"]["b"]["outcome"] == "failed"
    assert out["targets"]["b"]["reason"] == "unsigned"
    assert fleet.serving("b")["version"] == "2.0.0"  # type: ignore[index]

    # A signed rollback of one device to the copy it keeps.
    code, out, _ = _run("rollback", "--fleet", FLEET, "--device", "a", "--to", "1.0.0",
                     "--key", str(pkgs.operator_private), "--broker", broker.url, "--json",
                     *FAST)
    assert code == 0, out
    assert out["targets"]["a"]["outcome"] == "succeeded"
    fleet.wait_serving("a", "1.0.0")
    assert fleet.serving("c")["version"] == "2.0.0"  # type: ignore[index]

    # A breaking interface change goes through when it is both declared and allowed.
    wide = pkgs.make(tmp_path / "wide-breaking.edgepkg", version="5.0.0", kind="wide",
                     seed=21, breaking=True)
    code, out, _ = _run("deploy", str(wide), "--fleet", FLEET, "--device", "c",
                        "--broker", broker.url, "--json", "--allow-breaking", *FAST)
    assert code == 0, out
    assert out["targets"]["c"]["serving"]["version"] == "5.0.0"
