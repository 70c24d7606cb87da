"""The controller with real agent processes (``python -m device_agent run``) on a real
mosquitto: their status, metrics, events and labelled samples reach the database and
``edgekit fleet status`` shows the accuracy the agents measured from feedback; a rollout
through ``edgekit deploy`` goes canary first, then a wave, over the agents' real OTA; and a
model that is worse on the canary's labelled traffic is rolled back by a signed instruction."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgekit.host.cli import cli
from edgekit.host.controller import Controller
from edgekit.host.db import RolloutState, Store
from edgekit.signing import generate_keypair, load_private_key

from ._controller_sim import broker, controller_config, register, wait_until

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


@dataclass(frozen=True)
class Signed:
    v1: Path
    v2: Path
    bad: Path  # 3.0.0, trained on shuffled labels: confident and wrong
    key: Path
    public: Path


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Signed:
    root = tmp_path_factory.mktemp("signed-pkgs")
    keys = generate_keypair(root / "signer")
    key = load_private_key(keys.private_path)
    x, y = digits_data()
    shuffled = np.random.default_rng(3).permutation(y)
    return Signed(
        write_digits_package(root / "v1.edgepkg", version="1.0.0", sign_key=key, data=(x, y)),
        write_digits_package(root / "v2.edgepkg", version="2.0.0", alpha=30.0, sign_key=key,
                             data=(x, y)),
        write_digits_package(root / "v3.edgepkg", version="3.0.0", sign_key=key,
                             data=(x, shuffled)),
        keys.private_path, keys.public_path)


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(device: str, fleet: str, url: str, package: Path,
              trusted: Path | None = None) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
        # One key for both roles here: it signs the packages and the desired documents.
        trust = ["--trusted-key", str(trusted), "--intent-key", str(trusted)] if trusted \
            else ["--allow-unsigned"]
        env.update(PYTHONUNBUFFERED="1", EDGEKIT_SAMPLES_FRACTION="1.0",
                   EDGEKIT_SAMPLES_MAX_PER_MINUTE="1000")
        with open(tmp_path / f"{device}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "device_agent", "run", "--device-id", device,
                 "--fleet", fleet, "--broker", url, "--model", str(package),
                 "--model-dir", str(tmp_path / device), *trust,
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


def _label(store: Store, fleet: str, device: str, x: np.ndarray, truth: np.ndarray) -> None:
    """Ask the agent to predict ``x`` over HTTP, then give it the true labels."""
    record = store.get_device(fleet, device)
    assert record is not None and record.status is not None
    reply = _post(record.status["http"], "/predict", {"inputs": {"x": x.tolist()}})
    _post(record.status["http"], "/feedback", {"prediction_id": reply["prediction_id"],
                                               "labels": truth.tolist()})


def _version(store: Store, fleet: str, device: str) -> str | None:
    record = store.get_device(fleet, device)
    return record.model_version if record is not None else None


def test_real_agents_rollout_and_quality_rollback(broker: Any, db_url: str, tmp_path: Path,
                                                  signed: Signed,
                                                  start_agent: Callable[..., Any]) -> None:
    x, y = digits_data()
    fleet = f"ota-{secrets.token_hex(3)}"
    store_dir = tmp_path / "store"
    register(db_url, store_dir, signed.v1, signed.v2, signed.bad)
    cfg = controller_config(
        broker_url=broker.url, db_url=db_url, store=store_dir, controller__fleets=[fleet],
        controller__signing_key=str(signed.key),
        controller__operator_keys=[str(signed.public)], rollout__canary="1",
        rollout__probation_seconds=0.5, rollout__quality_min_labels=30,
        rollout__device_timeout_s=60.0, rollout__rollback_timeout_s=60.0)
    devices = ("pi-1", "pi-2", "pi-3")
    with Controller(cfg) as ctl, Store(db_url) as store:
        for device in devices:
            start_agent(device, fleet, broker.url, signed.v1, trusted=signed.public)
        wait_until(lambda: len(store.list_devices(fleet, online=True)) == 3, 60, "the agents")
        # 1. edgekit deploy becomes a rollout: the canary, then a wave of two.
        result = CliRunner().invoke(cli, ["deploy", str(signed.v2), "--fleet", fleet,
                                          "--broker", broker.url, "--timeout", "120",
                                          "--probation-seconds", "0.5", "--json",
                                          "--key", str(signed.key)])
        assert result.exit_code == 0, result.output
        first = store.get_rollout(json.loads(result.stdout)["rollout"]["id"])
        assert first.state == RolloutState.SUCCEEDED
        waves = [e.data["devices"] for e in store.list_events(rollout_id=first.id,
                                                              kinds=["rollout.wave"])]
        assert waves == [["pi-1"], ["pi-2", "pi-3"]]
        wait_until(lambda: all(_version(store, fleet, d) == "2.0.0" for d in devices), 30,
                   "every agent on 2.0.0")
        succeeded = [e for e in store.list_events(rollout_id=first.id,
                                                  kinds=["update.succeeded"])]
        assert sorted(e.device for e in succeeded) == list(devices)
        # 2. A model that is worse in the field: the canary goes back, the others never move.
        rows = slice(1300, 1340)
        _label(store, fleet, "pi-1", x[rows], y[rows])
        wait_until(lambda: (store.get_device(fleet, "pi-1").metrics.label_count  # type: ignore[union-attr]
                            or 0) >= 40, 30, "the canary's labels with 2.0.0")
        assert ctl.engine is not None
        second = ctl.engine.create(fleet, "digits", "3.0.0")
        wait_until(lambda: _version(store, fleet, "pi-1") == "3.0.0", 60, "the canary on 3.0.0")
        _label(store, fleet, "pi-1", x[rows], y[rows])
        final = wait_until(lambda: (r := store.get_rollout(second.id)).state
                           in (RolloutState.ABORTED, RolloutState.SUCCEEDED) and r, 120,
                           "the second rollout to end")
        assert final.state == RolloutState.ABORTED and "canary quality" in final.reason
        abort = store.list_events(rollout_id=second.id, kinds=["rollout.abort"])[0]
        assert abort.data["previous"] > abort.data["new"] + 0.05
        states = {t.device: t.state for t in store.list_rollout_targets(second.id)}
        assert states == {"pi-1": "rolled_back", "pi-2": "skipped", "pi-3": "skipped"}
        wait_until(lambda: _version(store, fleet, "pi-1") == "2.0.0", 60,
                   "the canary back on 2.0.0")
        assert [_version(store, fleet, d) for d in ("pi-2", "pi-3")] == ["2.0.0", "2.0.0"]
