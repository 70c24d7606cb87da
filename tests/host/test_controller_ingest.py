"""The controller's ingest and the fleet/events commands, against a real mosquitto and both
databases: status, metrics, events and samples land in the database, duplicates from
at-least-once delivery are stored once, garbage is logged and ignored."""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from edgekit.host.cli import cli
from edgekit.host.controller import Controller
from edgekit.host.db import Store
from edgekit.protocol import Kind, Schema, encode, encode_array, topic
from edgekit.protocol.ota import UpdateEventData, UpdateModel, UpdateStep

from ._controller_sim import HARDWARE, broker, controller_config, metrics_payload, wait_until

__all__ = ["broker"]  # the fixture, imported for pytest

class Publisher:
    """A plain paho client standing in for devices that publish raw payloads."""

    def __init__(self, url: str, fleet: str) -> None:
        self.fleet = fleet
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.connect(host, int(port), 30)
        self.client.loop_start()

    def send(self, device: str, kind: Kind | str, payload: Any, retain: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else encode(payload)
        self.client.publish(topic(self.fleet, device, kind), data, qos=1,
                            retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fleet() -> str:
    # A fleet of its own per test: the module's broker keeps earlier tests' retained status.
    return f"ingest-{secrets.token_hex(3)}"


@pytest.fixture
def running(broker: Any, db_url: str, tmp_path: Path, fleet: str) -> Iterator[Controller]:
    cfg = controller_config(broker_url=broker.url, db_url=db_url, store=tmp_path / "store",
                            controller__fleets=[fleet])
    with Controller(cfg) as ctl:
        yield ctl


def status(fleet: str, device: str, state: str, session: int,
           version: str = "1.0.0") -> dict[str, Any]:
    return {"schema": Schema.STATUS.value, "state": state, "device": device, "fleet": fleet,
            "session": session, "ts": time.time(), "agent_version": "0.1.0", "runtimes": [],
            "hardware": HARDWARE, "model": {"name": "tiny", "version": version, "sha256": "a" * 64,
                                      "format": "onnx", "runtime": "onnxruntime"},
            "http": None, "started": time.time()}


def event(fleet: str, device: str, seq: int, kind: str = "model.activated") -> dict[str, Any]:
    return {"schema": Schema.EVENT.value, "device": device, "fleet": fleet, "seq": seq,
            "ts": time.time(), "kind": kind, "level": "info", "message": f"event {seq}",
            "data": {"n": seq}}


def sample(fleet: str, device: str, pid: str, rows: int) -> dict[str, Any]:
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    return {"schema": Schema.SAMPLE.value, "device": device, "fleet": fleet, "seq": 1,
            "ts": time.time(), "prediction_id": pid,
            "model": {"name": "tiny", "version": "1.0.0", "sha256": "a" * 64},
            "inputs": {"x": encode_array(x)}, "label": list(range(rows)),
            "prediction": [0] * rows}


def test_ingest_stores_each_kind_once_and_ignores_garbage(running: Controller, broker: Any,
                                                          db_url: str, fleet: str) -> None:
    pub = Publisher(broker.url, fleet)
    try:
        pub.send("d1", Kind.STATUS, status(fleet, "d1", "online", 2), retain=True)
        model = {"name": "tiny", "version": "1.0.0", "sha256": "a" * 64}
        for seq in (1, 2, 2, 1):  # the repeats are at-least-once redeliveries
            pub.send("d1", Kind.METRICS, metrics_payload(fleet, "d1", seq, model=model,
                                                         accuracy=0.5 + seq / 10, labels=seq))
        for seq in (1, 1, 2):
            pub.send("d1", Kind.EVENTS, event(fleet, "d1", seq))
        pub.send("d1", Kind.SAMPLES, sample(fleet, "d1", "p1", 3))
        pub.send("d1", Kind.SAMPLES, sample(fleet, "d1", "p1", 3))
        garbage = [
            (Kind.METRICS, b"not json"),
            (Kind.METRICS, {**metrics_payload(fleet, "d1", 9, model=model), "seq": "nine"}),
            (Kind.METRICS, {**metrics_payload(fleet, "d1", 10, model=model), "quality": 7}),
            (Kind.METRICS, {**metrics_payload(fleet, "d1", 11, model=model),
                            "schema": "edgekit.metrics/9"}),
            (Kind.STATUS, {**status(fleet, "d1", "online", 3), "state": "dancing"}),
            (Kind.EVENTS, {**event(fleet, "d1", 5), "kind": 42}),
            (Kind.SAMPLES, {**sample(fleet, "d1", "p2", 2), "label": [1]}),
            (Kind.SAMPLES, {**sample(fleet, "d1", "p3", 1),
                            "inputs": {"x": {"dtype": "float32", "shape": [1, 4],
                                             "data": "AAAA"}}}),
            (Kind.EVENTS, {**event(fleet, "d1", 6), "device": "someone-else"}),
            (Kind.METRICS, [1, 2, 3]),
        ]
        for kind, payload in garbage:
            pub.send("d1", kind, payload)
        # A device that reconnected (session 3) and a late last will of session 2.
        pub.send("d2", Kind.STATUS, status(fleet, "d2", "online", 3, "2.0.0"), retain=True)
        pub.send("d2", Kind.STATUS, status(fleet, "d2", "offline", 2), retain=True)
        pub.send("d1", Kind.METRICS, metrics_payload(fleet, "d1", 3, model=model,
                                                     accuracy=0.9, labels=30))
        assert running.ingest is not None
        wait_until(lambda: sum(running.ingest.stats.received.values()) >= 23, 30,
                   "every message to arrive")
        assert running.ingest.drain(30)
    finally:
        pub.close()
    stats = running.ingest.stats
    assert stats.rejected == {"metrics": 5, "status": 1, "events": 2, "samples": 2}
    assert stats.duplicates == {"metrics": 2, "events": 1, "samples": 1, "status": 1}
    with Store(db_url) as store:
        history = store.metrics_history(fleet, device="d1")
        assert [m.seq for m in history] == [1, 2, 3]
        d1 = store.get_device(fleet, "d1")
        assert d1 is not None and d1.online and d1.model_version == "1.0.0"
        assert d1.metrics.label_count == 30 and d1.metrics.accuracy == pytest.approx(0.9)
        assert d1.metrics.latency_p95_ms == pytest.approx(0.9)
        d2 = store.get_device(fleet, "d2")
        assert d2 is not None and d2.online and d2.model_version == "2.0.0"
        evs = store.list_events(fleet=fleet, device="d1")
        assert [(e.seq, e.kind, e.data) for e in evs] == [(1, "model.activated", {"n": 1}),
                                                           (2, "model.activated", {"n": 2})]
        assert store.count_samples(fleet=fleet) == 3
        data = store.export_samples(fleet=fleet)
        assert data.inputs["x"].shape == (3, 4) and data.labels is not None
        assert data.labels.tolist() == [0, 1, 2]
        np.testing.assert_array_equal(data.inputs["x"][2], [8, 9, 10, 11])


def test_fleet_status_watch_and_events_cli(running: Controller, broker: Any, db_url: str,
                                           fleet: str) -> None:
    pub = Publisher(broker.url, fleet)
    try:
        model = {"name": "tiny", "version": "1.0.0", "sha256": "a" * 64}
        pub.send("cli-a", Kind.STATUS, status(fleet, "cli-a", "online", 1), retain=True)
        pub.send("cli-b", Kind.STATUS, status(fleet, "cli-b", "online", 1), retain=True)
        pub.send("cli-a", Kind.METRICS, metrics_payload(fleet, "cli-a", 1, model=model,
                                                        accuracy=0.8, labels=40))
        pub.send("cli-b", Kind.METRICS, metrics_payload(fleet, "cli-b", 1, model=model,
                                                        accuracy=0.6, labels=10))
        pub.send("cli-b", Kind.STATUS, status(fleet, "cli-b", "offline", 1), retain=True)
        pub.send("cli-a", Kind.EVENTS, event(fleet, "cli-a", 1, "agent.started"))
        assert running.ingest is not None
        wait_until(lambda: running.ingest.stats.stored.get("events", 0) >= 1
                   and running.ingest.stats.stored.get("status", 0) >= 3, 30, "the messages")
        assert running.ingest.drain(30)
    finally:
        pub.close()
    runner = CliRunner()
    out = runner.invoke(cli, ["fleet", "status", "--fleet", fleet, "--db", db_url, "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    by_id = {d["device"]: d for d in doc["devices"]}
    assert by_id["cli-a"]["online"] is True and by_id["cli-b"]["online"] is False
    assert by_id["cli-a"]["model"]["version"] == "1.0.0"
    assert by_id["cli-a"]["label_count"] == 40 and by_id["cli-a"]["latency_p50_ms"] == 0.4
    summary = doc["fleets"][fleet]
    assert summary["devices"] == 2 and summary["online"] == 1 and summary["labels"] == 50
    assert summary["accuracy"] == pytest.approx((0.8 * 40 + 0.6 * 10) / 50)
    text = runner.invoke(cli, ["fleet", "status", "--db", db_url])
    assert text.exit_code == 0 and "cli-a" in text.output and "1/2 online" in text.output
    watch = runner.invoke(cli, ["fleet", "watch", "--db", db_url, "--interval", "0.05",
                                "--iterations", "2"])
    assert watch.exit_code == 0 and watch.output.count("edgekit fleet watch") == 2
    events = runner.invoke(cli, ["events", "--db", db_url, "--fleet", fleet, "--json"])
    assert events.exit_code == 0
    kinds = [(e["device"], e["kind"]) for e in json.loads(events.output)["events"]]
    assert kinds == [("cli-a", "agent.started")]
    follow = runner.invoke(cli, ["events", "--db", db_url, "--follow", "--interval", "0.05",
                                 "--iterations", "2", "--kind", "agent.started"])
    assert follow.exit_code == 0 and "cli-a" in follow.output and "agent.started" in follow.output
    bad = runner.invoke(cli, ["events", "--db", db_url, "--since", "yesterday"])
    assert bad.exit_code == 2 and "--since" in bad.output


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    from edgekit.errors import ConfigError
    from edgekit.host.controller import load_config, to_toml

    bad = tmp_path / "c.toml"
    bad.write_text("[rollout]\ncanary = \"ten\"\n")
    with pytest.raises(ConfigError, match=r"rollout\.canary"):
        load_config(bad)
    bad.write_text("[policy]\nmetrik = \"f1\"\n")
    with pytest.raises(ConfigError, match=r"policy\.metrik \(did you mean metric\?\)"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"rollout\.max_failure_rate"):
        load_config(overrides={"rollout.max_failure_rate": 1.5})
    with pytest.raises(ConfigError, match=r"policy\.retrain_command.*\{modle\}"):
        load_config(overrides={"policy.retrain_command": "train {modle}"})
    good = load_config(overrides={"rollout.canary": 2, "controller.fleets": ["a", "b"]})
    assert good.rollout.canary == "2"
    again = tmp_path / "again.toml"
    again.write_text(to_toml(good))
    assert load_config(again).to_dict() == good.to_dict()
    result = CliRunner().invoke(cli, ["controller", "check-config", "--config", str(bad)])
    assert result.exit_code == 2 and "policy.metrik" in result.output


def test_batched_metrics_match_one_by_one(store: Store) -> None:
    """The ingest writes metrics in batches (Store.record_metrics_batch): the outcome must
    be what record_metrics gives one message at a time, duplicates and order included."""
    from edgekit.host.db import MetricsSummary

    def messages(fleet: str) -> list[dict[str, Any]]:
        out = []
        for device, seq, acc in (("a", 2, 0.5), ("a", 1, 0.1), ("b", 1, 0.7), ("a", 2, 0.9),
                                 ("a", 3, 0.8), ("b", 1, 0.2), ("c", 5, None)):
            summary = None if acc is None else MetricsSummary(accuracy=acc, label_count=seq)
            out.append({"fleet": fleet, "device": device, "seq": seq, "summary": summary,
                        "payload": {"seq": seq, "acc": acc},
                        "ts": dt.datetime(2026, 5, 1, 12, 0, seq, tzinfo=dt.UTC)})
        return out

    store.record_metrics("one", "a", seq=1, payload={"seq": 1, "acc": 0.1})
    store.record_metrics("many", "a", seq=1, payload={"seq": 1, "acc": 0.1})
    single = [store.record_metrics(**m) for m in messages("one")]
    batched = store.record_metrics_batch(messages("many"))
    assert batched == single == [True, False, True, False, True, False, True]
    for device in ("a", "b", "c"):
        one, many = store.get_device("one", device), store.get_device("many", device)
        assert one is not None and many is not None
        assert one.metrics == many.metrics and one.metrics_at == many.metrics_at
    a = store.get_device("many", "a")
    assert a is not None and a.metrics.accuracy == 0.8 and a.metrics.label_count == 3
    assert [(m.device, m.seq, m.payload) for m in store.metrics_history("many")] == \
        [(m.device, m.seq, m.payload) for m in store.metrics_history("one")]


def test_docs_describe_every_config_key() -> None:
    from edgekit.host.controller import config_keys

    text = (Path(__file__).resolve().parents[2] / "docs" / "controller.md").read_text()
    sections = text.split("### `[")
    for key in config_keys():
        section = next(s for s in sections if s.startswith(f"{key.section}]`"))
        assert f"| `{key.name}` |" in section, f"{key.dotted} is not in docs/controller.md"
    # The tables are generated from the fields: defaults, bounds and help cannot drift.
    from edgekit.host.controller.config import markdown
    from edgekit.typedconfig import docs_block

    assert docs_block(text) == markdown(), "run `python docs/config_tables.py`"


@pytest.mark.parametrize("module", ["edgekit.host.controller", "edgekit.host.controller.config",
                                    "edgekit.host.controller.ingest",
                                    "edgekit.protocol.controller",
                                    "edgekit.host.controller.policy",
                                    "edgekit.host.controller.remote",
                                    "edgekit.host.controller.rollout",
                                    "edgekit.host.controller.service"])
def test_controller_exports_are_honest(module: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    exported = list(mod.__all__)
    assert len(set(exported)) == len(exported)
    assert all(hasattr(mod, name) for name in exported)
    public = {n for n, v in vars(mod).items() if not n.startswith("_") and callable(v)
              and getattr(v, "__module__", "") == mod.__name__}
    assert public <= set(exported), f"{module}: {public - set(exported)} not in __all__"


def test_controller_run_reports_what_is_wrong(tmp_path: Path) -> None:
    runner = CliRunner()
    closed = runner.invoke(cli, ["controller", "run", "--broker", "mqtt://127.0.0.1:1",
                                 "--db", f"sqlite:///{tmp_path / 'c.db'}",
                                 "--store", str(tmp_path / "store")])
    assert closed.exit_code == 1 and "cannot reach the MQTT broker" in closed.output
    bad_db = runner.invoke(cli, ["controller", "run", "--db", "nosuch://x"])
    assert bad_db.exit_code == 2 and "nosuch is not supported" in bad_db.output


def test_events_are_keyed_by_session_and_garbage_is_counted_per_kind(tmp_path: Path) -> None:
    """Straight into Ingest.handle with a real SQLite store (no broker: the MQTT path is the
    test above). A forged event with a device's next seq cannot silence the device's own event
    of another session; garbage of every kind is counted as rejected."""
    from edgekit.host.controller.ingest import Ingest

    fleet = "sess"
    with Store(f"sqlite:///{tmp_path / 'ingest.db'}") as store:
        ingest = Ingest(store, None, fleets=[fleet])  # type: ignore[arg-type]
        t = topic(fleet, "d1", Kind.EVENTS)
        forged = {**event(fleet, "d1", 5), "session": 1, "message": "forged"}
        real = {**event(fleet, "d1", 5), "session": 2, "message": "real"}
        assert ingest.handle(t, encode(forged)) == "stored"
        assert ingest.handle(t, encode(real)) == "stored"
        assert ingest.handle(t, encode(real)) == "duplicate"
        assert ingest.handle(t, encode(event(fleet, "d1", 5))) == "stored"  # session 0
        evs = store.list_events(fleet=fleet, device="d1")
        assert sorted((e.session, e.seq, e.message) for e in evs) == [
            (0, 5, "event 5"), (1, 5, "forged"), (2, 5, "real")]

        oversize = {Kind.STATUS: 64 * 1024, Kind.METRICS: 64 * 1024, Kind.EVENTS: 64 * 1024,
                    Kind.SAMPLES: 16 * 1024 * 1024}
        for kind, limit in oversize.items():
            kt = topic(fleet, "d1", kind)
            for payload in (b"{" + b" " * limit, b"\xff", b"[]", b'{"schema": "edgekit.x/1"}',
                            encode({"schema": f"edgekit.{kind.value}/1"})):
                assert ingest.handle(kt, payload) == "rejected", (kind, payload[:40])
        assert ingest.stats.rejected == {k.value: 5 for k in oversize}
        assert ingest.handle(topic(fleet, "d1", Kind.STATUS),
                             encode(status(fleet, "d1", "online", 4))) == "stored"
        # An update event is taken only with data that decode as UpdateEventData.
        data = UpdateEventData(deployment="d1", step=UpdateStep.SUCCEEDED, model=None,
                               serving=UpdateModel(name="tiny", version="1.0.0"))
        for seq, bad in enumerate([None, {"deployment": 5}, {**data.as_data(), "step": "failed"},
                                   {**data.as_data(), "serving": {"sha256": "xyz"}}]):
            assert ingest.handle(t, encode({**event(fleet, "d1", 20 + seq),
                                            "kind": "update.succeeded", "data": bad})
                                 ) == "rejected", bad
        assert ingest.stats.rejected["events"] == 5 + 4
        assert ingest.handle(t, encode({**event(fleet, "d1", 30), "kind": "update.succeeded",
                                        "data": data.as_data()})) == "stored"
