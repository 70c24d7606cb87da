"""Two device agents on a real broker, and deploys with the ``edgekit`` CLI.

The broker is mosquitto when it is installed (the embedded amqtt broker otherwise, or the one
``--broker`` names); the agents are ``python -m device_agent run`` processes that trust the
example's release key (packages) and operator key (desired documents). Each deploy is
``edgekit deploy PKG --fleet text --json``; it returns when both devices have committed the
package after a short probation, or failed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError

__all__ = ["FLEET", "LocalFleet", "make_keys"]

FLEET = "text"
REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path | None = None, timeout: float = 600.0
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgekit.host.cli", *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env=_env())


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def make_keys(folder: Path) -> dict[str, Path]:
    """``edgekit keys generate`` for the release key (signs packages) and the operator key
    (signs desired documents); return the four paths.

    Raises:
        EdgekitError: the CLI failed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role in ("release", "operator"):
        proc = _cli("keys", "generate", "--role", role, "--force", str(folder / role))
        if proc.returncode != 0:
            raise EdgekitError(f"edgekit keys generate --role {role} failed: {proc.stderr}")
        paths[f"{role}_key"] = folder / f"{role}.key"
        paths[f"{role}_pub"] = folder / f"{role}.pub"
    return paths


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EdgekitError(f"the broker exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.1)
    raise EdgekitError(f"the broker did not open port {port} in {timeout:.0f} s")


class LocalFleet:
    """``with LocalFleet(work, keys) as fleet: fleet.deploy(pkg)``: a broker and two agents."""

    def __init__(self, work: Path, keys: dict[str, Path], *, broker: str | None = None,
                 devices: tuple[str, ...] = ("text-1", "text-2")) -> None:
        self.work = work
        self.keys = keys
        self.devices = devices
        self.url = broker
        self._procs: list[subprocess.Popen[bytes]] = []
        self._embedded: Any = None

    def __enter__(self) -> LocalFleet:
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            if self.url is None:
                self._start_broker()
            for device in self.devices:
                self._start_agent(device)
            self._wait_online()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_broker(self) -> None:
        port = _free_port()
        self.url = f"mqtt://127.0.0.1:{port}"
        binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
             if Path(p).exists()), None)
        if binary is None:
            from edgekit.host.demo.broker import EmbeddedBroker

            self._embedded = EmbeddedBroker(self.work, port).start()
            return
        conf = self.work / "mosquitto.conf"
        lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false",
                 "max_queued_messages 100000"]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to a user that cannot read conf
        conf.write_text("\n".join(lines) + "\n")
        with open(self.work / "broker.log", "ab") as log:
            proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log,
                                    stderr=subprocess.STDOUT)
        self._procs.append(proc)
        _wait_port(port, proc, 20.0)

    def _start_agent(self, device: str) -> None:
        home = self.work / device
        home.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "device_agent", "run", "--device-id", device,
                "--fleet", FLEET, "--broker", str(self.url),
                "--model-dir", str(home / "models"), "--state-dir", str(home / "state"),
                "--trusted-key", str(self.keys["release_pub"]),
                "--intent-key", str(self.keys["operator_pub"]),
                "--telemetry-interval", "0", "--threads", "1"]
        with open(home / "agent.log", "ab") as log:
            self._procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                                cwd=REPO, env=_env()))

    def _wait_online(self, timeout: float = 120.0) -> None:
        """Until every agent's retained status says online (deploy's pre-flight reads it)."""
        from edgekit.host.mqtt_client import HostClient
        from edgekit.protocol import Kind, subscription

        online: set[str] = set()

        def on_status(msg: Any) -> None:
            try:
                doc = json.loads(msg.payload)
            except ValueError:
                return
            if doc.get("state") == "online":
                online.add(str(doc.get("device")))

        client = HostClient(str(self.url)).connect()
        try:
            client.subscribe(subscription(FLEET, "+", Kind.STATUS), on_status)
            deadline = time.monotonic() + timeout
            while not online >= set(self.devices):
                if time.monotonic() > deadline:
                    raise EdgekitError(f"agents not online after {timeout:.0f} s:"
                                       f" {sorted(set(self.devices) - online)}",
                                       hint=f"see the agent logs in {self.work}")
                if any(p.poll() is not None for p in self._procs):
                    raise EdgekitError("an agent or the broker exited",
                                       hint=f"see the logs in {self.work}")
                time.sleep(0.2)
        finally:
            client.close()

    def deploy(self, package: Path, *, breaking: bool = False) -> dict[str, Any]:
        """``edgekit deploy`` to the whole fleet (probation: 2 s of serving); the JSON
        outcome.

        Raises:
            EdgekitError: the deploy did not succeed on every device.
        """
        args = ["deploy", str(package), "--fleet", FLEET, "--broker", str(self.url),
                "--key", str(self.keys["operator_key"]), "--json", "--quiet",
                "--timeout", "300", "--probation-requests", "0", "--probation-seconds", "2"]
        if breaking:
            args.append("--allow-breaking")
        proc = _cli(*args)
        try:
            outcome: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            outcome = {"ok": False}
        if proc.returncode != 0 or not outcome.get("ok"):
            raise EdgekitError(f"edgekit deploy {package.name} failed (exit"
                               f" {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}",
                               hint=f"see the agent logs in {self.work}")
        return outcome

    def stop(self) -> None:
        """Stop the agents, then the broker (each by its own process)."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
