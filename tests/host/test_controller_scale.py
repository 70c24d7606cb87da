"""Two controllers sharing one fleet through MQTT shared subscriptions and one PostgreSQL
database, against a real mosquitto: every metrics message is stored once, by one of them,
and a rollout has one owner. Simulated devices (:class:`SimDevice`) stand in for agents."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgekit.host.controller import Controller
from edgekit.host.db import RolloutState, Store
from edgekit.host.registry import Registry
from edgekit.signing import generate_keypair, load_private_key, load_public_key

from ._controller_sim import SimDevice, broker, controller_config, wait_until

__all__ = ["broker"]  # the fixture, imported for pytest


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_controllers_split_the_fleet(broker: Any, db_url: str, tmp_path: Path,
                                         make_package: Callable[..., Path]) -> None:
    keys = generate_keypair(tmp_path / "signer")
    key = load_private_key(keys.private_path)
    v1 = make_package(tmp_path / "v1.edgepkg", version="1.0.0", seed=0, sign_key=key)
    v2 = make_package(tmp_path / "v2.edgepkg", version="2.0.0", seed=1, sign_key=key)
    store_dir = tmp_path / "store"
    with Store(db_url) as store:
        registry = Registry(store, store_dir)
        first = registry.push(v1).record
        registry.push(v2)
    fleet = f"scale-{secrets.token_hex(3)}"
    controllers = [
        Controller(controller_config(broker_url=broker.url, db_url=db_url, store=store_dir,
                                     controller__id=f"ctl-{n}", controller__fleets=[fleet],
                                     controller__signing_key=str(keys.private_path),
                                     mqtt__share_group="edgekit-controllers")).start()
        for n in (1, 2)]
    serving = {"name": "tiny", "version": "1.0.0", "sha256": first.sha256}
    sims = [SimDevice(broker.url, fleet, f"dev{i:02d}", serving=serving, interval=0.1,
                      trusted=[load_public_key(keys.public_path)]).start() for i in range(12)]
    try:
        with Store(db_url) as store:
            wait_until(lambda: len(store.list_devices(fleet, online=True)) == 12, 30,
                       "the devices")
            assert controllers[0].engine is not None
            rid = controllers[0].engine.create(fleet, "tiny", "2.0.0",
                                               overrides={"canary": "2"}).id
            rollout = wait_until(lambda: (r := store.get_rollout(rid)).state
                                 in (RolloutState.SUCCEEDED, RolloutState.ABORTED) and r,
                                 90, "the rollout")
            assert rollout.state == RolloutState.SUCCEEDED
            claimed = store.list_events(rollout_id=rid, kinds=["rollout.claimed"])
            assert len(claimed) == 1 and claimed[0].data["controller"] in ("ctl-1", "ctl-2")
            owner = claimed[0].data["controller"]
            waves = store.list_events(rollout_id=rid, kinds=["rollout.wave"])
            assert sum(len(e.data["devices"]) for e in waves) == 12
            for sim in sims:
                sim.stop()
            published = sum(s._seq["metrics"] for s in sims)
            for ctl in controllers:
                assert ctl.ingest is not None and ctl.ingest.drain(30)
            wait_until(lambda: len(store.metrics_history(fleet)) >= published, 30,
                       f"{published} metrics messages in the database")
            rows = store.metrics_history(fleet)
            assert len(rows) == published
            stored = [ctl.ingest.stats.stored.get("metrics", 0)  # type: ignore[union-attr]
                      for ctl in controllers]
            duplicates = [ctl.ingest.stats.duplicates.get("metrics", 0)  # type: ignore[union-attr]
                          for ctl in controllers]
            # The group split the messages: each controller wrote some, none twice.
            assert all(n > 0 for n in stored) and sum(stored) == published
            assert duplicates == [0, 0]
            # Both serve the artifacts, the requests shared between them.
            chunks = [ctl.server.stats.chunks for ctl in controllers]  # type: ignore[union-attr]
            assert sum(chunks) >= 12
        assert all(s.version == "2.0.0" and s.downloads == 1 for s in sims)
        assert owner in {c.id for c in controllers}
    finally:
        for sim in sims:
            if not sim._stop.is_set():
                sim.stop()
        for ctl in controllers:
            ctl.stop()
