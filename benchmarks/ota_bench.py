"""OTA benchmark: a fleet of real agent processes moves to a new 20 MB model over MQTT.

In one run, on one machine, against one mosquitto:

1. N agent processes start on model v1 (each with its own model folder and HTTP API); a
   client per agent sends requests over HTTP the whole time.
2. Raw broker throughput, right before the deploy, under that load: a paho publisher and a
   paho subscriber (in this process, beside the artifact server) move the same bytes the
   fleet will download (agents x artifact size), in messages of the chunk size the agents
   ask for (``DEFAULT_CHUNK_BYTES``), QoS 1. The same figure measured before the agents
   start is printed too: the machine's load from other work swings it, which is why the
   ratio uses the one next to the download. So is a third, right after it, whose subscriber
   is the agent's client (``device_agent._paho``: a large message read in place), with the
   chunk throughput's ratio to it: the agents receive through that client, paho's own
   subscriber through paho's reader.
3. A fleet-wide deploy of v2 (a 20 MB package) is published; an in-process artifact server
   serves it in chunks. Measured: the time until every agent reports ``succeeded``, the
   download phase (deploy to the last agent's 100 %), chunk throughput (bytes the server sent
   / download phase) and its ratio to the raw throughput, the CPU time each agent process
   spent from the deploy to its own 100 % (median; Linux) and its minor page faults over the
   same span, the agents' RSS before the deploy, at their 100 % and after the update
   (medians; Linux), the CPU seconds of the agents together, of this process (server and
   HTTP clients) and of the broker over the download phase (Linux), when the first, median
   and last agent's download started (its 0 % event reached the host: the chunk requests
   follow within milliseconds) and reached 100 %, the HTTP requests' latency
   (p50 / p95 / max) for 3 s before the raw test and from the deploy until all succeeded,
   and the requests that failed during the swap (must be 0).

    .venv/bin/python benchmarks/ota_bench.py [--agents 20] [--size-mb 20] [--json out.json]
        [--ota-nice N]   # the agents' ota.nice (default: the agent's own default)
        [--direct-io on|off]   # the agents' ota.direct_io (default: the agent's default)
    .venv/bin/python benchmarks/ota_bench.py --quick   # 2 agents, 1 MB, short probation

``--quick`` (what the test suite runs) checks the same things on a small fleet: every agent
succeeds and no request fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from onnx import TensorProto, helper, numpy_helper
from paho.mqtt.enums import CallbackAPIVersion

from device_agent._paho import Client as AgentClient
from edgekit.artifact import golden_to_npz, write_package
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.deploy import Deployer, desired_for_package
from edgekit.host.ota.server import ArtifactServer
from edgekit.manifest import Manifest, TensorSpec
from edgekit.protocol import Kind, subscription
from edgekit.protocol.ota import DEFAULT_CHUNK_BYTES
from edgekit.protocol.ota.desired import Probation
from edgekit.signing import generate_keypair, load_private_key

REPO = Path(__file__).resolve().parents[1]
CHUNK = DEFAULT_CHUNK_BYTES  # the raw baseline moves messages of the size the agents ask for


# --------------------------------------------------------------------------- setup


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never one this process handed out already: an agent
    binds its port only when it starts, so the kernel may offer the same one twice."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false",
             "max_queued_messages 100000", "max_inflight_messages 100"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def build_package(path: Path, version: str, size_mb: float, seed: int, key: Any) -> Path:
    """A classifier whose hidden layer makes the package ``size_mb`` (random weights do not
    compress)."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    hidden = max(16, int(size_mb * 1024 * 1024 / 4 / 74))  # 64 in + 10 out weights per unit
    inits = [numpy_helper.from_array((rng.normal(size=(64, hidden)) / 8).astype(np.float32), "A"),
             numpy_helper.from_array((rng.normal(size=(hidden, 10)) / 64).astype(np.float32), "B")]
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]),
             helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "B"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    graph = helper.make_graph(
        nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])], inits)
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_proto.ir_version = 8
    model = model_proto.SerializeToString()
    golden_x = rng.uniform(0, 1, size=(4, 64)).astype(np.float32)
    golden_y = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(
        ["probs"], {"x": golden_x})[0]
    manifest = Manifest(
        name="bench", version=version, created="2026-01-01T00:00:00+00:00",
        task="classification", source={"framework": "onnx", "sha256": None},
        target={"format": "onnx", "model_file": "model.onnx", "runtime": "onnxruntime"},
        inputs=[TensorSpec("x", "float32", ["batch", 64])],
        outputs=[TensorSpec("probs", "float32", ["batch", 10])],
        recipe={"quantize": "none"}, tools={"edgekit": "bench"},
        golden={"atol": 1e-4, "rtol": 1e-3, "samples": 4})
    write_package(path, manifest, {"model.onnx": model,
                                   "golden.npz": golden_to_npz({"x": golden_x},
                                                               {"probs": golden_y})},
                  sign_key=key)
    return path


# --------------------------------------------------------------------------- raw broker


def raw_throughput(port: int, total: int, chunk: int,
                   subscriber: type[mqtt.Client] = mqtt.Client) -> dict[str, float]:
    """Bytes per second a paho publisher/subscriber pair moves through the broker (QoS 1);
    ``subscriber``: the subscriber's client class (paho's, or the agent's, which reads a large
    message in place)."""
    topic = "bench/raw"
    got = {"bytes": 0}
    done = threading.Event()

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        got["bytes"] += len(msg.payload)
        if got["bytes"] >= total:
            done.set()

    sub = subscriber(CallbackAPIVersion.VERSION2, client_id="bench-raw-sub")
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe(topic, qos=1)
    sub.loop_start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw-pub")
    pub.max_inflight_messages_set(256)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    time.sleep(0.5)
    payload = os.urandom(chunk)
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        pub.publish(topic, payload, qos=1)
        sent += len(payload)
    done.wait(600)
    seconds = time.perf_counter() - t0
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    if got["bytes"] < total:
        raise RuntimeError(f"the raw test's subscriber ({subscriber.__module__}) received"
                           f" {got['bytes']} of {total} bytes in {seconds:.0f} s")
    return {"bytes": float(got["bytes"]), "seconds": seconds,
            "mb_per_s": got["bytes"] / seconds / 1e6}


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux ``/proc``; None elsewhere)."""
    fields = _stat_fields(pid)
    return None if fields is None else \
        (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def minor_faults(pid: int) -> int | None:
    """Minor page faults of a process so far (Linux ``/proc``; None elsewhere)."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[7])


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process in MB (Linux ``/proc``; None elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        pass
    return None


def _spent(pairs: dict[str, tuple[Any, Any]], digits: int) -> float | None:
    """Median over agents of (after - before), where both were read."""
    values = sorted(b - a for a, b in pairs.values() if a is not None and b is not None)
    return round(values[len(values) // 2], digits) if values else None


def _spread(values: list[float]) -> list[float]:
    """First, median and last of ``values`` (seconds), or [] when there are none."""
    v = sorted(values)
    return [round(v[0], 2), round(v[len(v) // 2], 2), round(v[-1], 2)] if v else []


def _phase_cpu(pids: dict[str, int], broker_pid: int) -> dict[str, float | None]:
    """CPU seconds so far of the agents together, this process and the broker."""
    agents = [cpu_seconds(pid) for pid in pids.values()]
    return {"agents": None if None in agents else sum(a for a in agents if a is not None),
            "bench": cpu_seconds(os.getpid()), "broker": cpu_seconds(broker_pid)}


def _latency_ms(clients: list[LoadClient], start: float, end: float) -> list[float]:
    """p50, p95 and max (ms) of the requests sent between ``start`` and ``end``."""
    values = sorted(d for c in clients for t, d in c.answered if start <= t < end)
    if not values:
        return []
    return [round(1e3 * values[int(q * (len(values) - 1))], 1) for q in (0.5, 0.95, 1.0)]


def _median(values: list[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    return round(known[len(known) // 2], 1) if known else None


# --------------------------------------------------------------------------- agents


class LoadClient(threading.Thread):
    """Sends a request over HTTP to one agent, again and again; counts failures."""

    def __init__(self, url: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = stop
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self.answered: list[tuple[float, float]] = []  # (sent at, seconds to the answer)
        self.body = json.dumps({"inputs": {"x": np.random.default_rng(0).uniform(
            0, 1, size=(1, 64)).round(3).tolist()}}).encode()

    def run(self) -> None:
        while not self.stop.is_set():
            req = urllib.request.Request(self.url, data=self.body,
                                         headers={"Content-Type": "application/json"})
            sent = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    resp.read()
                self.ok += 1
                self.answered.append((sent, time.perf_counter() - sent))
            except (urllib.error.URLError, OSError) as exc:
                self.failed += 1
                self.errors.append(str(exc)[:200])
            self.stop.wait(0.2)


def start_agents(n: int, port: int, root: Path, v1: Path, pub: Path, intent_pub: Path,
                 ota_nice: int | None = None, direct_io: bool | None = None
                 ) -> list[tuple[subprocess.Popen[bytes], int]]:
    agents = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
    env.update({"EDGEKIT_RUNTIME_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    if ota_nice is not None:
        env["EDGEKIT_OTA_NICE"] = str(ota_nice)
    if direct_io is not None:
        env["EDGEKIT_OTA_DIRECT_IO"] = "true" if direct_io else "false"
    for i in range(n):
        http_port = free_port()
        folder = root / f"agent-{i:02d}"
        folder.mkdir()
        log = open(folder / "agent.log", "wb")  # noqa: SIM115 (owned by the child)
        proc = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "run", "--device-id", f"dev-{i:02d}",
             "--fleet", "bench", "--broker", f"mqtt://127.0.0.1:{port}", "--model", str(v1),
             "--model-dir", str(folder / "models"), "--trusted-key", str(pub),
             "--intent-key", str(intent_pub),
             "--http", f"127.0.0.1:{http_port}", "--telemetry-interval", "0"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        log.close()
        agents.append((proc, http_port))
    return agents


def wait_healthy(agents: list[tuple[subprocess.Popen[bytes], int]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc, http_port in agents:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"an agent exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError("agents did not become healthy") from None
                time.sleep(0.2)
    # An agent that could not bind its port exits at once; another process on that port
    # would have answered for it above.
    for proc, http_port in agents:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent for port {http_port} exited with {proc.returncode}")


# --------------------------------------------------------------------------- run


def run(agents_n: int, size_mb: float, probation_s: float = 10.0,
        ota_nice: int | None = None, direct_io: bool | None = None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ota-bench-"))
    broker, port = start_mosquitto(work)
    procs: list[tuple[subprocess.Popen[bytes], int]] = []
    stop = threading.Event()
    complete = False  # every agent succeeded
    try:
        keys = generate_keypair(work / "signing")
        key = load_private_key(keys.private_path)
        operator = generate_keypair(work / "operator")
        v1 = build_package(work / "bench-1.edgepkg", "1.0.0", 0.05, 1, key)
        v2 = build_package(work / "bench-2.edgepkg", "2.0.0", size_mb, 2, key)
        size = v2.stat().st_size
        raw_quiet = raw_throughput(port, size * agents_n, CHUNK)
        procs = start_agents(agents_n, port, work, v1, keys.public_path, operator.public_path,
                             ota_nice, direct_io)
        wait_healthy(procs, 300)
        clients = [LoadClient(f"http://127.0.0.1:{p}/predict", stop) for _, p in procs]
        quiet_start = time.perf_counter()
        for c in clients:
            c.start()
        time.sleep(3.0)  # the requests' latency with nothing else going on
        quiet_end = time.perf_counter()
        raw = raw_throughput(port, size * agents_n, CHUNK)
        raw_direct = raw_throughput(port, size * agents_n, CHUNK, AgentClient)
        host = HostClient(f"mqtt://127.0.0.1:{port}").connect()
        server = ArtifactServer(host, fleets=["bench"])
        info = server.serve(v2)
        server.ensure_reachable()
        served_before = server.stats.bytes
        doc = desired_for_package(info, "bench", probation=Probation(
            requests=20, seconds=probation_s, max_error_rate=0.0, max_nonfinite_rate=0.0,
            max_latency_ms=None))
        downloaded: dict[str, float] = {}
        started: dict[str, float] = {}  # a device's `downloading` event at 0 %
        phase_cpu: dict[str, float | None] = {}
        pids = {f"dev-{i:02d}": proc.pid for i, (proc, _) in enumerate(procs)}
        cpu: dict[str, tuple[float | None, float | None]] = {}
        faults: dict[str, tuple[int | None, int | None]] = {}
        rss_downloaded: dict[str, float | None] = {}

        def on_event(msg: mqtt.MQTTMessage) -> None:
            try:
                payload = json.loads(msg.payload)
            except ValueError:
                return
            data = payload.get("data") or {}
            progress = data.get("progress") or {}
            device = payload.get("device", "?")
            if data.get("deployment") != doc.deployment:
                return
            if progress.get("percent") == 0.0 and device not in started:
                started[device] = time.perf_counter()
            if progress.get("percent") == 100.0 and device not in downloaded:
                downloaded[device] = time.perf_counter()
                if len(downloaded) == len(pids):
                    phase_cpu.update(_phase_cpu(pids, broker.pid))
                if device in cpu:
                    cpu[device] = (cpu[device][0], cpu_seconds(pids[device]))
                    faults[device] = (faults[device][0], minor_faults(pids[device]))
                    rss_downloaded[device] = rss_mb(pids[device])

        host.subscribe(subscription("bench", "+", Kind.EVENTS), on_event)
        deployer = Deployer(host, "bench", doc, load_private_key(operator.private_path))
        deployer.discover()
        rss_before = _median([rss_mb(pid) for pid in pids.values()])
        faults.update({device: (minor_faults(pid), None) for device, pid in pids.items()})
        cpu.update({device: (cpu_seconds(pid), None) for device, pid in pids.items()})
        phase_cpu_start = _phase_cpu(pids, broker.pid)
        t0 = time.perf_counter()
        deployer.publish()
        result = deployer.wait(900)
        complete = result.counts().get("succeeded", 0) == agents_n
        t_all = time.perf_counter() - t0
        time.sleep(1.0)  # requests right after the last swap
        rss_after = _median([rss_mb(pid) for pid in pids.values()])
        stop.set()
        for c in clients:
            c.join(60)
        download_s = (max(downloaded.values()) - t0) if downloaded else float("nan")
        chunk_bytes = server.stats.bytes - served_before
        chunk_mb_s = chunk_bytes / download_s / 1e6
        host.close()
        return {
            "agents": agents_n,
            "artifact_bytes": size,
            "succeeded": result.counts().get("succeeded", 0),
            "counts": result.counts(),
            "time_to_all_succeeded_s": round(t_all, 2),
            "download_phase_s": round(download_s, 2),
            "chunk_bytes_served": chunk_bytes,
            "chunk_mb_per_s": round(chunk_mb_s, 2),
            "chunk_bytes": CHUNK,
            "raw_broker_mb_per_s": round(raw["mb_per_s"], 2),
            "chunk_to_raw_ratio": round(chunk_mb_s / raw["mb_per_s"], 3),
            "raw_broker_before_agents_mb_per_s": round(raw_quiet["mb_per_s"], 2),
            "raw_broker_in_place_sub_mb_per_s": round(raw_direct["mb_per_s"], 2),
            "chunk_to_raw_in_place_sub_ratio": round(chunk_mb_s / raw_direct["mb_per_s"], 3),
            "agent_cpu_s_to_downloaded": _spent(cpu, 3),
            "agent_minor_faults_to_downloaded": _spent(faults, 0),
            "agent_rss_mb_before_deploy": rss_before,
            "agent_rss_mb_downloaded": _median(list(rss_downloaded.values())),
            "agent_rss_mb_after_update": rss_after,
            "first_request_s": _spread([t - t0 for t in started.values()]),
            "downloaded_s": _spread([t - t0 for t in downloaded.values()]),
            "phase_cpu_s": {k: None if phase_cpu.get(k) is None or v is None
                            else round(phase_cpu[k] - v, 2)  # type: ignore[operator]
                            for k, v in phase_cpu_start.items()},
            "latency_ms_before": _latency_ms(clients, quiet_start, quiet_end),
            "latency_ms_update": _latency_ms(clients, t0, t0 + t_all),
            "requests_ok": sum(c.ok for c in clients),
            "requests_failed": sum(c.failed for c in clients),
            "failure_samples": [e for c in clients for e in c.errors][:5],
        }
    finally:
        stop.set()
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.terminate()
        broker.wait(10)
        if not complete:
            # Keep what the agents logged: a run where an agent did not succeed is the one
            # whose logs say why.
            kept = Path(tempfile.mkdtemp(prefix="ota-bench-logs-"))
            for log in work.glob("agent-*/agent.log"):
                shutil.copy(log, kept / f"{log.parent.name}.log")
            print(f"not every agent succeeded: their logs are in {kept}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--size-mb", type=float, default=20.0)
    parser.add_argument("--json", dest="json_path", help="Also write the results here.")
    parser.add_argument("--ota-nice", type=int, default=None,
                        help="the agents' ota.nice (default: the agent's default)")
    parser.add_argument("--direct-io", choices=["on", "off"], default=None,
                        help="the agents' ota.direct_io (default: the agent's default)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 agents, a 1 MB model, 1 s of probation")
    args = parser.parse_args()
    if args.quick:
        args.agents, args.size_mb = 2, 1.0
    out = run(args.agents, args.size_mb, probation_s=1.0 if args.quick else 10.0,
              ota_nice=args.ota_nice,
              direct_io=None if args.direct_io is None else args.direct_io == "on")
    rows = [
        ("agents", out["agents"]),
        ("artifact size (MB)", round(out["artifact_bytes"] / 1e6, 2)),
        ("agents succeeded", f"{out['succeeded']} / {out['agents']}"),
        ("time to all succeeded (s)", out["time_to_all_succeeded_s"]),
        ("download phase (s)", out["download_phase_s"]),
        ("chunk size (KiB)", out["chunk_bytes"] // 1024),
        ("chunk throughput (MB/s)", out["chunk_mb_per_s"]),
        ("raw broker throughput (MB/s)", out["raw_broker_mb_per_s"]),
        ("chunk / raw ratio", out["chunk_to_raw_ratio"]),
        ("raw broker before the agents started (MB/s)",
         out["raw_broker_before_agents_mb_per_s"]),
        ("raw broker, subscriber reading in place like the agents (MB/s)",
         out["raw_broker_in_place_sub_mb_per_s"]),
        ("chunk / that raw ratio", out["chunk_to_raw_in_place_sub_ratio"]),
        ("agent CPU s to its 100 % (median)", out["agent_cpu_s_to_downloaded"]),
        ("agent minor page faults to its 100 % (median)",
         out["agent_minor_faults_to_downloaded"]),
        ("agent RSS MB: before deploy / at 100 % / after (medians)",
         f"{out['agent_rss_mb_before_deploy']} / {out['agent_rss_mb_downloaded']} /"
         f" {out['agent_rss_mb_after_update']}"),
        ("download started (0 % event), s after the deploy (first / median / last agent)",
         " / ".join(map(str, out["first_request_s"]))),
        ("100 % reached, s after the deploy (first / median / last agent)",
         " / ".join(map(str, out["downloaded_s"]))),
        ("CPU s over the download phase: agents / server + clients / broker",
         " / ".join(str(out["phase_cpu_s"][k]) for k in ("agents", "bench", "broker"))),
        ("request latency ms p50 / p95 / max: 3 s before the raw test",
         " / ".join(map(str, out["latency_ms_before"]))),
        ("request latency ms p50 / p95 / max: deploy to all succeeded",
         " / ".join(map(str, out["latency_ms_update"]))),
        ("requests answered during the run", out["requests_ok"]),
        ("requests failed during the run", out["requests_failed"]),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(out, indent=2) + "\n")
    sys.exit(0 if out["requests_failed"] == 0 and out["succeeded"] == out["agents"] else 1)


if __name__ == "__main__":
    main()
