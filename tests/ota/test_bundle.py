"""Air-gapped sites: `edgekit bundle` writes a package and its signed intent in one file,
`edgekit-agent install` applies it with no broker through the updater's journalled steps.

Every install here is a real ``python -m device_agent install`` process on a real model
folder, with real packages (onnxruntime loads them); no broker runs in this module. The
checks are the ones a desired document from the broker passes (signature, fleet and
device, expiry, replay, version floor) plus the bundle's own layout, and after every
refusal or failure the device must still serve the model it served before.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _ota_fleet import FAST_OTA_ENV, OPERATOR_KEY, REPO, Packages
from _ota_models import client_batch
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mqtt_broker import free_port

from edgekit.host.cli import cli
from edgekit.host.ota.bundle import make_bundle
from edgekit.host.ota.deploy import desired_for_package
from edgekit.host.ota.store import ArtifactStore
from edgekit.protocol.ota import Probation, seal_desired
from edgekit.protocol.ota.bundle import BUNDLE_MAGIC, write_bundle

QUICK = Probation(requests=0, seconds=0.5, max_error_rate=0.0, max_nonfinite_rate=0.0,
                  max_latency_ms=None)


class Device:
    """A model folder that `edgekit-agent install` runs on (first model: v1)."""

    def __init__(self, root: Path, pkgs: Packages, device: str = "dev", fleet: str = "site"):
        self.root = root
        self.args = ["--device-id", device, "--fleet", fleet, "--model-dir", str(root / "models"),
                     "--model", str(pkgs.v1), "--trusted-key", str(pkgs.public_key),
                     "--intent-key", str(pkgs.operator_public), "--telemetry-interval", "0"]

    def install(self, bundle: Path, env: dict[str, str] | None = None
                ) -> tuple[int, dict[str, Any], str]:
        full = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
        full.update(FAST_OTA_ENV)
        full.update(env or {})
        proc = subprocess.run([sys.executable, "-m", "device_agent", "install", str(bundle),
                               *self.args, "--json"], capture_output=True, cwd=REPO, env=full,
                              timeout=300)
        out = proc.stdout.decode()
        return proc.returncode, json.loads(out) if out.strip() else {}, proc.stderr.decode()

    @property
    def active(self) -> dict[str, Any]:
        doc = json.loads((self.root / "models" / "active.json").read_text())
        return dict(doc["active"])

    @property
    def journal(self) -> dict[str, Any]:
        path = self.root / "models" / "state" / "ota" / "journal.json"
        return dict(json.loads(path.read_text())) if path.exists() else \
            {"current": None, "history": []}

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in (self.root / "models" / "packages").iterdir()
                      if p.name.endswith((".staged", ".part")))


def bundle_of(tmp: Path, pkg: Path, *, fleet: str = "site", devices: list[str] | None = None,
              key: Ed25519PrivateKey = OPERATOR_KEY, issued: dt.datetime | None = None,
              ttl_s: float | None = None) -> Path:
    out = tmp / f"{pkg.stem}-{len(list(tmp.glob('*.bundle')))}.bundle"
    if issued is None and ttl_s is None:
        make_bundle(pkg, fleet, key, out, devices=devices, probation=QUICK)
        return out
    doc = desired_for_package(ArtifactStore().add(pkg), fleet, devices=devices,
                              probation=QUICK, issued=issued, ttl_s=ttl_s)
    with open(out, "wb") as handle:
        write_bundle(handle, seal_desired(doc, key), pkg)
    return out


def test_bundle_cli_and_install(tmp_path: Path, pkgs: Packages) -> None:
    out = tmp_path / "site.bundle"
    result = CliRunner().invoke(cli, ["bundle", str(pkgs.v2), "--fleet", "site", "--device",
                                      "dev", "--sign-key", str(pkgs.operator_private),
                                      "-o", str(out), "--probation-requests", "0",
                                      "--probation-seconds", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.output)
    assert written["model"]["version"] == "2.0.0" and written["devices"] == ["dev"]
    assert out.read_bytes().startswith(BUNDLE_MAGIC)

    device = Device(tmp_path, pkgs)
    code, outcome, err = device.install(out)
    assert code == 0, err
    assert outcome["outcome"] == "succeeded" and outcome["serving"]["version"] == "2.0.0"
    assert device.active["version"] == "2.0.0"
    trust = json.loads((tmp_path / "models" / "state" / "ota" / "trust.json").read_text())
    assert trust["floor"]["version"] == "2.0.0"
    assert device.leftovers() == []
    # The same bundle again: the outcome is remembered, nothing changes.
    code, again, err = device.install(out)
    assert code == 0, err
    assert again["message"].startswith("already carried out")


def _forged(tmp: Path, pkgs: Packages) -> Path:
    return bundle_of(tmp, pkgs.v2, key=Ed25519PrivateKey.generate())


def _other_device(tmp: Path, pkgs: Packages) -> Path:
    return bundle_of(tmp, pkgs.v2, devices=["someone-else"])


def _other_fleet(tmp: Path, pkgs: Packages) -> Path:
    return bundle_of(tmp, pkgs.v2, fleet="elsewhere")


def _expired(tmp: Path, pkgs: Packages) -> Path:
    return bundle_of(tmp, pkgs.v2, issued=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
                     ttl_s=86400.0)


def _older(tmp: Path, pkgs: Packages) -> Path:
    return bundle_of(tmp, pkgs.older)


def _tampered(tmp: Path, pkgs: Packages) -> Path:
    path = bundle_of(tmp, pkgs.v2)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the package; the signed intent pins its sha256
    path.write_bytes(bytes(data))
    return path


def _bad_release_key(tmp: Path, pkgs: Packages) -> Path:
    return bundle_of(tmp, pkgs.bad_signature)  # signed intent, package by an untrusted key


def _broken_model(tmp: Path, pkgs: Packages) -> Path:
    return bundle_of(tmp, pkgs.broken)


# case -> (bundle, exit code, outcome or error text, reason recorded in the journal or None)
REFUSALS = {
    "untrusted_intent": (_forged, 1, "untrusted_intent", None),
    "other_device": (_other_device, 1, "not_for_device", None),
    "other_fleet": (_other_fleet, 1, "not_for_device", None),
    "expired": (_expired, 1, "expired", None),
    "older_version": (_older, 1, "older_version", "older_version"),
    "tampered_package": (_tampered, 1, "sha256_mismatch", None),
    "untrusted_release_key": (_bad_release_key, 1, "bad_signature", "bad_signature"),
    "model_does_not_load": (_broken_model, 1, "load_failed", "load_failed"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_bundle_keeps_the_model(case: str, tmp_path: Path, pkgs: Packages) -> None:
    make, code, reason, journalled = REFUSALS[case]
    bundle = make(tmp_path, pkgs)
    device = Device(tmp_path, pkgs)
    got, outcome, err = device.install(bundle)
    assert got == code, err
    assert outcome["reason"] == reason, (outcome, err)
    assert device.active["version"] == "1.0.0"
    assert device.leftovers() == []
    history = device.journal["history"]
    if journalled is None:
        assert history == [], history  # refused at the gate: as if absent
    else:
        assert [h["reason"] for h in history] == [journalled]
    assert device.journal["current"] is None


def test_replayed_bundle_is_refused(tmp_path: Path, pkgs: Packages) -> None:
    earlier = bundle_of(tmp_path, pkgs.v3, issued=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
                        ttl_s=86400.0)
    newer = bundle_of(tmp_path, pkgs.v2)
    device = Device(tmp_path, pkgs)
    code, outcome, err = device.install(newer)
    assert code == 0, err
    code, outcome, err = device.install(earlier)
    assert code == 1 and outcome["reason"] == "replayed", (outcome, err)
    assert device.active["version"] == "2.0.0"


def test_not_a_bundle(tmp_path: Path, pkgs: Packages) -> None:
    device = Device(tmp_path, pkgs)
    garbage = tmp_path / "garbage.bundle"
    garbage.write_bytes(b"PK\x03\x04" + os.urandom(2000))
    code, _, err = device.install(garbage)
    assert code != 0 and "not an edgekit bundle" in err and "Traceback" not in err
    truncated = tmp_path / "short.bundle"
    truncated.write_bytes(bundle_of(tmp_path, pkgs.v2).read_bytes()[:-10])
    code, _, err = device.install(truncated)
    assert code != 0 and "truncated or altered" in err and "Traceback" not in err
    huge_header = tmp_path / "huge.bundle"
    huge_header.write_bytes(BUNDLE_MAGIC + (10**9).to_bytes(4, "big") + b"{}")
    code, _, err = device.install(huge_header)
    assert code != 0 and "over the 4096-byte limit" in err
    assert not (tmp_path / "models" / "active.json").exists() or \
        device.active["version"] == "1.0.0"


def test_refused_while_an_agent_runs(tmp_path: Path, pkgs: Packages) -> None:
    device = Device(tmp_path, pkgs)
    state = tmp_path / "models" / "state"
    state.mkdir(parents=True)
    # The lock a running agent holds on its state folder (device_agent._agent).
    with open(state / "agent.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = device.install(bundle_of(tmp_path, pkgs.v2))
    assert code == 2, err
    assert "an agent is running" in err and "systemctl stop edgekit-agent" in err


# crash point -> (outcome of the install that follows the kill, version served then)
KILLS = {
    "verify": ("succeeded", "2.0.0"),  # before the switch: the next install resumes it
    "staged": ("succeeded", "2.0.0"),
    "probation": ("rolled_back", "1.0.0"),  # switched: the next start goes back
}


@pytest.mark.parametrize("point", list(KILLS))
def test_kill_during_install(point: str, tmp_path: Path, pkgs: Packages) -> None:
    device = Device(tmp_path, pkgs)
    bundle = bundle_of(tmp_path, pkgs.v2)
    code, _, err = device.install(bundle, env={"EDGEKIT_TEST_CRASH_AT": point})
    assert code == 137, err
    code, outcome, err = device.install(bundle)
    outcome_wanted, version = KILLS[point]
    assert outcome["outcome"] == outcome_wanted, (outcome, err)
    assert code == (0 if outcome_wanted == "succeeded" else 1)
    assert device.active["version"] == version
    assert outcome["serving"]["version"] == version
    assert device.leftovers() == []


def test_probation_during_install_rolls_back_and_answers(tmp_path: Path, pkgs: Packages
                                                         ) -> None:
    """The install's agent serves its HTTP API: requests during the probation are answered
    (by the previous model when the new one gives NaN) and count against the new model."""
    port = free_port()
    device = Device(tmp_path, pkgs)
    device.args += ["--http", f"127.0.0.1:{port}"]
    bundle = tmp_path / "nan.bundle"
    make_bundle(pkgs.nan, "site", OPERATOR_KEY, bundle,
                probation=Probation(requests=5, seconds=120.0, max_error_rate=0.0,
                                    max_nonfinite_rate=0.0, max_latency_ms=None))
    full = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
    full.update(FAST_OTA_ENV)
    proc = subprocess.Popen([sys.executable, "-m", "device_agent", "install", str(bundle),
                             *device.args, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, env=full)
    answered, failures = 0, []
    rng = np.random.default_rng(0)
    while proc.poll() is None:
        body = json.dumps({"inputs": {"x": client_batch(rng)}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                reply = json.loads(resp.read())
            answered += 1
            if any(v is None for row in reply["outputs"]["probs"] for v in row):
                failures.append("a non-finite answer reached the client")
        except urllib.error.HTTPError as exc:
            failures.append(f"HTTP {exc.code}")
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)  # not listening yet, or already stopped
    out, err = proc.communicate(timeout=60)
    outcome = json.loads(out)
    assert proc.returncode == 1, err.decode()
    assert outcome["outcome"] == "rolled_back" and outcome["reason"] == "nonfinite_output"
    assert outcome["serving"]["version"] == "1.0.0" and device.active["version"] == "1.0.0"
    assert answered >= 5 and failures == [], failures[:3]
