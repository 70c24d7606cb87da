"""``edgekit demo``: the whole loop on one machine, in one command.

Phases: start a broker (embedded amqtt unless one is named), a controller and N real agent
processes; train the digits CNN, convert, sign, register and deploy it; send clean traffic
with labels as feedback (baseline); then rotated, noisy digits (drift) until the controller's
policy fires, retrains on the collected samples, proves the candidate better and rolls it out
canary first; then more drifted traffic on the new model (recovered). The report is written
from what the traffic generator saw and from the controller's database.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from edgekit.errors import EdgekitError, UsageError
from edgekit.host.demo.broker import EmbeddedBroker, free_port
from edgekit.host.demo.report import accuracy_by_phase, write_report
from edgekit.host.demo.traffic import Phase, TrafficGenerator
from edgekit.signing import KeyPair

__all__ = ["DemoOptions", "run_demo"]

FLEET = "demo"
MODEL = "digits"


@dataclass
class DemoOptions:
    out: Path = Path("demo-out")
    devices: int = 3
    broker: str | None = None
    rate: float = 20.0
    baseline_s: float = 20.0
    recovered_s: float = 20.0
    drift_timeout_s: float = 240.0
    seed: int = 0
    console: str | None = None  # HOST:PORT: the controller serves the fleet console there
    echo: Callable[[str], None] = print


class _Clock:
    def __init__(self, echo: Callable[[str], None]) -> None:
        self.t0 = time.time()
        self.echo = echo

    def say(self, text: str) -> None:
        self.echo(f"[{time.time() - self.t0:6.1f}s] {text}")


def _train_and_package(work: Path, clock: _Clock, key_path: Path) -> Path:
    import torch

    from converters import ConvertOptions, convert
    from edgekit.data import Dataset
    from edgekit.host.demo.digits import (
        estimate_set,
        load_digits_split,
        torch_cnn,
        train_torch,
        write_npz_files,
    )
    from edgekit.signing import load_private_key

    clock.say("training the digits CNN (PyTorch) on clean digits")
    torch.set_num_threads(1)
    split = load_digits_split()
    model = train_torch(torch_cnn(), *split["train"], epochs=12)
    pt2 = work / "digits-1.0.0.pt2"
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.from_numpy(split["train"][0][:2]),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, pt2)
    data = write_npz_files(work / "data")
    # The accuracy estimate learns how the model's outputs change with its accuracy from the
    # evaluation split drifted as the field may be (its own seeds, not the traffic's), each
    # drift strength a group whose accuracy the estimate is held to.
    estimate = estimate_set(*split["eval"])
    clock.say("converting to ONNX, validating against PyTorch, signing")
    out = work / "digits-1.0.0.edgepkg"
    res = convert(pt2, ConvertOptions(target="onnx", quantize="none", name=MODEL,
                                      version="1.0.0", exporter="torchscript",
                                      latency_runs=20),
                  output=out, calibration=data["calib"], eval_data=data["eval"],
                  estimate_data=Dataset({"x": estimate[0]}, estimate[1],
                                        "digits evaluation split, clean and drifted",
                                        estimate[2]),
                  sign_key=load_private_key(key_path))
    acc = res.report["accuracy"]["artifact"]["accuracy"]
    clock.say(f"packaged {MODEL} 1.0.0: accuracy {acc:.3f} on {res.report['accuracy']['samples']}"
              f" held-out digits, parity {'ok' if res.passed else 'FAILED'}")
    return out


def _controller_config(work: Path, broker: str, db_url: str, release: KeyPair,
                       operator: KeyPair, console: dict[str, str]) -> Path:
    from edgekit.host.controller import load_config
    from edgekit.host.controller.config import to_toml

    retrain = (f"{shlex.quote(sys.executable)} -m edgekit.host.demo.retrain --data {{data}}"
               f" --current {{model}} --out {{output}}")
    cfg = load_config(overrides={
        "mqtt.broker": broker, "database.url": db_url, "registry.store": str(work / "registry"),
        "registry.trusted_keys": [str(release.public_path)],
        "controller.fleets": [FLEET], "controller.signing_key": str(operator.private_path),
        "controller.operator_keys": [str(operator.public_path)],
        "controller.release_key": str(release.private_path),
        "controller.tick_s": 0.2, "controller.workdir": str(work / "jobs"),
        "rollout.canary": "1", "rollout.wave_factor": 2.0, "rollout.device_timeout_s": 90.0,
        "rollout.wave_min_labels": 20, "rollout.labels_timeout_s": 30.0,
        "rollout.quality_min_labels": 20, "rollout.quality_margin": 0.05,
        "rollout.probation_requests": 10, "rollout.probation_seconds": 2.0,
        # The retrained candidate runs in shadow on the canary first. Under drift it
        # disagrees with the old model where the old one is wrong, so the gate asks for
        # no loss of accuracy on the labelled live requests and only a loose agreement:
        # with the old model right on 0.24-0.35 of the drifted requests, the two agree on
        # about 0.3 of them, and on 40 requests roughly one run in 10-20 falls below 0.2
        # (0.175 was seen). The accuracy gate is what stops a worse candidate; 0.05 only
        # one that almost never agrees.
        "rollout.shadow_enabled": True, "rollout.shadow_requests": 40,
        "rollout.shadow_sample": 1.0, "rollout.shadow_timeout_s": 90.0,
        "rollout.shadow_min_agreement": 0.05, "rollout.shadow_min_accuracy_delta": 0.0,
        "rollout.shadow_min_labels": 20,
        "policy.enabled": True, "policy.metric": "accuracy", "policy.relative_drop": 0.1,
        "policy.min_labels": 30, "policy.consecutive": 3, "policy.interval_s": 4.0,
        "policy.samples_window_s": 20.0, "policy.min_samples": 300,
        "policy.holdout_fraction": 0.3, "policy.margin": 0.02, "policy.strategy": "retrain",
        "policy.retrain_command": retrain, "policy.retrain_output": "candidate.pt2",
        "policy.retrain_timeout_s": 300.0, "policy.cooldown_s": 600.0, **console,
    })
    path = work / "controller.toml"
    path.write_text(to_toml(cfg))
    return path


def _console_settings(listen: str | None, operator: KeyPair) -> dict[str, str]:
    """The controller's [console] keys: where it listens (port 0: a free port picked here,
    so the URL can be printed), the operator key that signs the console's requests and,
    with $EDGEKIT_CONSOLE_PASSWORD, the operator's hash (the processes the demo starts do
    not inherit EDGEKIT_* variables)."""
    if not listen:
        return {}
    from edgekit.host.console import PASSWORD_ENV, hash_password, parse_listen

    host, port = parse_listen(listen)
    settings = {"console.listen": f"{host}:{port or free_port()}",
                "console.operator_key": str(operator.private_path)}
    if os.environ.get(PASSWORD_ENV):
        settings["console.password_hash"] = hash_password(os.environ[PASSWORD_ENV])
    return settings


def _check_broker(url: str) -> None:
    """Fail at once, before anything is trained or started, when the broker is unreachable.

    Raises:
        UsageError: the URL is not mqtt://HOST:PORT, or nothing accepts connections there.
    """
    parsed = urlsplit(url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise UsageError(f"--broker {url!r} is not an mqtt:// or mqtts:// URL",
                         hint="for example --broker mqtt://127.0.0.1:1883")
    port = parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=5):
            pass
    except OSError as exc:
        raise UsageError(f"no MQTT broker answers at {parsed.hostname}:{port} ({exc.strerror or exc})",
                         hint="start the broker, or leave out --broker to use the embedded one") from exc


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as handle:
        return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)


def _wait(what: str, check: Callable[[], Any], timeout: float,
          procs: list[subprocess.Popen[bytes]] = ()) -> Any:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                raise EdgekitError(f"a demo process exited while waiting for {what}"
                                   f" (exit code {proc.returncode}); see the logs in the"
                                   " output folder's work/ subfolder")
        time.sleep(0.25)
    raise EdgekitError(f"timed out after {timeout:.0f} s waiting for {what}",
                       hint="see the logs in the output folder's work/ subfolder")


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run the demo; return the summary (also written to ``summary.json``).

    Raises:
        EdgekitError: a part failed to start or a phase did not finish in time; the message
            says which and where the logs are.
    """
    run = _DemoRun(opts)
    try:
        package = run.start_parts()
        data = _demo_data(opts.seed)
        run.start_traffic(data)
        run.first_deploy(package)
        run.seen = _follow_for(run.store, run.clock, run.seen, opts.baseline_s)
        run.phase_t["drift"] = time.time()
        run.traffic_gen().set_phase(Phase("drift", data.drift_x, data.all_y))
        run.clock.say("phase drift: digits rotated 25-45 degrees with noise")
        new_version, fired_at = run.wait_for_update()
        run.phase_t["updated"] = time.time()
        run.clock.say(f"every device runs {new_version}: phase recovered (drifted digits go on)")
        run.traffic_gen().set_phase(Phase("recovered", data.drift_x, data.all_y))
        _follow_for(run.store, run.clock, run.seen, opts.recovered_s)
        run.phase_t["end"] = time.time()
        return run.finish(new_version, fired_at)
    finally:
        run.stop()


@dataclass
class _DemoData:
    clean_x: np.ndarray
    clean_y: np.ndarray
    drift_x: np.ndarray
    all_y: np.ndarray


def _demo_data(seed: int) -> _DemoData:
    """Clean digits (calibration and evaluation splits), and every digit rotated and noisy."""
    from edgekit.host.demo.digits import drift, load_digits_split

    split = load_digits_split(seed)
    clean_x = np.concatenate([split["calib"][0], split["eval"][0]])
    clean_y = np.concatenate([split["calib"][1], split["eval"][1]])
    all_x = np.concatenate([split["train"][0], clean_x])
    all_y = np.concatenate([split["train"][1], clean_y])
    rng = np.random.default_rng(seed)
    angles = rng.uniform(25, 45, size=len(all_y)) * rng.choice([-1, 1], size=len(all_y))
    drift_x = np.concatenate([drift(all_x[i : i + 1], float(a), 0.15, seed=i)
                              for i, a in enumerate(angles)])
    return _DemoData(clean_x, clean_y, drift_x, all_y)


class _DemoRun:
    """The parts of one demo run (broker, controller, agents, traffic) and what they saw."""

    def __init__(self, opts: DemoOptions) -> None:
        self.opts = opts
        self.out = opts.out.resolve()
        self.work = self.out / "work"
        if self.work.exists():
            import shutil

            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        self.clock = _Clock(opts.echo)
        self.phase_t: dict[str, float] = {"start": time.time()}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
        self.env.update(PYTHONUNBUFFERED="1", EDGEKIT_SAMPLES_FRACTION="1.0",
                        EDGEKIT_SAMPLES_MAX_PER_MINUTE="6000", EDGEKIT_QUALITY_WINDOW="60")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.broker: EmbeddedBroker | None = None
        self.operator: KeyPair | None = None  # signs desired documents and requests
        self.traffic: TrafficGenerator | None = None
        self.store: Any = None
        self.url = ""
        self.ports: dict[str, int] = {}
        self.seen = 0  # id of the last event shown

    def start_parts(self) -> Path:
        """Start the broker, controller and agents, with a signed, registered package; wait
        for the agents to come online. Returns the package."""
        from edgekit.host.db import Store
        from edgekit.host.registry import Registry
        from edgekit.signing import generate_keypair

        opts, work, clock = self.opts, self.work, self.clock
        if opts.broker:
            self.url = opts.broker
            _check_broker(self.url)
            clock.say(f"using the broker at {self.url}")
        else:
            self.broker = EmbeddedBroker(work / "broker").start()
            self.url = self.broker.url
            clock.say(f"started the embedded MQTT broker (amqtt) at {self.url}")
        # Two roles: the release key signs packages, the operator key signs what devices
        # should run (desired documents) and the requests to the controller.
        keys = generate_keypair(work / "edgekit-release")
        self.operator = operator = generate_keypair(work / "edgekit-operator")
        package = _train_and_package(work, clock, keys.private_path)
        db_url = f"sqlite:///{work / 'fleet.db'}"
        with Store(db_url) as store:
            Registry(store, work / "registry").push(package)
        console = _console_settings(opts.console, operator)
        config = _controller_config(work, self.url, db_url, keys, operator, console)
        self.procs.append(_spawn([sys.executable, "-m", "edgekit.host.cli", "controller",
                                  "run", "--config", str(config)], work / "controller.log",
                                 self.env))
        clock.say("started the controller (policy: accuracy 10% under the baseline for 3"
                  " windows of 4 s)")
        self.ports = {f"pi-{i + 1}": free_port() for i in range(opts.devices)}
        for device, port in self.ports.items():
            self.procs.append(_spawn(
                [sys.executable, "-m", "device_agent", "run", "--device-id", device,
                 "--fleet", FLEET, "--broker", self.url, "--model-dir", str(work / device),
                 "--trusted-key", str(keys.public_path),
                 "--intent-key", str(operator.public_path), "--http", f"127.0.0.1:{port}",
                 "--telemetry-interval", "1"], work / f"{device}.log", self.env))
        clock.say(f"started {opts.devices} agents: {', '.join(self.ports)}")
        if console:
            clock.say(f"fleet console: http://{console['console.listen']}/")
        self.store = Store(db_url)
        _wait("the agents to come online",
              lambda: len(self.store.list_devices(FLEET, online=True)) == opts.devices, 90,
              self.procs)
        return package

    def _operator(self) -> KeyPair:
        assert self.operator is not None, "start_parts() makes the operator key"
        return self.operator

    def traffic_gen(self) -> TrafficGenerator:
        assert self.traffic is not None, "start_traffic comes first"
        return self.traffic

    def start_traffic(self, data: _DemoData) -> None:
        self.traffic = TrafficGenerator({d: ("127.0.0.1", p) for d, p in self.ports.items()},
                                        rate=self.opts.rate, seed=self.opts.seed)
        self.traffic.set_phase(Phase("baseline", data.clean_x, data.clean_y))
        self.traffic.start()
        self.clock.say(f"traffic: clean digits, {self.opts.rate:g} requests/s per device,"
                       " labels sent back as feedback")

    def first_deploy(self, package: Path) -> None:
        """Deploy 1.0.0 through the controller and wait until every device runs it."""
        self.clock.say(f"deploying {MODEL} 1.0.0 to fleet '{FLEET}' through the controller")
        self.seen = _follow_events(self.store, self.clock, 0)
        deploy = subprocess.run(
            [sys.executable, "-m", "edgekit.host.cli", "deploy", str(package), "--fleet", FLEET,
             "--broker", self.url, "--key", str(self._operator().private_path), "--timeout", "120",
             "--probation-seconds", "2",
             "--probation-requests", "10", "--json"],
            capture_output=True, text=True, env=self.env, timeout=180)
        (self.work / "deploy-1.0.0.log").write_text(deploy.stdout + deploy.stderr)
        if deploy.returncode != 0:
            raise EdgekitError(f"the first deployment failed (exit {deploy.returncode}):"
                               f" {deploy.stderr.strip().splitlines()[-1:] or deploy.stdout}")
        _wait("every device to run 1.0.0", lambda: all(
            d.model_version == "1.0.0" for d in self.store.list_devices(FLEET)), 60, self.procs)
        self.phase_t["deployed"] = time.time()
        self.seen = _follow_events(self.store, self.clock, self.seen)
        self.clock.say("every device runs 1.0.0: phase baseline")

    def wait_for_update(self) -> tuple[str, float | None]:
        """Wait for the policy to fire and every device to run one new version.

        Returns:
            The new version, and when the policy fired (epoch seconds).

        Raises:
            EdgekitError: a demo process exited, or the fleet was not updated in time.
        """
        deadline = time.monotonic() + self.opts.drift_timeout_s
        fired_at = None
        while time.monotonic() < deadline:
            self.seen = _follow_events(self.store, self.clock, self.seen)
            if fired_at is None:
                fired = self.store.list_events(fleet=FLEET, kinds=["policy.fired"], limit=1)
                if fired:
                    fired_at = fired[0].ts.timestamp()
            devices = self.store.list_devices(FLEET)
            versions = {d.model_version for d in devices}
            if fired_at and len(devices) == self.opts.devices and len(versions) == 1 and \
                    "1.0.0" not in versions and None not in versions:
                return versions.pop(), fired_at
            for proc in self.procs:
                if proc.poll() is not None:
                    raise EdgekitError(f"a demo process exited (code {proc.returncode});"
                                       f" see {self.work}")
            time.sleep(0.5)
        raise EdgekitError(f"the fleet was not updated within {self.opts.drift_timeout_s:.0f} s"
                           " of the drift", hint=f"see {self.work / 'controller.log'}")

    def finish(self, new_version: str, fired_at: float | None) -> dict[str, Any]:
        """Stop the traffic, write the report and ``summary.json``; return the summary."""
        traffic, phase_t = self.traffic_gen(), self.phase_t
        traffic.stop()
        records = traffic.snapshot()
        drift_old = [r for r in records if r.phase == "drift" and r.version == "1.0.0"]
        fleet_acc = accuracy_by_phase(records, ["baseline", "drift", "recovered"])
        fleet_acc["drift_on_1.0.0"] = (float(np.mean([r.correct for r in drift_old]))
                                       if drift_old else None)
        summary: dict[str, Any] = {
            "devices": self.opts.devices,
            "broker": self.url,
            "initial_version": "1.0.0",
            "final_version": new_version,
            "fleet_accuracy": {"before_drift": fleet_acc["baseline"],
                               "during_drift": fleet_acc["drift_on_1.0.0"],
                               "after_update": fleet_acc["recovered"]},
            "requests": {"answered": len(records), "failed": sum(traffic.errors().values()),
                         "last_error": traffic.last_error()},
            "phase_seconds": {
                "setup_and_first_deploy": phase_t["deployed"] - phase_t["start"],
                "baseline": phase_t["drift"] - phase_t["deployed"],
                "drift_until_fleet_updated": phase_t["updated"] - phase_t["drift"],
                "policy_fired_to_fleet_updated": (phase_t["updated"] - fired_at
                                                  if fired_at else None),
                "recovered": phase_t["end"] - phase_t["updated"],
                "total": phase_t["end"] - phase_t["start"],
            },
        }
        events = [e.to_dict() for e in self.store.list_events(fleet=FLEET, limit=5000)]
        markers = [(phase_t["drift"], "drift starts"), (phase_t["updated"], "fleet updated")]
        markers += [(dt.datetime.fromisoformat(str(e["ts"])).timestamp(), str(e["kind"]))
                    for e in events if str(e["kind"]).startswith(("policy.fired",
                                                                  "rollout.wave"))]
        report = write_report(self.out, summary, records, events, markers, phase_t["start"])
        self.clock.say(f"wrote {report} and {self.out / 'summary.json'}")
        return summary

    def stop(self) -> None:
        """Stop every part that was started (each at most once)."""
        if self.traffic is not None:
            self.traffic.stop()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.broker is not None:
            self.broker.stop()
        if self.store is not None:
            self.store.close()


_SHOWN = ("policy.", "rollout.", "update.succeeded", "update.rolled_back", "update.failed")


def _follow_events(store: Any, clock: _Clock, after: int) -> int:
    for event in store.list_events(fleet=FLEET, after_id=after, limit=500):
        after = event.id
        if event.kind.startswith(_SHOWN):
            where = f" {event.device}" if event.device else ""
            clock.say(f"event {event.kind}{where}: {event.message}")
    return after


def _follow_for(store: Any, clock: _Clock, after: int, seconds: float) -> int:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        after = _follow_events(store, clock, after)
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))
    return _follow_events(store, clock, after)
