"""The controller's shadow stage with real agent processes on a real mosquitto: a candidate
trained on shuffled labels disagrees with the serving model on the canary's live requests,
so the rollout aborts before any device serves it; a good candidate passes the gate and its
canary follows."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgekit.host.controller import Controller
from edgekit.host.db import RolloutState, Store

from ._controller_sim import broker, controller_config, register, wait_until
from .test_controller_agents import Signed, _post, _version, digits_data, signed, start_agent

__all__ = ["broker", "signed", "start_agent"]  # fixtures, imported for pytest


@pytest.fixture
def traffic() -> Iterator[Callable[[Store, str, str], None]]:
    """Digits sent to a device's HTTP API the whole time, each with its true label."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(store: Store, fleet: str, device: str) -> None:
        record = store.get_device(fleet, device)
        assert record is not None and record.status is not None
        address = record.status["http"]
        x, y = digits_data()

        def run() -> None:
            i = 0
            while not stop.is_set():
                row = 1300 + i % 400
                try:
                    reply = _post(address, "/predict", {"inputs": {"x": [x[row].tolist()]}})
                    _post(address, "/feedback", {"prediction_id": reply["prediction_id"],
                                                 "label": int(y[row])})
                except OSError:
                    pass  # the agent may be busy switching; the next request tries again
                i += 1
                stop.wait(0.01)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    stop.set()
    for thread in threads:
        thread.join(30)


@pytest.mark.slow
def test_shadow_stage_gates_the_canary(broker: Any, tmp_path: Path, signed: Signed,
                                       start_agent: Callable[..., Any],
                                       traffic: Callable[[Store, str, str], None]) -> None:
    fleet = f"shadow-{secrets.token_hex(3)}"
    db_url = f"sqlite:///{tmp_path / 'edgekit.db'}"
    store_dir = tmp_path / "store"
    register(db_url, store_dir, signed.v1, signed.v2, signed.bad)
    cfg = controller_config(
        broker_url=broker.url, db_url=db_url, store=store_dir, controller__fleets=[fleet],
        controller__signing_key=str(signed.key),
        controller__operator_keys=[str(signed.public)], rollout__canary="1",
        rollout__shadow_enabled=True, rollout__shadow_requests=30,
        rollout__shadow_sample=1.0, rollout__shadow_min_agreement=0.85,
        rollout__shadow_timeout_s=90.0, rollout__device_timeout_s=60.0,
        # What this test judges is the shadow gate; the canary's quality check on ~50 labels
        # of one device differs by 0.05 between equal models often enough to abort at random.
        rollout__quality_margin=0.2)
    devices = ("pi-1", "pi-2")
    with Controller(cfg) as ctl, Store(db_url) as store:
        for device in devices:
            start_agent(device, fleet, broker.url, signed.v1, trusted=signed.public)
        wait_until(lambda: len(store.list_devices(fleet, online=True)) == 2, 60, "the agents")
        traffic(store, fleet, "pi-1")  # the canary's device: the one that shadows
        assert ctl.engine is not None

        # A candidate trained on shuffled labels: low agreement, the rollout aborts, and no
        # device ever serves it.
        bad = ctl.engine.create(fleet, "digits", "3.0.0")
        final = wait_until(lambda: (r := store.get_rollout(bad.id)).state
                           in (RolloutState.ABORTED, RolloutState.SUCCEEDED) and r, 120,
                           "the bad rollout to end")
        assert final.state == RolloutState.ABORTED and "shadow stage" in final.reason
        abort = store.list_events(rollout_id=bad.id, kinds=["rollout.abort"])[0]
        report = abort.data["reports"]["pi-1"]
        assert report["agreement"] < 0.5 and report["requests"] >= 30
        assert report["candidate"]["accuracy"] < report["serving"]["accuracy"]
        assert not store.list_events(rollout_id=bad.id, kinds=["rollout.wave"])
        assert not store.list_events(rollout_id=bad.id, kinds=["update.succeeded"])
        assert [_version(store, fleet, d) for d in devices] == ["1.0.0", "1.0.0"]

        # A good candidate: high agreement, the gate passes, the canary and a wave follow.
        good = ctl.engine.create(fleet, "digits", "2.0.0")
        final = wait_until(lambda: (r := store.get_rollout(good.id)).state
                           in (RolloutState.ABORTED, RolloutState.SUCCEEDED) and r, 150,
                           "the good rollout to end")
        assert final.state == RolloutState.SUCCEEDED, final.reason
        kinds = [e.kind for e in store.list_events(
            rollout_id=good.id, kinds=["rollout.shadow_started", "rollout.shadow",
                                       "rollout.wave"])]
        assert kinds == ["rollout.shadow_started", "rollout.shadow", "rollout.wave",
                         "rollout.wave"]
        passed = store.list_events(rollout_id=good.id, kinds=["rollout.shadow"])[0]
        assert passed.data["reports"]["pi-1"]["agreement"] >= 0.85
        wait_until(lambda: all(_version(store, fleet, d) == "2.0.0" for d in devices), 30,
                   "every agent on 2.0.0")
