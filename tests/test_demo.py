"""``edgekit demo`` end to end: embedded amqtt broker, controller and three real agent
processes; the drift must lower the fleet's accuracy, the policy must fire, and the retrained
model must bring it back up, with no failed request. Nothing is mocked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_closes_the_loop(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "edgekit.host.cli", "demo", "--out", str(out), "--devices", "3",
         "--baseline", "12", "--recovered", "10", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    acc = summary["fleet_accuracy"]
    assert acc["before_drift"] > 0.9
    assert acc["during_drift"] < acc["before_drift"] - 0.3
    assert acc["after_update"] > acc["during_drift"] + 0.2
    assert summary["initial_version"] == "1.0.0" and summary["final_version"] != "1.0.0"
    assert summary["requests"]["failed"] == 0 and summary["requests"]["answered"] > 500
    assert summary["phase_seconds"]["policy_fired_to_fleet_updated"] > 0
    timeline = proc.stderr
    for step in ("policy.fired", "policy.decision", "rollout.shadow_started",
                 "shadow stage passed", "rollout.wave", "rollout.succeeded"):
        assert step in timeline, f"{step} missing from the timeline"
    # The retrained candidate passed its shadow stage before its canary started.
    assert timeline.index("shadow stage passed") < timeline.rindex("rollout.wave")
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "policy.fired" in page


def test_demo_refuses_an_unreachable_broker_before_starting_anything(tmp_path: Path) -> None:
    from mqtt_broker import free_port

    out = tmp_path / "demo"
    for broker, message in ((f"mqtt://127.0.0.1:{free_port()}", "no MQTT broker answers"),
                            ("http://127.0.0.1:1883", "is not an mqtt:// or mqtts:// URL")):
        proc = subprocess.run(
            [sys.executable, "-m", "edgekit.host.cli", "demo", "--out", str(out), "--broker", broker],
            capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert not (out / "work" / "controller.toml").exists()
        assert not (out / "summary.json").exists()


def test_retrain_command_refuses_unlabelled_data(tmp_path: Path) -> None:
    import numpy as np

    from edgekit.data import save_npz

    data = tmp_path / "recent.npz"
    save_npz(data, {"x": np.zeros((4, 1, 8, 8), np.float32)})
    out = tmp_path / "candidate.pt2"
    proc = subprocess.run([sys.executable, "-m", "edgekit.host.demo.retrain", "--data", str(data),
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 1
    assert "has no labels" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("candidate.pt2*"))
