"""Controller rollouts offer deltas, as `edgekit deploy` does: with real agent processes on a
real mosquitto, a rollout of the digits CNN with only its last layer retrained reaches a
device that serves the base version as a delta rebuilt on the device (its download source is
``delta``), and the same rollout with ``rollout.deltas`` off moves the full package."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _pkgutil import digits_retrain_packages

from edgekit.artifact import sha256_file
from edgekit.host.controller import Controller
from edgekit.host.db import RolloutState, Store
from edgekit.signing import load_private_key

from ._controller_sim import broker, controller_config, register, wait_until
from .test_controller_agents import Signed, _version, signed, start_agent

__all__ = ["broker", "signed", "start_agent"]  # fixtures, imported for pytest


def _sources(store: Store, rollout: int, device: str) -> list[dict[str, Any]]:
    """The ``update.downloading`` events of the device in the rollout: source and details."""
    return [{"source": (e.data or {}).get("source"),
             "delta": ((e.data or {}).get("details") or {}).get("delta")}
            for e in store.list_events(rollout_id=rollout, kinds=["update.downloading"],
                                       limit=1000) if e.device == device]


@pytest.mark.slow
def test_controller_rollout_sends_a_delta(broker: Any, tmp_path: Path, signed: Signed,
                                          start_agent: Callable[..., Any]) -> None:
    (tmp_path / "pkgs").mkdir()
    pkgs = digits_retrain_packages(tmp_path / "pkgs", load_private_key(signed.key))
    fleet = f"delta-{secrets.token_hex(3)}"
    db_url = f"sqlite:///{tmp_path / 'edgekit.db'}"
    store_dir = tmp_path / "store"
    register(db_url, store_dir, pkgs["base"], pkgs["last_layer"])
    cfg = controller_config(
        broker_url=broker.url, db_url=db_url, store=store_dir, controller__fleets=[fleet],
        controller__signing_key=str(signed.key),
        controller__operator_keys=[str(signed.public)], rollout__canary="1",
        rollout__device_timeout_s=120.0)
    devices = ("pi-1", "pi-2")
    with Controller(cfg) as ctl, Store(db_url) as store:
        for device in devices:
            start_agent(device, fleet, broker.url, pkgs["base"], trusted=signed.public)
        wait_until(lambda: len(store.list_devices(fleet, online=True)) == 2, 60, "the agents")
        assert ctl.engine is not None

        def roll(device: str, **overrides: Any) -> int:
            rollout = ctl.engine.create(fleet, "digits", "1.1.0", devices=[device],  # type: ignore[union-attr]
                                        overrides=overrides)
            final = wait_until(lambda: (r := store.get_rollout(rollout.id)).state
                               in (RolloutState.ABORTED, RolloutState.SUCCEEDED) and r, 150,
                               f"the rollout to {device} to end")
            assert final.state == RolloutState.SUCCEEDED, final.reason
            assert _version(store, fleet, device) == "1.1.0"
            return rollout.id

        # With rollout.deltas off, the full package moves over the broker.
        full = roll("pi-1", deltas=False)
        wave = store.list_events(rollout_id=full, kinds=["rollout.wave"])[0]
        assert wave.data["deltas"] == []
        assert {s["source"] for s in _sources(store, full, "pi-1")} == {"mqtt"}

        # By default the device that serves the base rebuilds the new package from a delta.
        delta = roll("pi-2")
        wave = store.list_events(rollout_id=delta, kinds=["rollout.wave"])[0]
        offered = wave.data["deltas"]
        assert [d["base_sha256"] for d in offered] == [sha256_file(pkgs["base"])]
        assert offered[0]["size"] <= 0.15 * pkgs["last_layer"].stat().st_size
        sources = _sources(store, delta, "pi-2")
        assert sources and sources[-1]["source"] == "delta", sources
        assert "fallback" not in sources[-1]["delta"], sources
        assert store.get_device(fleet, "pi-2").model_sha256 == sha256_file(  # type: ignore[union-attr]
            pkgs["last_layer"])
