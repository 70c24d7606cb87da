"""The maintenance policy on both databases: hysteresis and label-free warnings on
hand-written windows; then, with a real mosquitto and simulated devices (:class:`SimDevice`
stands in for agents), choosing the better registered model, retraining with a command and
converting its model with the running package's recipe, and refusing a candidate that is
not better. Candidates are scored in the real runtime on labelled samples in the database."""

from __future__ import annotations

import secrets
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edgekit.artifact import open_package, sha256_file
from edgekit.host.controller import Controller, MaintenancePolicy, RolloutEngine, load_config
from edgekit.host.db import RolloutState, SampleIn, Store
from edgekit.host.mqtt_client import HostClient
from edgekit.host.registry import Registry
from edgekit.signing import generate_keypair, load_private_key, load_public_key

from ._controller_sim import SimDevice, broker, controller_config, metrics_payload, wait_until

__all__ = ["broker"]  # the fixture, imported for pytest

RETRAIN = textwrap.dedent('''
    """Least squares onto one-hot labels, written as the same ONNX graph as the fixtures."""
    import argparse

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    data = np.load(args.data)
    x, y = data["x"].astype(np.float64), data["y"]
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.linalg.lstsq(xb, np.eye(3)[y], rcond=None)[0] * 6.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]),
         helper.make_node("Add", ["xw", "b"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        "retrained",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(w[:-1].astype(np.float32), "W"),
                     numpy_helper.from_array(w[-1].astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, args.output)
    print("trained on", len(x), "samples")
''')


@dataclass(frozen=True)
class Models:
    paths: dict[str, Path]  # version -> package
    key: Path

    def predict(self, version: str, x: np.ndarray) -> np.ndarray:
        pkg = open_package(self.paths[version])
        session = ort.InferenceSession(pkg.model_bytes(), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(["probs"], {"x": x})[0]).argmax(axis=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory,
           make_package: Callable[..., Path]) -> Models:
    root = tmp_path_factory.mktemp("policy-pkgs")
    keys = generate_keypair(root / "signer")
    key = load_private_key(keys.private_path)
    return Models({v: make_package(root / f"{v}.edgepkg", version=v, seed=seed, sign_key=key)
                   for v, seed in (("1.0.0", 0), ("2.0.0", 1), ("3.0.0", 2))},
                  keys.private_path)


@dataclass
class Setup:
    fleet: str
    db_url: str
    store_dir: Path
    broker_url: str
    models: Models
    registry_versions: list[str]
    sims: list[SimDevice]
    controllers: list[Controller]

    def registry(self, store: Store) -> Registry:
        return Registry(store, self.store_dir)

    def add_samples(self, store: Store, labels_from: str, count: int = 240) -> None:
        x = np.random.default_rng(7).standard_normal((count, 4)).astype(np.float32)
        y = self.models.predict(labels_from, x)
        store.add_samples(self.fleet, "dev00", [
            SampleIn(prediction_id=f"p{i}", inputs={"x": x[i]}, label=int(y[i]), prediction=0)
            for i in range(count)])

    def start(self, accuracy: dict[str, float], **overrides: Any) -> Controller:
        serving = {"name": "tiny", "version": "1.0.0",
                   "sha256": sha256_file(self.models.paths["1.0.0"])}
        settings = {"policy__enabled": True, "policy__threshold": 0.7,
                    "policy__relative_drop": 0.0, "policy__min_labels": 20,
                    "policy__consecutive": 2, "policy__interval_s": 0.3,
                    "policy__min_samples": 50, "policy__cooldown_s": 600.0,
                    "controller__workdir": str(self.store_dir.parent / "work"), **overrides}
        ctl = Controller(controller_config(
            broker_url=self.broker_url, db_url=self.db_url, store=self.store_dir,
            controller__fleets=[self.fleet], controller__signing_key=str(self.models.key),
            controller__release_key=str(self.models.key), **settings)).start()
        self.controllers.append(ctl)
        for i in range(2):
            self.sims.append(SimDevice(self.broker_url, self.fleet, f"dev{i:02d}",
                                       serving=serving, accuracy=accuracy, interval=0.1,
                                       trusted=[load_public_key(self.models.key)]).start())
        return ctl


@pytest.fixture
def setup(request: pytest.FixtureRequest, broker: Any, db_url: str, tmp_path: Path,
          models: Models) -> Iterator[Setup]:
    versions = getattr(request, "param", ["1.0.0", "2.0.0", "3.0.0"])
    store_dir = tmp_path / "store"
    with Store(db_url) as store:
        registry = Registry(store, store_dir)
        for version in versions:
            registry.push(models.paths[version])
    made = Setup(f"pol-{secrets.token_hex(3)}", db_url, store_dir, broker.url, models,
                 versions, [], [])
    yield made
    for ctl in made.controllers:
        ctl.stop()
    for sim in made.sims:
        sim.stop()


def _decision(store: Store, fleet: str, timeout: float = 120.0) -> Any:
    return wait_until(lambda: store.list_events(fleet=fleet, kinds=["policy.decision"]),
                      timeout, "the policy's decision")[0]


# --------------------------------------------------------------------------- windows


def test_hysteresis_and_label_free_warnings(db_url: str, tmp_path: Path,
                                            models: Models) -> None:
    fleet = "hyst"
    store = Store(db_url)
    registry = Registry(store, tmp_path / "store")
    current = registry.push(models.paths["1.0.0"]).record
    settings = load_config(overrides={
        "policy.enabled": True, "policy.threshold": 0.7, "policy.relative_drop": 0.1,
        "policy.min_labels": 20, "policy.consecutive": 3, "policy.confidence_drop": 0.2,
        "policy.max_shift": 0.3}).policy
    engine = RolloutEngine(store, registry, HostClient("mqtt://127.0.0.1:1"),
                           load_config().rollout, controller_id="test", lease_s=5.0)
    policy = MaintenancePolicy(store, registry, engine, settings, controller_id="test",
                               fleets=[fleet], workdir=tmp_path / "work")
    model = {"name": "tiny", "version": "1.0.0", "sha256": current.sha256}
    for device in ("a", "b"):
        store.upsert_device_status(fleet, device, online=True, session=1, model_name="tiny",
                                   model_version="1.0.0", model_sha256=current.sha256)
    seq = {"a": 0, "b": 0}
    feedback = {"a": 0, "b": 0}

    def window(accuracy: float, *, labels: int = 30, histogram: dict[str, int] | None = None,
               confidence: float = 0.9) -> Any:
        for device in ("a", "b"):
            seq[device] += 1
            feedback[device] += labels
            store.record_metrics(fleet, device, seq=seq[device], payload=metrics_payload(
                fleet, device, seq[device], model=model, accuracy=accuracy, labels=labels,
                feedback_total=feedback[device], histogram=histogram or {"a": 40, "b": 40},
                confidence=confidence))
        return policy.evaluate(fleet)

    def kinds() -> list[str]:
        return [e.kind for e in store.list_events(fleet=fleet)]

    try:
        assert window(0.9) is not None and kinds() == ["policy.reference"]
        # The manifest's baseline is 0.9, so 0.8 breaks the relative drop (0.81), not the
        # threshold (0.7); one bad window alone does nothing.
        breached = window(0.8)
        assert breached is not None and breached.accuracy == pytest.approx(0.8)
        assert kinds()[-1] == "policy.breach"
        assert store.list_events(fleet=fleet)[-1].reason == "relative_drop"
        window(0.95)
        assert kinds()[-1] == "policy.recovered"
        window(0.5)
        window(0.5)
        assert kinds().count("policy.fired") == 0
        assert window(0.5, labels=5) is None  # too few labels: the window does not count
        assert kinds().count("policy.fired") == 0
        window(0.5)
        assert kinds().count("policy.fired") == 1 and kinds().count("policy.breach") == 4
        policy.wait_idle(60)
        decision = store.list_events(fleet=fleet, kinds=["policy.decision"])
        assert [(d.reason, d.data["action"]) for d in decision] == [("no_data", "none")]
        # Label-free signals warn once when they appear, and clear when they go.
        window(0.95, histogram={"a": 78, "c": 2}, confidence=0.6)
        warnings = store.list_events(fleet=fleet, kinds=["policy.warning"])
        assert sorted(w.reason for w in warnings) == ["confidence_falling", "prediction_shift"]
        shift = next(w for w in warnings if w.reason == "prediction_shift")
        assert shift.data["shift"] == pytest.approx(0.5 * (abs(78 / 80 - 0.5)
                                                           + abs(0 - 0.5) + 2 / 80))
        window(0.95, histogram={"a": 78, "c": 2}, confidence=0.6)
        assert len(store.list_events(fleet=fleet, kinds=["policy.warning"])) == 2
        window(0.95)
        assert len(store.list_events(fleet=fleet, kinds=["policy.warning_cleared"])) == 2
    finally:
        store.close()


# --------------------------------------------------------------------------- acting


def test_policy_rolls_out_the_best_registered_model(setup: Setup) -> None:
    with Store(setup.db_url) as store:
        setup.add_samples(store, labels_from="2.0.0")
        setup.start({"1.0.0": 0.5, "2.0.0": 0.95}, policy__strategy="registry")
        decision = _decision(store, setup.fleet)
        assert decision.data["action"] == "rollout" and decision.reason == "registered_better"
        scores = {s["model"]: s["accuracy"] for s in decision.data["registered"]}
        assert scores["tiny:2.0.0"] == pytest.approx(1.0)
        assert scores["tiny:2.0.0"] > scores["tiny:3.0.0"]
        assert decision.data["current"]["accuracy"] < 0.9
        assert decision.data["held_out"] == 72 and decision.data["samples"] == 240
        rollout = store.get_rollout(decision.data["rollout"])
        assert rollout.plan["source"] == "policy" and rollout.model_version == "2.0.0"
        wait_until(lambda: store.get_rollout(rollout.id).state == RolloutState.SUCCEEDED, 60,
                   "the policy's rollout")
        fired = store.list_events(fleet=setup.fleet, kinds=["policy.fired"])
        assert len(fired) == 1 and fired[0].data["value"] == pytest.approx(0.5)
    assert all(s.version == "2.0.0" for s in setup.sims)


@pytest.mark.parametrize("setup", [["1.0.0"]], indirect=True)
def test_policy_retrains_converts_and_rolls_out(setup: Setup, tmp_path: Path) -> None:
    script = tmp_path / "retrain.py"
    script.write_text(RETRAIN)
    command = f"{sys.executable} {script} --data {{data}} --output {{output}}"
    with Store(setup.db_url) as store:
        setup.add_samples(store, labels_from="2.0.0")
        setup.start({"1.0.0": 0.5, "1.0.1": 0.9}, policy__retrain_command=command)
        decision = _decision(store, setup.fleet, timeout=240)
        assert decision.reason == "retrained_better", decision.message
        assert decision.data["registered"] == []
        assert decision.data["retrained"]["converted"] is True
        retrained = setup.registry(store).get("tiny", "1.0.1")
        assert retrained.parent == "tiny:1.0.0" and retrained.signed
        assert retrained.recipe["quantize"] == "none" and retrained.format == "onnx"
        assert "field samples" in (retrained.data or "")
        assert decision.data["retrained"]["accuracy"] >= decision.data["current"]["accuracy"] \
            + 0.02
        rollout = store.get_rollout(decision.data["rollout"])
        wait_until(lambda: store.get_rollout(rollout.id).state == RolloutState.SUCCEEDED, 60,
                   "the retrained model's rollout")
        trained = np.load(next((setup.store_dir.parent / "work" / "policy").glob("*/train.npz")))
        assert len(trained["y"]) == 240 - 72  # the held-out samples never reach training
    assert all(s.version == "1.0.1" for s in setup.sims)


@pytest.mark.parametrize("setup", [["1.0.0", "2.0.0"]], indirect=True)
def test_candidate_not_better_means_no_rollout(setup: Setup) -> None:
    with Store(setup.db_url) as store:
        setup.add_samples(store, labels_from="1.0.0")  # the current model is right on them
        setup.start({"1.0.0": 0.5}, policy__strategy="registry")
        decision = _decision(store, setup.fleet)
        assert decision.data["action"] == "none" and decision.reason == "not_better"
        assert decision.data["current"]["accuracy"] == pytest.approx(1.0)
        assert "not better enough" in decision.message and "tiny:2.0.0" in decision.message
        time.sleep(1.0)  # a few more windows: the cooldown keeps it from acting again
        assert store.list_rollouts(fleet=setup.fleet) == []
        assert len(store.list_events(fleet=setup.fleet, kinds=["policy.fired"])) == 1
    assert all(s.version == "1.0.0" for s in setup.sims)
