"""Controller metrics through prometheus_client, against a real mosquitto and SQLite: the
/metrics endpoint a controller serves, and the textfile for node_exporter."""

from __future__ import annotations

import secrets
import urllib.request
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from edgekit.host.cli import cli
from edgekit.host.controller import Controller
from edgekit.host.controller.metrics import ControllerMetrics
from edgekit.protocol import Kind

from ._controller_sim import broker, controller_config, wait_until
from .test_controller_ingest import Publisher, status

__all__ = ["broker"]  # the fixture, imported for pytest


def _samples(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_endpoint_counts_and_times(broker: Any, tmp_path: Path) -> None:
    fleet = f"metrics-{secrets.token_hex(3)}"
    cfg = controller_config(broker_url=broker.url, db_url=f"sqlite:///{tmp_path / 'c.db'}",
                            store=tmp_path / "store", controller__fleets=[fleet])
    ctl = Controller(cfg)
    metrics = ControllerMetrics(ctl)
    metrics.instrument()
    metrics.serve("127.0.0.1:0")
    port = metrics._server.server_port
    publisher = Publisher(broker.url, fleet)
    try:
        with ctl:
            publisher.send("d1", Kind.STATUS, status(fleet, "d1", "online", 1), retain=True)
            wait_until(lambda: (ctl.status()["ingest"]["stored"].get("status") or 0) >= 1, 30,
                       "status stored")
            ctl.step()
            ctl.step()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
    finally:
        publisher.close()
        metrics.close()
    values = _samples(text)
    assert values['edgekit_controller_messages_stored_total{kind="status"}'] >= 1
    assert "# TYPE edgekit_controller_step_seconds histogram" in text
    assert values["edgekit_controller_step_seconds_count"] >= 2
    assert values['edgekit_controller_step_seconds_bucket{le="+Inf"}'] == \
        values["edgekit_controller_step_seconds_count"]
    assert values["edgekit_controller_step_seconds_sum"] > 0
    assert "edgekit_controller_loop_errors_total" in values


def test_fleet_status_says_a_controller_fills_the_database(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["fleet", "status", "--db",
                                      f"sqlite:///{tmp_path / 'empty.db'}"])
    assert result.exit_code == 0
    assert "edgekit controller run" in result.output
