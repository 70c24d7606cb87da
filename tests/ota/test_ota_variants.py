"""An over-the-air update to a package of variants, end to end: a real agent process on a
real broker installs it, measures its variants, serves the fastest eligible one and says
which in its retained status."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _ota_fleet import Fleet, Packages, wait_until
from mqtt_broker import MqttBroker

from converters import ConvertOptions, convert_variants
from edgekit.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))
from _digits import digits_data, onnx_classifier, ridge_weights  # noqa: E402

FLEET = "variants"
DEVICE = "dev-v"


@pytest.mark.slow
def test_an_update_to_a_package_of_variants(make_agent: Any, broker: MqttBroker,
                                            pkgs: Packages, tmp_path: Path) -> None:
    x, y = digits_data()
    w, b = ridge_weights(x[:1200], y[:1200], 1.0)
    source = tmp_path / "ota-model.onnx"
    source.write_bytes(onnx_classifier(w, b))
    evald = Dataset({"x": x[1200:1500]}, y[1200:1500], "digits 1200:1500")
    package = tmp_path / "variants.edgepkg"
    convert_variants(source, [("onnx", "none"), ("onnx", "int8")],
                     ConvertOptions(name="ota-model", version="2.0.0", latency_runs=5,
                                    labels=[str(i) for i in range(10)]),
                     output=package, eval_data=evald, calibration=evald, sign_key=pkgs.key)

    fleet = Fleet(broker, FLEET)
    try:
        agent = make_agent(FLEET, DEVICE)
        agent.wait_healthy()
        fleet.wait_serving(DEVICE, "1.0.0")
        assert fleet.status[DEVICE].get("variant") is None  # a package of one artifact
        doc = fleet.deploy(DEVICE, package)
        event = fleet.outcome(DEVICE, doc.deployment)
        assert event["kind"] == "update.succeeded", event
        fleet.wait_serving(DEVICE, "2.0.0")
        status = wait_until(lambda: (s := fleet.status[DEVICE]).get("variant") and s, 30,
                            "the status to name the variant")
        variant = status["variant"]
        candidates = {c["variant"]: c for c in variant["candidates"]}
        assert set(candidates) == {"onnx-none", "onnx-int8"}
        eligible = [c for c in candidates.values() if c["eligible"]]
        assert variant["id"] == min(eligible, key=lambda c: c["p50_ms"])["variant"]
        assert candidates[variant["id"]]["reason"] == "chosen"
        assert np.isfinite(variant["p50_ms"]) and variant["runs"] >= 5
    finally:
        fleet.close()
