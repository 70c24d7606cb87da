"""The rollout engine against a real mosquitto and both databases, with simulated devices
(:class:`SimDevice` stands in for agents to keep these tests fast): canary then waves,
abort on failure rate, on timeout and on field quality with rollback, and a restarted
controller that carries on."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgekit.artifact import sha256_file
from edgekit.host.cli import cli
from edgekit.host.controller import Controller
from edgekit.host.db import RolloutState, Store, TargetState
from edgekit.host.ota.deploy import read_retained
from edgekit.host.registry import Registry
from edgekit.protocol.ota.topics import desired_topic
from edgekit.protocol.signed import open_sealed
from edgekit.signing import generate_keypair, load_private_key, load_public_key

from ._controller_sim import SimDevice, broker, controller_config, wait_until

__all__ = ["broker"]  # the fixture, imported for pytest

FINAL = {RolloutState.SUCCEEDED, RolloutState.ABORTED, RolloutState.FAILED}


@dataclass(frozen=True)
class Packages:
    v1: Path
    v2: Path
    key: Path
    public: Path

    def model(self, version: str) -> dict[str, str]:
        path = self.v1 if version == "1.0.0" else self.v2
        return {"name": "tiny", "version": version, "sha256": sha256_file(path)}


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory,
         make_package: Callable[..., Path]) -> Packages:
    root = tmp_path_factory.mktemp("rollout-pkgs")
    keys = generate_keypair(root / "signer")
    key = load_private_key(keys.private_path)
    return Packages(make_package(root / "v1.edgepkg", version="1.0.0", seed=0, sign_key=key),
                    make_package(root / "v2.edgepkg", version="2.0.0", seed=1, sign_key=key),
                    keys.private_path, keys.public_path)


@dataclass
class Fleet:
    """One test's fleet: its name, database, registry folder, devices and controllers."""

    name: str
    db_url: str
    store_dir: Path
    broker_url: str
    pkgs: Packages
    devices: list[SimDevice]
    controllers: list[Controller]

    def add_devices(self, count: int, **kwargs: Any) -> list[SimDevice]:
        trusted = [load_public_key(self.pkgs.public)]
        made = []
        for i in range(count):
            options = {k: (v(i) if callable(v) else v) for k, v in kwargs.items()}
            sim = SimDevice(self.broker_url, self.name, f"dev{i:02d}",
                            serving=self.pkgs.model("1.0.0"), trusted=trusted, **options)
            self.devices.append(sim.start())
            made.append(sim)
        return made

    def controller(self, **overrides: Any) -> Controller:
        cfg = controller_config(broker_url=self.broker_url, db_url=self.db_url,
                                store=self.store_dir, controller__fleets=[self.name],
                                controller__signing_key=str(self.pkgs.key),
                                controller__operator_keys=[str(self.pkgs.public)], **overrides)
        ctl = Controller(cfg).start()
        self.controllers.append(ctl)
        return ctl

    def store(self) -> Store:
        return Store(self.db_url)

    def wait_known(self, store: Store, count: int) -> None:
        wait_until(lambda: len(store.list_devices(self.name, online=True)) >= count, 30,
                   f"{count} devices to be known online")

    def wait_final(self, store: Store, rollout_id: int, timeout: float = 90.0) -> Any:
        return wait_until(lambda: (r := store.get_rollout(rollout_id)).state in FINAL and r,
                          timeout, f"rollout {rollout_id} to finish")


@pytest.fixture
def fleet(broker: Any, db_url: str, tmp_path: Path, pkgs: Packages) -> Iterator[Fleet]:
    store_dir = tmp_path / "store"
    with Store(db_url) as store:
        registry = Registry(store, store_dir)
        registry.push(pkgs.v1)
        registry.push(pkgs.v2)
    made = Fleet(f"roll-{secrets.token_hex(3)}", db_url, store_dir, broker.url, pkgs, [], [])
    yield made
    for ctl in made.controllers:
        ctl.stop()
    for sim in made.devices:
        sim.stop()


def _waves(store: Store, rollout_id: int) -> list[list[str]]:
    return [e.data["devices"] for e in store.list_events(rollout_id=rollout_id,
                                                         kinds=["rollout.wave"])]


def test_canary_then_waves_through_edgekit_deploy(fleet: Fleet) -> None:
    sims = fleet.add_devices(7, accuracy={"1.0.0": 0.8, "2.0.0": 0.9})
    ctl = fleet.controller(rollout__wave_min_labels=20, rollout__quality_min_labels=40)
    with fleet.store() as store:
        fleet.wait_known(store, 7)
        wait_until(lambda: all((d.metrics.label_count or 0) >= 40
                               for d in store.list_devices(fleet.name)), 30, "baseline labels")
        result = CliRunner().invoke(cli, ["deploy", str(fleet.pkgs.v2), "--fleet", fleet.name,
                                          "--broker", fleet.broker_url, "--timeout", "90",
                                          "--json", "--key", str(fleet.pkgs.key)])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        rollout = store.get_rollout(doc["rollout"]["id"])
        assert rollout.state == RolloutState.SUCCEEDED and doc["state"] == "succeeded"
        assert rollout.plan["source"] == "deploy" and rollout.plan["waves"] == [1, 2, 4]
        waves = _waves(store, rollout.id)
        assert [len(w) for w in waves] == [1, 2, 4]
        assert sorted(sum(waves, [])) == sorted(s.device for s in sims)
        targets = {t.device: t for t in store.list_rollout_targets(rollout.id)}
        assert {t.state for t in targets.values()} == {TargetState.SUCCEEDED}
        # Each wave began only after the one before had succeeded.
        for before, after in zip(waves, waves[1:], strict=False):
            done = max(targets[d].updated for d in before)
            assert min(targets[d].assigned_at for d in after) >= done
        quality = store.list_events(rollout_id=rollout.id, kinds=["rollout.quality"])
        assert len(quality) == 1 and quality[0].data["new"] == pytest.approx(0.9)
        assert quality[0].data["previous"] == pytest.approx(0.8)
    assert all(s.version == "2.0.0" and s.downloads == 1 for s in sims)
    assert ctl.server is not None and ctl.server.stats.chunks >= 7
    retained = read_retained(ctl.client, desired_topic(fleet.name, "+"))  # type: ignore[arg-type]
    fleet_doc = json.loads(open_sealed(retained[desired_topic(fleet.name)],
                                       [load_public_key(fleet.pkgs.public)]).payload)
    assert (fleet_doc["fleet"], fleet_doc["devices"]) == (fleet.name, None)
    assert fleet_doc["model"]["version"] == "2.0.0"
    assert [t for t in retained if t != desired_topic(fleet.name)] == []  # per-device cleared


def test_abort_on_failure_rate_rolls_the_canary_back(fleet: Fleet) -> None:
    # dev00 (the canary) updates; the next wave's devices refuse the new model.
    sims = fleet.add_devices(4, behavior=lambda i: {} if i == 0 else {"2.0.0": "fail"})
    ctl = fleet.controller(rollout__canary="1", rollout__wave_factor=2.0,
                           rollout__max_failure_rate=0.4)
    with fleet.store() as store:
        fleet.wait_known(store, 4)
        assert ctl.engine is not None
        created = ctl.engine.create(fleet.name, "tiny", "2.0.0")
        rollout = fleet.wait_final(store, created.id)
        assert rollout.state == RolloutState.ABORTED and "2 of 3 devices failed" in rollout.reason
        states = {t.device: t.state for t in store.list_rollout_targets(rollout.id)}
        assert states == {"dev00": "rolled_back", "dev01": "failed", "dev02": "failed",
                          "dev03": "skipped"}
        abort = store.list_events(rollout_id=rollout.id, kinds=["rollout.abort"])
        assert abort[0].reason == "failure_rate" and abort[0].data["failed"] == ["dev01",
                                                                                  "dev02"]
    assert [s.version for s in sims] == ["1.0.0"] * 4
    assert sims[0].outcomes[-1][0].endswith("-back") and sims[3].outcomes == []


def test_abort_on_timeout_counts_a_silent_device_as_failed(fleet: Fleet) -> None:
    sims = fleet.add_devices(3, behavior={"2.0.0": "silent"})
    ctl = fleet.controller(rollout__device_timeout_s=1.5)
    with fleet.store() as store:
        fleet.wait_known(store, 3)
        assert ctl.engine is not None
        rollout = fleet.wait_final(store, ctl.engine.create(fleet.name, "tiny", "2.0.0").id)
        assert rollout.state == RolloutState.ABORTED and "timed out" in rollout.reason
        timeouts = store.list_events(rollout_id=rollout.id, kinds=["rollout.device_timeout"])
        assert [e.device for e in timeouts] == ["dev00"]
        states = {t.device: t.state for t in store.list_rollout_targets(rollout.id)}
        # The silent canary was told to go back (it still served 1.0.0, so it answered).
        assert states == {"dev00": "rolled_back", "dev01": "skipped", "dev02": "skipped"}
    assert all(s.version == "1.0.0" for s in sims)


def test_abort_on_canary_quality_rolls_back(fleet: Fleet) -> None:
    sims = fleet.add_devices(3, accuracy={"1.0.0": 0.9, "2.0.0": 0.6})
    ctl = fleet.controller(rollout__quality_min_labels=40, rollout__quality_margin=0.05)
    with fleet.store() as store:
        fleet.wait_known(store, 3)
        wait_until(lambda: all((d.metrics.label_count or 0) >= 40
                               for d in store.list_devices(fleet.name)), 30, "baseline labels")
        assert ctl.engine is not None
        rollout = fleet.wait_final(store, ctl.engine.create(fleet.name, "tiny", "2.0.0").id)
        assert rollout.state == RolloutState.ABORTED and "canary quality" in rollout.reason
        abort = store.list_events(rollout_id=rollout.id, kinds=["rollout.abort"])[0]
        assert abort.reason == "quality"
        assert abort.data["new"] == pytest.approx(0.6)
        assert abort.data["previous"] == pytest.approx(0.9)
        assert abort.data["new_labels"] >= 40 and abort.data["previous_labels"] >= 40
        states = {t.device: t.state for t in store.list_rollout_targets(rollout.id)}
        assert states == {"dev00": "rolled_back", "dev01": "skipped", "dev02": "skipped"}
    assert [s.version for s in sims] == ["1.0.0"] * 3
    assert sims[0].downloads == 1  # the new model; back to the copy it kept (a revert)
    assert sims[1].downloads == sims[2].downloads == 0


def test_restarted_controller_carries_on(fleet: Fleet) -> None:
    sims = fleet.add_devices(5, accuracy={"1.0.0": 0.8, "2.0.0": 0.8}, interval=0.5)
    first = fleet.controller(controller__id="ctl-restart", rollout__wave_min_labels=40)
    with fleet.store() as store:
        fleet.wait_known(store, 5)
        assert first.engine is not None
        rid = first.engine.create(fleet.name, "tiny", "2.0.0").id
        wait_until(lambda: store.get_rollout(rid).current_wave >= 1, 60, "the second wave")
        first.stop()
        fleet.controllers.remove(first)
        paused = store.get_rollout(rid)
        assert paused.state == RolloutState.RUNNING and paused.owner is None
        fleet.controller(controller__id="ctl-restart")
        rollout = fleet.wait_final(store, rid)
        assert rollout.state == RolloutState.SUCCEEDED
        waves = _waves(store, rid)
        assert [len(w) for w in waves] == [1, 2, 2]
        claimed = store.list_events(rollout_id=rid, kinds=["rollout.claimed"])
        assert [e.data["controller"] for e in claimed] == ["ctl-restart", "ctl-restart"]
    for sim in sims:
        forward = [o for o in sim.outcomes if not o[0].endswith("-back")]
        assert forward == [(forward[0][0], "succeeded")], sim.device  # asked once, not twice
        assert sim.version == "2.0.0"


def test_deploy_refused_by_the_controller_says_why(fleet: Fleet, tmp_path: Path,
                                                   make_package: Callable[..., Path]) -> None:
    fleet.controller()
    other = make_package(tmp_path / "other.edgepkg", version="2.0.0", seed=5)
    result = CliRunner().invoke(cli, ["deploy", str(other), "--fleet", fleet.name,
                                      "--broker", fleet.broker_url, "--timeout", "30",
                                      "--key", str(fleet.pkgs.key)])
    assert result.exit_code == 2
    assert "refused the rollout" in result.output and "another package" in result.output
    with fleet.store() as store:
        assert store.list_rollouts(fleet=fleet.name) == []


def test_failed_rollout_through_deploy_prints_each_devices_reason(fleet: Fleet) -> None:
    fleet.add_devices(1, behavior={"2.0.0": "fail"})
    fleet.controller(rollout__canary="1")
    with fleet.store() as store:
        fleet.wait_known(store, 1)
    result = CliRunner().invoke(cli, ["deploy", str(fleet.pkgs.v2), "--fleet", fleet.name,
                                      "--broker", fleet.broker_url, "--timeout", "90",
                                      "--key", str(fleet.pkgs.key)])
    assert result.exit_code == 1, result.output
    assert "aborted" in result.stdout
    assert "dev00: failed [load_failed]" in result.stdout
