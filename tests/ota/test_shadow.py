"""Shadow evaluation with real agents on a real broker, and the runner in process.

The serving model and the candidates are ridge classifiers on scikit-learn's digits
(tests/agent/_digits.py): a good candidate (other regularisation) and a bad one trained on
shuffled labels. A client sends digits to the agent's HTTP API with feedback on every
answer, so both models' label accuracy is measured on the device.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from _ota_fleet import Packages
from agent._digits import digits_data, write_digits_package
from click.testing import CliRunner
from mqtt_broker import MqttBroker, wait_until

from device_agent import Agent, load_config
from device_agent._model import TrustPolicy, load_model
from device_agent._shadow import ShadowRunner, attach
from edgekit.errors import ProtocolError
from edgekit.host.cli import cli
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.deploy import read_retained
from edgekit.host.ota.tracker import DeploymentTracker, Outcome
from edgekit.protocol import Kind, topic
from edgekit.protocol.ota import make_shadow, parse_shadow_report
from edgekit.protocol.ota.events import UpdateStep, event_kind

FLEET = "shadow"


@pytest.fixture(scope="module")
def digits_pkgs(tmp_path_factory: pytest.TempPathFactory, pkgs: Packages) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shadow-pkgs")
    x, y = digits_data()
    shuffled = np.random.default_rng(7).permutation(y)
    return {
        "serving": write_digits_package(root / "serving.edgepkg", version="1.0.0",
                                        sign_key=pkgs.key),
        "good": write_digits_package(root / "good.edgepkg", version="1.1.0", alpha=40.0,
                                     sign_key=pkgs.key),
        "bad": write_digits_package(root / "bad.edgepkg", version="1.2.0", sign_key=pkgs.key,
                                    data=(x, shuffled)),
    }


class DigitsClient:
    """Sends one digit per request over HTTP, then its true label as feedback."""

    def __init__(self, url: str) -> None:
        x, y = digits_data()
        self.x, self.y = x[1200:], y[1200:]
        self.url = url
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return dict(json.loads(resp.read()))

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            row = i % len(self.y)
            try:
                reply = self._post("/predict", {"inputs": {"x": [self.x[row].tolist()]}})
                self._post("/feedback", {"prediction_id": reply["prediction_id"],
                                         "label": int(self.y[row])})
                self.sent += 1
            except OSError as exc:
                self.errors.append(str(exc)[:200])
            i += 1
            self._stop.wait(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.fixture
def client_for() -> Iterator[Any]:
    made: list[DigitsClient] = []

    def make(url: str) -> DigitsClient:
        made.append(DigitsClient(url))
        return made[-1]

    yield make
    for c in made:
        c.stop()


def _wait_retained_status(broker: MqttBroker, device: str) -> None:
    """The agent answers HTTP a moment before its status is retained on the broker."""
    host = HostClient(broker.url).connect()
    try:
        wait_until(lambda: topic(FLEET, device, Kind.STATUS) in read_retained(
            host, topic(FLEET, device, Kind.STATUS), 5), 30, f"{device}'s retained status")
    finally:
        host.close()


def _shadow_cli(pkg: Path, broker: MqttBroker, pkgs: Packages, *extra: str) -> Any:
    return CliRunner().invoke(cli, [
        "deploy", str(pkg), "--fleet", FLEET, "--device", "d1", "--broker", broker.url,
        "--key", str(pkgs.operator_private), "--direct", "--shadow", "--shadow-requests", "40",
        "--shadow-sample", "1.0", "--timeout", "120", *extra])


@pytest.mark.slow
def test_shadow_from_the_cli_good_and_bad_candidates(make_agent: Any, broker: MqttBroker,
                                                     pkgs: Packages,
                                                     digits_pkgs: dict[str, Path],
                                                     client_for: Any) -> None:
    agent = make_agent(FLEET, "d1", model=digits_pkgs["serving"])
    agent.wait_healthy()
    _wait_retained_status(broker, "d1")  # the CLI's preflight reads it
    client = client_for(agent.url)

    good = _shadow_cli(digits_pkgs["good"], broker, pkgs, "--json")
    assert good.exit_code == 0, good.output + agent.log()
    target = json.loads(good.stdout)["targets"]["d1"]
    report = target["shadow"]
    assert target["outcome"] == "shadowed"
    assert report["kind"] == "classifier" and report["requests"] >= 40
    assert report["agreement"] >= 0.9, report
    assert report["labelled"] > 0
    assert report["candidate"]["accuracy"] >= 0.85 and report["serving"]["accuracy"] >= 0.85
    assert report["candidate"]["version"] == "1.1.0"
    assert report["serving"]["latency_p95_ms"] is not None

    bad = _shadow_cli(digits_pkgs["bad"], broker, pkgs)
    assert bad.exit_code == 0, bad.output + agent.log()
    row = next(line for line in bad.stdout.splitlines() if line.startswith("d1 "))
    assert "shadowed" in row and "40/40" in row
    assert "agreement" in bad.stdout.splitlines()[1]
    agreement = float(row.split()[4])
    assert agreement < 0.5, bad.stdout

    # The candidates never served: the model in service, and the journal, say so.
    assert agent.predict_version() == "1.0.0"
    history = agent.journal.get("history", [])
    assert [h["outcome"] for h in history[-2:]] == ["shadowed", "shadowed"], history
    client.stop()
    assert not client.errors and client.sent > 0
    # Nothing is left retained for devices that join later.
    assert not list((agent.workdir / "models" / "packages").glob("*.staged"))


def _agent(tmp_path: Path, package: Path, pkgs: Packages) -> Agent:
    return Agent(load_config(env={}, overrides={
        "model.dir": str(tmp_path / "models"), "model.package": str(package),
        "model.trusted_keys": [str(pkgs.public_key)], "telemetry.interval_s": 0.0}))


def test_serving_answers_are_unchanged_and_a_full_queue_drops(tmp_path: Path, pkgs: Packages,
                                                             digits_pkgs: dict[str, Path]
                                                             ) -> None:
    agent = _agent(tmp_path, digits_pkgs["serving"], pkgs)
    try:
        x, _ = digits_data()
        rows = [x[i:i + 1] for i in range(1200, 1400)]
        before = [agent.predict({"x": r}).outputs["probs"].tobytes() for r in rows]
        serving = agent.model
        assert serving is not None
        candidate = load_model(digits_pkgs["bad"], TrustPolicy.from_files(
            [str(pkgs.public_key)], False), agent.slot.loader.options)
        # A tiny queue and a worker that idles 99 times its compute: most sampled requests
        # find the queue full.
        runner = ShadowRunner(candidate, serving, target=10_000, sample=1.0, cpu_share=0.01,
                              queue_size=1, seed=0)
        detach = attach(agent.predictor, runner)
        during = [agent.predict({"x": r}).outputs["probs"].tobytes() for r in rows]
        wait_until(lambda: runner.requests >= 1, 60, "the shadow worker's first comparison")
        detach()
        runner.close()
        after = [agent.predict({"x": r}).outputs["probs"].tobytes() for r in rows]
        assert during == before and after == before
        report = runner.report("d1", "stopped")
        assert report.offered == len(rows)
        assert report.dropped > 0
        assert report.requests + report.dropped <= len(rows)
        assert report.requests >= 1
        assert agent.model is serving
    finally:
        agent.stop()


def test_the_host_refuses_garbage_and_oversize_reports() -> None:
    model = {"name": "digits", "version": "1.1.0", "sha256": "a" * 64, "size": 10,
             "key_id": None}
    good = {"schema": "edgekit.shadow/1", "deployment": "d1", "kind": "classifier",
            "target": 5, "requests": 5, "rows": 5, "offered": 9, "dropped": 0,
            "agreement": 0.8, "labelled": 0, "ended": "requests",
            "serving": {"name": "digits", "version": "1.0.0", "sha256": "b" * 64},
            "candidate": {"name": "digits", "version": "1.1.0", "sha256": "a" * 64}}
    assert parse_shadow_report(good).agreement == 0.8
    for bad in ({**good, "agreement": 7.0}, {**good, "requests": -1},
                {**good, "schema": "edgekit.other/1"}, {**good, "ended": "whenever"},
                {**good, "serving": {"name": "x" * 300, "version": "1", "sha256": "b" * 64}},
                {**good, "padding": "x" * 20_000}, "not a dict", None):
        with pytest.raises(ProtocolError):
            parse_shadow_report(bad)

    def event(details: Any) -> bytes:
        return json.dumps({"schema": "edgekit.event/1", "device": "dev", "fleet": "f", "seq": 1,
                           "ts": 1.0, "kind": event_kind(UpdateStep.SHADOWED),
                           "message": "done",
                           "data": {"deployment": "d1", "step": "shadowed", "model": None, "serving": None,
                                    "details": details}}).encode()

    # An event whose data do not fit the update event at all is refused whole (counted, no
    # outcome); a well-formed event with a bad report closes the shadow as failed.
    for details, outcome in (({"shadow": {**good, "padding": "x" * 20_000}}, Outcome.FAILED),
                             ({"shadow": {**good, "deployment": "d2"}}, Outcome.FAILED),
                             ({"shadow": "junk"}, Outcome.FAILED),
                             ("junk", None), ({"shadow": good}, Outcome.SHADOWED)):
        tracker = DeploymentTracker("d1", "f", model, devices=["dev"])  # type: ignore[arg-type]
        tracker.observe_event("dev", event(details))
        progress = tracker.devices["dev"]
        assert progress.outcome == outcome, details
        assert tracker.refused.get("events", 0) == (1 if outcome is None else 0)
        assert (progress.shadow is not None) == (outcome == Outcome.SHADOWED)
        if outcome == Outcome.FAILED:
            assert progress.reason == "invalid_report"


def test_a_shadow_document_is_refused_by_schema_where_shadow_is_unknown() -> None:
    from edgekit.protocol.ota import DESIRED_SCHEMA, ShadowDesiredDocument, make_desired

    doc = make_desired(deployment="d1", fleet="f", name="m", version="1.0.0", sha256="a" * 64,
                       size=10, request_topic="edgekit/v1/f/_artifacts/get/x",
                       shadow=make_shadow(5, 0.5))
    # An agent that knows only edgekit.desired/2 refuses this one instead of activating it.
    assert isinstance(doc, ShadowDesiredDocument) and doc.shadow.requests == 5
    assert msgspec.to_builtins(doc)["schema"] != DESIRED_SCHEMA
    with pytest.raises(ProtocolError):
        make_shadow(0, 0.5)
    with pytest.raises(ProtocolError):
        make_shadow(5, 0.0)
