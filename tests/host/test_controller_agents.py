"""The controller with real agent processes (``python -m device_agent run``) on a real
mosquitto: their status, metrics, events and labelled samples reach the database and
``edgekit fleet status`` shows the accuracy the agents measured from feedback."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgekit.cli import cli
from edgekit.host import Store
from edgekit.host.controller import Controller

from ._controller_sim import broker, controller_config, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))
from _digits import digits_data, write_digits_package  # noqa: E402

__all__ = ["broker"]  # the fixture, imported for pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    root = tmp_path_factory.mktemp("agents-pkgs")
    x, y = digits_data()
    return write_digits_package(root / "digits-1.0.0.edgepkg", version="1.0.0",
                                data=(x, y)), x, y


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(device: str, fleet: str, url: str, package: Path) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
        env.update(PYTHONUNBUFFERED="1", EDGEKIT_SAMPLES_FRACTION="1.0",
                   EDGEKIT_SAMPLES_MAX_PER_MINUTE="1000")
        with open(tmp_path / f"{device}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "device_agent", "run", "--device-id", device,
                 "--fleet", fleet, "--broker", url, "--model", str(package),
                 "--model-dir", str(tmp_path / device), "--allow-unsigned",
                 "--http", "127.0.0.1:0", "--telemetry-interval", "0.3"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(20)


def _post(address: str, path: str, doc: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"http://{address}{path}", data=json.dumps(doc).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        result: dict[str, Any] = json.loads(reply.read())
        return result


def test_real_agents_reach_the_database(broker: Any, db_url: str, tmp_path: Path,
                                        digits: tuple[Path, np.ndarray, np.ndarray],
                                        start_agent: Callable[..., Any]) -> None:
    package, x, y = digits
    fleet = f"agents-{secrets.token_hex(3)}"
    cfg = controller_config(broker_url=broker.url, db_url=db_url, store=tmp_path / "store",
                            controller__fleets=[fleet])
    with Controller(cfg), Store(db_url) as store:
        agents = {d: start_agent(d, fleet, broker.url, package) for d in ("pi-1", "pi-2")}
        wait_until(lambda: len(store.list_devices(fleet, online=True)) == 2, 60,
                   "both agents online")
        expected: dict[str, tuple[int, float]] = {}
        for i, device in enumerate(sorted(agents)):
            record = store.get_device(fleet, device)
            assert record is not None and record.model_version == "1.0.0"
            address = record.status["http"] if record.status else None
            assert address, "the agent's status names its HTTP address"
            rows = slice(1300 + 40 * i, 1340 + 40 * i)
            reply = _post(address, "/predict", {"inputs": {"x": x[rows].tolist()}})
            done = _post(address, "/feedback", {"prediction_id": reply["prediction_id"],
                                                 "labels": y[rows].tolist()})
            assert done == {"ok": True, "labelled": 40}
            expected[device] = (40, float(np.mean(np.asarray(reply["classes"]) == y[rows])))
        wait_until(lambda: all((d.metrics.label_count or 0) == 40
                               for d in store.list_devices(fleet)), 60, "the labels in metrics")
        wait_until(lambda: store.count_samples(fleet=fleet) == 80, 60, "80 labelled samples")
        status = CliRunner().invoke(cli, ["fleet", "status", "--fleet", fleet, "--db", db_url,
                                          "--json"])
        assert status.exit_code == 0, status.output
        for device in json.loads(status.stdout)["devices"]:
            labels, accuracy = expected[device["device"]]
            assert device["label_count"] == labels
            assert device["accuracy"] == pytest.approx(accuracy)
            assert device["latency_p50_ms"] is not None and device["online"] is True
        for i, device in enumerate(sorted(agents)):
            exported = store.export_samples(fleet=fleet, device=device)
            rows = slice(1300 + 40 * i, 1340 + 40 * i)
            assert exported.labels is not None
            assert sorted(exported.labels.tolist()) == sorted(y[rows].tolist())
            assert exported.inputs["x"].shape == (40, 64)
        kinds = {(e.device, e.kind) for e in store.list_events(fleet=fleet)}
        assert {("pi-1", "agent.started"), ("pi-2", "model.activated")} <= kinds
        agents["pi-2"].send_signal(signal.SIGTERM)
        agents["pi-2"].wait(30)
        wait_until(lambda: not store.get_device(fleet, "pi-2").online, 30,  # type: ignore[union-attr]
                   "the stopped agent to be offline")
        assert store.get_device(fleet, "pi-1").online  # type: ignore[union-attr]
