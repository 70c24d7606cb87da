"""The maintenance policy picks among candidates by their shadow evidence
(``policy.pick = "shadow"``): the pick rule on its own, and with real agent processes on a
real mosquitto, where a candidate trained on shuffled labels and a good one are shadowed in
turn on the canary's device, the good one is rolled out and the decision holds both
reports."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgekit.host.controller import Controller
from edgekit.host.controller._pick import Evidence, pick_best
from edgekit.host.db import RolloutState, Store

from ._controller_sim import broker, controller_config, register, wait_until
from .test_controller_agents import Signed, _version, signed, start_agent
from .test_controller_shadow import traffic

__all__ = ["broker", "signed", "start_agent", "traffic"]  # fixtures, imported for pytest


def test_pick_rule() -> None:
    """Only passed trials count; label accuracy first, then agreement, then the order."""
    failed = Evidence("m:9", 9, False, accuracy=0.99, labelled=40, agreement=0.99)
    unlabelled = Evidence("m:2", 2, True, agreement=0.99)
    labelled = Evidence("m:3", 3, True, accuracy=0.90, labelled=40, agreement=0.91)
    better = Evidence("m:4", 4, True, accuracy=0.95, labelled=40, agreement=0.90)
    tied = Evidence("m:5", 5, True, accuracy=0.95, labelled=40, agreement=0.93)
    assert pick_best([failed]) is None
    assert pick_best([failed, unlabelled]) is unlabelled
    assert pick_best([unlabelled, labelled]) is labelled
    assert pick_best([labelled, better]) is better
    assert pick_best([better, tied]) is tied
    same = Evidence("m:6", 6, True, accuracy=0.95, labelled=40, agreement=0.93)
    assert pick_best([tied, same]) is tied  # first tried (the better offline) wins a tie


def _rollout_decision(store: Store, fleet: str) -> Any:
    """The policy's first decision to roll out; a decision that found no candidate fails."""
    for event in store.list_events(fleet=fleet, kinds=["policy.decision"]):
        assert event.reason == "not_enough_samples" or event.data["action"] == "rollout", \
            event.message
        if event.data["action"] == "rollout":
            return event
    return None


@pytest.mark.slow
def test_policy_picks_the_candidate_by_shadow(broker: Any, tmp_path: Path, signed: Signed,
                                              start_agent: Callable[..., Any],
                                              traffic: Callable[[Store, str, str], None]
                                              ) -> None:
    fleet = f"pick-{secrets.token_hex(3)}"
    db_url = f"sqlite:///{tmp_path / 'edgekit.db'}"
    store_dir = tmp_path / "store"
    register(db_url, store_dir, signed.v1, signed.v2, signed.bad)
    cfg = controller_config(
        broker_url=broker.url, db_url=db_url, store=store_dir, controller__fleets=[fleet],
        controller__signing_key=str(signed.key),
        controller__operator_keys=[str(signed.public)], rollout__canary="1",
        rollout__shadow_requests=40, rollout__shadow_sample=1.0,
        rollout__shadow_min_agreement=0.85, rollout__shadow_timeout_s=90.0,
        rollout__device_timeout_s=60.0, rollout__quality_margin=0.2,
        # Every window breaches (no model here reaches 0.999), so the policy fires; a job
        # that finds too few samples yet is tried again after the cooldown.
        policy__enabled=True, policy__threshold=0.999, policy__relative_drop=0.0,
        policy__min_labels=100, policy__consecutive=1, policy__interval_s=1.0,
        policy__min_samples=60, policy__cooldown_s=10.0, policy__strategy="registry",
        policy__pick="shadow")
    devices = ("pi-1", "pi-2")
    with Controller(cfg), Store(db_url) as store:
        for device in devices:
            start_agent(device, fleet, broker.url, signed.v1, trusted=signed.public)
        wait_until(lambda: len(store.list_devices(fleet, online=True)) == 2, 60, "the agents")
        traffic(store, fleet, "pi-1")  # the canary's device: the one that shadows
        decision = wait_until(lambda: _rollout_decision(store, fleet), 300,
                              "the policy's decision to roll out")
        assert decision.reason == "registered_shadow_best"
        shadow = {e["model"]: e for e in decision.data["shadow"]}
        assert list(shadow) == ["digits:2.0.0", "digits:3.0.0"]  # the better offline first
        good, bad = shadow["digits:2.0.0"], shadow["digits:3.0.0"]
        assert good["passed"] and not bad["passed"]
        assert good["reports"]["pi-1"]["agreement"] >= 0.85
        assert bad["reports"]["pi-1"]["agreement"] < 0.5 and bad["problems"]
        assert bad["accuracy"] is not None and good["accuracy"] is not None
        assert bad["accuracy"] < good["accuracy"]
        assert decision.data["candidate"]["model"] == "digits:2.0.0"
        assert decision.data["candidate"]["shadow"]["rollout"] == good["rollout"]
        trials = {good["rollout"]: RolloutState.SUCCEEDED, bad["rollout"]: RolloutState.ABORTED}
        for rollout_id, state in trials.items():
            trial = store.get_rollout(rollout_id)
            assert trial.plan["trial"] and trial.state == state
            assert not store.list_events(rollout_id=rollout_id, kinds=["rollout.wave"])

        # The winner goes through the normal canary and waves, without a second shadow stage.
        winner = decision.data["rollout"]
        assert decision.rollout_id == winner
        final = wait_until(lambda: (r := store.get_rollout(winner)).state
                           in (RolloutState.ABORTED, RolloutState.SUCCEEDED) and r, 150,
                           "the winner's rollout to end")
        assert final.state == RolloutState.SUCCEEDED, final.reason
        kinds = [e.kind for e in store.list_events(
            rollout_id=winner, kinds=["rollout.shadow_started", "rollout.wave"])]
        assert kinds == ["rollout.wave", "rollout.wave"]
        wait_until(lambda: all(_version(store, fleet, d) == "2.0.0" for d in devices), 30,
                   "every agent on 2.0.0")
