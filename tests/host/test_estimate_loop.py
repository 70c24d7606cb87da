"""The label-free estimate end to end: real agent processes serve a package the real
converter calibrated, report ``estimate`` in their metrics over a real mosquitto, and a real
controller's policy (``metric = "estimated_accuracy"``) fires on the demo's drift (rotation +
noise) and stays quiet on a no-drift control; an agent serving an older package without a
calibration map reports no estimate and no error. No labels are sent at all.

Time is compressed a hundredfold: telemetry every 0.1 s instead of the agent's default 10 s,
policy windows of 0.3 s instead of the controller's default 30 s. The control runs until its
agent has sent 60 telemetry windows with an estimate: ten minutes of traffic at the defaults.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from converters import ConvertOptions, convert
from edgekit.data import Dataset
from edgekit.host.cli import cli
from edgekit.host.controller import Controller
from edgekit.host.db import Store
from edgekit.host.demo.digits import drift
from edgekit.host.registry import Registry

from ._controller_sim import broker, controller_config, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))
from _digits import digits_data, onnx_classifier, ridge_weights, write_digits_package  # noqa: E402

__all__ = ["broker"]  # the fixture, imported for pytest

REPO = Path(__file__).resolve().parents[2]
WINDOWS = 60  # telemetry windows of the control: 10 minutes at the default 10 s


def _demo_drift(x: np.ndarray, seed: int) -> np.ndarray:
    """The demo's drift on [N, 64] pixels in 0..16: rotated 25 to 45 degrees either way,
    noise 0.15."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(25, 45, size=len(x)) * rng.choice([-1, 1], size=len(x))
    images = x.reshape(-1, 1, 8, 8) / 16.0
    out = np.concatenate([drift(images[i:i + 1], float(a), 0.15, seed=seed + i)
                          for i, a in enumerate(angles)])
    return (out * 16.0).reshape(len(x), 64).astype(np.float32)


@pytest.fixture
def agent_procs(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(device: str, fleet: str, url: str, package: Path) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(tmp_path / f"{device}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "device_agent", "run", "--device-id", device,
                 "--fleet", fleet, "--broker", url, "--model", str(package),
                 "--model-dir", str(tmp_path / device), "--allow-unsigned",
                 "--http", "127.0.0.1:0", "--telemetry-interval", "0.1"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(20)


class Traffic:
    """Posts batches of rows to one agent's /predict, round and round, until stopped."""

    def __init__(self, address: str, x: np.ndarray, batch: int = 16) -> None:
        self.address, self.x, self.batch = address, x, batch
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = 0
        while not self._stop.is_set():
            rows = self.x[start:start + self.batch]
            start = (start + self.batch) % (len(self.x) - self.batch)
            body = json.dumps({"inputs": {"x": rows.tolist()}}).encode()
            request = urllib.request.Request(f"http://{self.address}/predict", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as reply:
                    reply.read()
                self.sent += len(rows)
            except OSError as exc:
                self.errors.append(repr(exc))
                self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.slow
def test_policy_fires_on_drift_not_on_the_control(broker: Any, tmp_path: Path,
                                                  agent_procs: Callable[..., Any]) -> None:
    x, y = digits_data()
    w, b = ridge_weights(x[:1200], y[:1200], 1.0)
    (tmp_path / "ridge.onnx").write_bytes(onnx_classifier(w, b))
    calibrated = tmp_path / "digits-1.0.0.edgepkg"
    convert(tmp_path / "ridge.onnx", ConvertOptions(name="digits", version="1.0.0"),
            output=calibrated, eval_data=Dataset({"x": x[1200:]}, y[1200:], "digits eval"))
    old = write_digits_package(tmp_path / "old.edgepkg", version="1.0.0", name="digits-old")
    tag = secrets.token_hex(3)
    fleets = {"drift": f"drift-{tag}", "control": f"control-{tag}", "old": f"old-{tag}"}
    db_url = f"sqlite:///{tmp_path / 'edgekit.db'}"
    cfg = controller_config(
        broker_url=broker.url, db_url=db_url, store=tmp_path / "store",
        controller__fleets=list(fleets.values()), policy__enabled=True,
        policy__metric="estimated_accuracy", policy__threshold=0.85,
        policy__relative_drop=0.0, policy__min_estimated=100, policy__consecutive=3,
        policy__interval_s=0.3, policy__strategy="registry", policy__cooldown_s=3600.0,
        policy__confidence_drop=0.0, policy__max_shift=0.0)
    traffic: list[Traffic] = []
    with Controller(cfg), Store(db_url) as store:
        Registry(store, tmp_path / "store").push(calibrated)
        for role, fleet in fleets.items():
            agent_procs(role, fleet, broker.url, old if role == "old" else calibrated)
        wait_until(lambda: all(store.list_devices(f, online=True) for f in fleets.values()),
                   90, "the three agents online")
        # Clean traffic the map was not fitted on (the rows the model was trained on), and
        # the same rows drifted as in the demo.
        data = {"drift": _demo_drift(x[:1200], seed=1), "control": x[:1200], "old": x[:1200]}
        try:
            for role, fleet in fleets.items():
                record = store.get_device(fleet, role)
                assert record is not None and record.status is not None
                traffic.append(Traffic(record.status["http"], data[role]))

            def estimated(fleet: str) -> list[dict[str, Any]]:
                return [r.payload for r in store.metrics_history(fleet)
                        if r.payload.get("estimate")]

            def fired(fleet: str) -> bool:
                return bool(store.list_events(fleet=fleet, kinds=["policy.fired"]))

            wait_until(lambda: fired(fleets["drift"]), 300, "the policy to fire on the drift")
            wait_until(lambda: len(estimated(fleets["control"])) >= WINDOWS, 300,
                       f"{WINDOWS} estimated telemetry windows of the control")
            wait_until(lambda: len(store.metrics_history(fleets["old"])) >= 5, 60,
                       "metrics of the agent serving the old package")
            # While the traffic runs, `edgekit fleet status` shows each device's estimate of
            # its last interval (none for the old package).
            shown: dict[str, Any] = {}

            def status() -> dict[str, Any]:
                result = CliRunner().invoke(cli, ["fleet", "status", "--db", db_url, "--json"])
                assert result.exit_code == 0, result.output
                shown.update(json.loads(result.stdout))
                return {d["device"]: d for d in shown["devices"]}

            # (An interval without a request would have no estimate: wait for one that has.)
            devices: dict[str, Any] = {}

            def control_estimated() -> bool:
                devices.update(status())
                return devices["control"]["estimated_accuracy"] is not None

            wait_until(control_estimated, 60, "the control's estimate in fleet status")
            assert 0.0 < devices["control"]["estimated_accuracy"] <= 1.0
            assert devices["control"]["estimated_count"] > 0
            assert devices["old"]["estimated_accuracy"] is None
            assert shown["fleets"][fleets["old"]]["estimated"] == 0
            assert shown["fleets"][fleets["control"]]["estimated"] > 0
        finally:
            for t in traffic:
                t.stop()
        assert not any(t.errors for t in traffic), [t.errors[:3] for t in traffic]
        # The control never breached, let alone fired.
        assert not store.list_events(fleet=fleets["control"],
                                     kinds=["policy.breach", "policy.fired"])
        fire = store.list_events(fleet=fleets["drift"], kinds=["policy.fired"])[0]
        assert fire.data["metric"] == "estimated_accuracy"
        assert fire.data["value"] < 0.85 <= fire.data["limits"]["threshold"]
        assert fire.data["labels"] == 0  # no label was ever sent
        # Each estimate covers the window's predictions, as the agent counted them.
        for payload in estimated(fleets["control"]) + estimated(fleets["drift"]):
            assert payload["estimate"]["count"] == payload["predictions"]["count"] > 0
            assert payload["estimate"]["method"] == "cbpe"
        control = [p["estimate"]["accuracy"] for p in estimated(fleets["control"])]
        drifted = [p["estimate"]["accuracy"] for p in estimated(fleets["drift"])]
        # Single telemetry windows are noisy (a few dozen predictions); on average the drift
        # takes the estimate well below the control's.
        assert np.mean(control) - np.mean(drifted) > 0.1
        # The old package: predictions reported, no estimate, no error, no policy window.
        old_metrics = [r.payload for r in store.metrics_history(fleets["old"])]
        assert any(p["predictions"]["count"] > 0 for p in old_metrics)
        assert not any("estimate" in p for p in old_metrics)
        assert not store.list_events(fleet=fleets["old"], kinds=["policy.breach"])
    log = (tmp_path / "old.log").read_text(errors="replace")
    assert "Traceback" not in log and "no accuracy estimate" not in log
