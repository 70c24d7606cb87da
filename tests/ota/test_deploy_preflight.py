"""``edgekit deploy`` checks the fleet first: real agents on a real broker, the CLI in-process.

Refusals exit 1 at once with nothing published; ``--force`` publishes anyway, and when every
target then refuses the package, the desired document from before is back on the topic.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _ota_fleet import Fleet, Packages
from click.testing import CliRunner, Result
from mqtt_broker import MqttBroker

from edgekit.host.cli import cli
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.deploy import read_retained
from edgekit.protocol.ota.topics import desired_topic

FLEET = "preflight"
FAST = ["--probation-requests", "0", "--probation-seconds", "1", "--timeout", "120"]


@pytest.fixture(scope="module")
def fleet(broker: MqttBroker) -> Iterator[Fleet]:
    f = Fleet(broker, FLEET)
    yield f
    f.close()


def _deploy(broker: MqttBroker, *args: str) -> Result:
    return CliRunner().invoke(cli, ["deploy", *args, "--broker", broker.url, *FAST])


def _retained(broker: MqttBroker, topic: str) -> bytes | None:
    with HostClient(broker.url).connect() as client:
        return read_retained(client, topic).get(topic)


def test_refusals_and_restore(make_agent: Any, broker: MqttBroker, fleet: Fleet,
                              pkgs: Packages, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    # deploy signs its desired documents with the operator key the agents trust.
    monkeypatch.setenv("EDGEKIT_OPERATOR_KEY", str(pkgs.operator_private))
    # Nothing ever reported in this fleet: refused at once, nothing retained.
    empty = _deploy(broker, str(pkgs.v2), "--fleet", "nobody-here")
    assert empty.exit_code == 1, empty.output
    assert "has no device that ever reported" in empty.output and "--force" in empty.output
    assert _retained(broker, desired_topic("nobody-here")) is None

    agent = make_agent(FLEET, "d1")
    agent.wait_healthy()
    fleet.wait_serving("d1", "1.0.0")

    ghost = _deploy(broker, str(pkgs.v2), "--fleet", FLEET, "--device", "ghost")
    assert ghost.exit_code == 1 and "'ghost' has never reported" in ghost.output
    assert "known: d1" in ghost.output

    older = _deploy(broker, str(pkgs.older), "--fleet", FLEET)
    assert older.exit_code == 1 and "d1 runs" in older.output and "older" in older.output

    renamed = pkgs.make(tmp_path / "renamed.edgepkg", version="4.0.0", seed=11,
                        name="another")
    name_change = _deploy(broker, str(renamed), "--fleet", FLEET)
    assert name_change.exit_code == 1 and "serves model" in name_change.output

    untrusted = _deploy(broker, str(pkgs.bad_signature), "--fleet", FLEET)
    assert untrusted.exit_code == 1 and "does not trust key" in untrusted.output
    assert _retained(broker, desired_topic(FLEET)) is None  # nothing was published

    # Forced: the device refuses it, and the fleet's target goes back to what it was
    # (nothing), so a device joining later does not fetch the refused package.
    forced = _deploy(broker, str(pkgs.bad_signature), "--fleet", FLEET, "--force", "--json")
    assert forced.exit_code == 1, forced.output
    doc = json.loads(forced.stdout)
    assert doc["targets"]["d1"]["outcome"] == "failed"
    assert doc["restored"] == [desired_topic(FLEET)]
    assert _retained(broker, desired_topic(FLEET)) is None
    assert fleet.serving("d1")["version"] == "1.0.0"  # type: ignore[index]
