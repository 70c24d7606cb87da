"""Kill -9 of the agent at every step of an update; the restarted agent finishes the update
or rolls it back, serves a verified model and reports truthfully which.

How the agent is stopped: ``EDGEKIT_TEST_CRASH_AT=<point>`` makes the agent call
``os._exit(137)`` right after it journalled that point. That leaves the disk exactly as a
kill -9 at that instant would (no handler runs, nothing is flushed beyond what was
fsynced), and it stops the agent at a known step. Sending SIGKILL from the test when the
journal shows a step would race with the agent, which often moves past the step before the
signal lands, so some steps would never be tested.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from _ota_fleet import Fleet, LoadClient, Packages, wait_until
from mqtt_broker import MqttBroker

from edgekit.host.mqtt_client import HostClient

# point -> (package deployed, outcome after the restart, reason, version then serving)
CRASH_POINTS = {
    "queued": ("v2", "update.succeeded", None, "2.0.0"),
    "downloading": ("v2", "update.succeeded", None, "2.0.0"),
    "verifying": ("v2", "update.succeeded", None, "2.0.0"),
    "staged": ("v2", "update.succeeded", None, "2.0.0"),
    "activating": ("v2", "update.succeeded", None, "2.0.0"),  # before the switch on disk
    "activated": ("v2", "update.rolled_back", "interrupted", "1.0.0"),  # switched on disk
    "probation": ("v2", "update.rolled_back", "interrupted", "1.0.0"),
    # A rollback under way keeps its reason across the restart.
    "rolling_back": ("nan", "update.rolled_back", "nonfinite_output", "1.0.0"),
}


@pytest.fixture(scope="module")
def host(broker: MqttBroker) -> Iterator[HostClient]:
    client = HostClient(broker.url).connect()
    yield client
    client.close()


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_kill_at_step(point: str, make_agent: Any, broker: MqttBroker, host: HostClient,
                      pkgs: Packages) -> None:
    package, outcome, reason, serving = CRASH_POINTS[point]
    fleet_name = f"crash-{point.replace('_', '-')}"
    fleet = Fleet(broker, fleet_name, client=host)
    agent = make_agent(fleet_name, "dev", env={"EDGEKIT_TEST_CRASH_AT": point})
    agent.wait_healthy()
    fleet.wait_serving("dev", "1.0.0")
    # The rollback needs a misbehaving model in probation, so requests must flow.
    client = LoadClient(agent) if point == "rolling_back" else None
    doc = fleet.deploy("dev", getattr(pkgs, package))
    assert agent.wait_exit() == 137, agent.log()
    if client is not None:
        client.stop()
    journal = agent.journal["current"]
    assert journal["deployment"] == doc.deployment
    crashed_at_offset = journal["offset"]

    agent.start(env={"EDGEKIT_TEST_CRASH_AT": ""})
    agent.wait_healthy()
    event = fleet.outcome("dev", doc.deployment)
    assert (event["kind"], event.get("reason")) == (outcome, reason), event
    model = fleet.wait_serving("dev", serving)
    # What the status names is what answers requests.
    assert agent.predict_version() == serving == model["version"]
    assert agent.journal["current"] is None
    if point == "downloading":
        # The download resumed from the journalled offset instead of starting over.
        assert crashed_at_offset > 0
        starts = [e["data"]["details"]["resume_from"]
                  for e in fleet.update_events("dev", doc.deployment)
                  if "resume_from" in (e["data"].get("details") or {})]
        assert starts == [0, crashed_at_offset]
    if outcome == "update.rolled_back":
        wait_until(lambda: (fleet.status["dev"].get("update") or {}).get("step")
                   == "rolled_back", 30, "the status to report the rollback")
