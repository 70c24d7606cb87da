"""The container images without docker (none here): each Dockerfile's entry point and command
run on this machine with the image's environment, against a real broker, as a real short
start; and what each Dockerfile installs, on which base."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from mqtt_broker import MqttBroker, broker, free_port, wait_until

from edgekit.signing import generate_keypair

__all__ = ["broker"]  # the fixture, imported for pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent


def _instructions(name: str) -> dict[str, Any]:
    """FROM, the RUN lines, ENV (as a dict), ENTRYPOINT and CMD (exec form) of a Dockerfile."""
    text = (DOCKER / name).read_text().replace("\\\n", " ")
    found: dict[str, Any] = {"RUN": [], "ENV": {}}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        if word in ("ENTRYPOINT", "CMD"):
            found[word] = json.loads(rest)
        elif word == "ENV":
            for pair in rest.split():
                key, _, value = pair.partition("=")
                found["ENV"][key] = value
        elif word == "RUN":
            found["RUN"].append(rest)
        else:
            found[word] = rest.strip()
    return found


@pytest.mark.parametrize("name,extra", [("agent.Dockerfile", "agent"),
                                        ("controller.Dockerfile", "host")])
def test_image_installs_its_extra_from_the_source_tree(name: str, extra: str) -> None:
    found = _instructions(name)
    assert found["FROM"] == "python:3.11-slim"
    assert any(f'pip install --no-cache-dir "edgekit-fleet[{extra}] @ file:///src"' in run
               for run in found["RUN"])
    assert "USER" in found  # not root


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def _answers(url: str) -> bool:
    try:
        return _get(url)[0] in (200, 503)
    except OSError:
        return False


def test_agent_entry_point_starts(broker: MqttBroker, tmp_path: Path) -> None:
    found = _instructions("agent.Dockerfile")
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    keys = generate_keypair(tmp_path / "signing")
    port = free_port()
    env = {**os.environ, **found["ENV"], **compose["services"]["agent"]["environment"]}
    # What the image mounts or publishes, moved to this machine.
    env.update(EDGEKIT_MODEL_DIR=str(tmp_path / "models"),
               EDGEKIT_MODEL_TRUSTED_KEYS=str(keys.public_path),
               EDGEKIT_HTTP_LISTEN=f"127.0.0.1:{port}", EDGEKIT_MQTT_BROKER=broker.url)
    entry = shutil.which(found["ENTRYPOINT"][0], path=str(BIN))
    assert entry is not None
    proc = subprocess.Popen([entry, *found["CMD"]], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/health") or proc.poll()
                   is not None, 90, "the agent's HTTP API")
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        status, body = _get(f"http://127.0.0.1:{port}/health")
        assert status == 503 and json.loads(body)["model"] is None  # waits for an update
    finally:
        code = _stop(proc)
    assert code == 0


def test_controller_entry_point_starts(broker: MqttBroker, tmp_path: Path) -> None:
    found = _instructions("controller.Dockerfile")
    command = list(found["CMD"])
    assert command[:2] == ["controller", "run"]
    # The config the image copies in, and the metrics port, moved to this machine; the
    # broker and database of the compose file are replaced by the test's (flags win).
    command[command.index("--config") + 1] = str(DOCKER / "controller.toml")
    metrics = f"127.0.0.1:{free_port()}"
    command[command.index("--metrics") + 1] = metrics
    command += ["--broker", broker.url, "--db", f"sqlite:///{tmp_path / 'c.db'}",
                "--store", str(tmp_path / "artifacts")]
    entry = shutil.which(found["ENTRYPOINT"][0], path=str(BIN))
    assert entry is not None
    proc = subprocess.Popen([entry, *command], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _answers(f"http://{metrics}/metrics") or proc.poll() is not None,
                   90, "the controller's metrics")
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        status, body = _get(f"http://{metrics}/metrics")
        assert status == 200 and b"edgekit_controller_step_seconds_bucket" in body
    finally:
        code = _stop(proc)
    assert code == 0
