"""The policy on the label-free estimate (``metric = "estimated_accuracy"``), on both
databases: windows are metrics documents as agents send them (estimate sections, no labels);
it breaches and fires on the estimate only with ``min_estimated`` estimated predictions, and
windows without estimates (agents or packages without one) never count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from edgekit.errors import ProtocolError
from edgekit.host.console._data import device_view, fleet_view
from edgekit.host.controller import MaintenancePolicy, RolloutEngine, load_config
from edgekit.host.controller.ingest import metrics_summary
from edgekit.host.db import Store
from edgekit.host.mqtt_client import HostClient
from edgekit.host.registry import Registry
from edgekit.protocol import MetricsPayload, decode, encode

from ._controller_sim import metrics_payload

FLEET = "est"


def test_policy_fires_on_the_estimate_with_enough_predictions(
        db_url: str, tmp_path: Path, make_package: Any) -> None:
    store = Store(db_url)
    registry = Registry(store, tmp_path / "store")
    current = registry.push(make_package(tmp_path / "m.edgepkg", version="1.0.0")).record
    settings = load_config(overrides={
        "policy.enabled": True, "policy.metric": "estimated_accuracy", "policy.threshold": 0.0,
        "policy.relative_drop": 0.1, "policy.min_estimated": 100, "policy.consecutive": 2,
        "policy.strategy": "registry"}).policy
    engine = RolloutEngine(store, registry, HostClient("mqtt://127.0.0.1:1"),
                           load_config().rollout, controller_id="test", lease_s=5.0)
    policy = MaintenancePolicy(store, registry, engine, settings, controller_id="test",
                               fleets=[FLEET], workdir=tmp_path / "work")
    model = {"name": "tiny", "version": "1.0.0", "sha256": current.sha256}
    for device in ("a", "b"):
        store.upsert_device_status(FLEET, device, online=True, session=1, model_name="tiny",
                                   model_version="1.0.0", model_sha256=current.sha256)
    seq = {"a": 0, "b": 0}

    def window(estimates: dict[str, tuple[float, int] | None]) -> Any:
        for device, estimate in estimates.items():
            seq[device] += 1
            doc = metrics_payload(FLEET, device, seq[device], model=model,
                                  histogram={"a": 60}, confidence=0.9)
            if estimate is not None:
                doc["estimate"] = {"method": "cbpe", "accuracy": estimate[0],
                                   "count": estimate[1]}
            # What the ingest stores: the document as it decodes, and its summary.
            decoded = decode(encode(doc), MetricsPayload)
            store.record_metrics(FLEET, device, seq=seq[device],
                                 payload=msgspec.to_builtins(decoded),
                                 summary=metrics_summary(decoded))
        return policy.evaluate(FLEET)

    def kinds() -> list[str]:
        return [e.kind for e in store.list_events(fleet=FLEET)
                if e.kind.startswith(("policy.breach", "policy.fired", "policy.recovered"))]

    try:
        # The package's baseline accuracy is 0.9, so the limit is 0.81. Within it: counts.
        ok = window({"a": (0.88, 60), "b": (0.92, 60)})
        assert ok is not None and ok.estimated == 120
        assert ok.estimated_accuracy == pytest.approx(0.9)
        assert kinds() == []
        # Estimates weighted by their counts: (0.5 * 90 + 0.9 * 30) / 120 = 0.6.
        low = window({"a": (0.5, 90), "b": (0.9, 30)})
        assert low is not None and low.estimated_accuracy == pytest.approx(0.6)
        assert kinds() == ["policy.breach"]
        breach = store.list_events(fleet=FLEET, kinds=["policy.breach"])[-1]
        assert breach.reason == "relative_drop" and breach.data["metric"] == "estimated_accuracy"
        assert breach.data["baseline"] == pytest.approx(0.9)
        # Too few estimated predictions: the window does not count, whatever it says.
        assert window({"a": (0.1, 40), "b": (0.1, 40)}) is None
        # Agents (or packages) without an estimate: no window either.
        assert window({"a": None, "b": None}) is None
        assert kinds() == ["policy.breach"]
        window({"a": (0.55, 80), "b": (0.6, 80)})
        assert kinds() == ["policy.breach", "policy.breach", "policy.fired"]
        # The device summary (fleet status, the console) holds the latest estimate; the
        # console's device chart has one point per message (none where there was none).
        record = store.get_device(FLEET, "b")
        assert record is not None and record.metrics.estimated_accuracy == pytest.approx(0.6)
        assert record.metrics.estimated_count == 80
        assert {d["device"]: d["estimated"] for d in fleet_view(store)["devices"]} == {
            "a": pytest.approx(0.55), "b": pytest.approx(0.6)}
        view = device_view(store, FLEET, "a")
        assert view is not None
        assert view["series"]["estimated"] == pytest.approx([0.88, 0.5, 0.1, None, 0.55])
        policy.wait_idle(60)
        decision = store.list_events(fleet=FLEET, kinds=["policy.decision"])
        # Candidates are judged on labelled samples; there are none here.
        assert [d.reason for d in decision] == ["no_data"]
    finally:
        store.close()


def test_older_metrics_without_an_estimate_still_decode() -> None:
    doc = metrics_payload(FLEET, "a", 1, model=None, histogram={"a": 3}, confidence=0.8)
    decoded = decode(encode(doc), MetricsPayload)
    assert decoded.estimate is None
    doc["estimate"] = {"method": "cbpe", "accuracy": 1.5, "count": 3}
    with pytest.raises(ProtocolError, match="estimate"):
        decode(encode(doc), MetricsPayload)
