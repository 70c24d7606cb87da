"""The measurements of ``agent_bench.py``: the model, the in-process and the process cases.

Each function measures one thing and returns plain numbers; ``agent_bench.py`` runs them,
alternates them where load on a shared machine matters, and prints the table.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().with_name("agent_bench.py")
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
sys.path.append(str(ROOT / "tests"))


# --------------------------------------------------------------------------- the model


def build_package(out: Path) -> Path:
    """Train the digits CNN briefly and convert it to an ONNX fp32 package."""
    from converters import ConvertOptions, convert
    from edgekit.data import Dataset
    from examples.digits.data import load_digits_split
    from examples.digits.models import torch_cnn, train_torch

    split = load_digits_split()
    model = train_torch(torch_cnn(), *split["train"], epochs=5)
    calib_x, calib_y = split["calib"]
    eval_x, eval_y = split["eval"]
    path = out / "digits-cnn.edgepkg"
    convert(model, ConvertOptions(target="onnx", quantize="none", name="digits", version="1.0.0",
                                  threads=1),
            output=path, calibration=Dataset({"x": calib_x}, calib_y, "calib"),
            eval_data=Dataset({"x": eval_x}, eval_y, "eval"))
    return path


def quick_package(out: Path) -> Path:
    """The tests' ridge digits classifier (x [batch, 64] -> probs): no training, no torch."""
    sys.path.insert(0, str(ROOT / "tests" / "agent"))
    from _digits import write_digits_package

    return write_digits_package(out / "digits-ridge.edgepkg", version="1.0.0")


def sample_inputs(package: Path) -> np.ndarray:
    from edgekit.artifact import open_package

    golden_in, _ = open_package(package).golden()
    return next(iter(golden_in.values()))


# --------------------------------------------------------------------------- in process


def _agent(package: Path, workdir: Path, **overrides: Any) -> Any:
    from device_agent import Agent, load_config

    cfg = {"model.dir": str(workdir), "model.package": str(package),
           "model.allow_unsigned": True, "telemetry.interval_s": 0.0, "runtime.threads": 1}
    cfg.update(overrides)
    return Agent(load_config(env={}, overrides=cfg))


def _raw_session(package: Path) -> Any:
    """onnxruntime on the package's model, with the agent's settings (one thread, CPU)."""
    import onnxruntime as ort

    from edgekit.artifact import open_package

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(open_package(package).model_bytes(), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def overhead(package: Path, work: Path, batch: int, rounds: int = 30,
             per_round: int = 300) -> dict[str, Any]:
    agent = _agent(package, work / f"overhead-{batch}", **{"requests.max_batch": 1024})
    x = sample_inputs(package)
    x = np.concatenate([x] * (batch // len(x) + 1))[:batch]
    name = agent.model.manifest.inputs[0].name
    feeds = {name: x}
    session = agent.model.session
    raw = _raw_session(package)
    outputs = [o.name for o in agent.model.manifest.outputs]
    calls = {
        "raw onnxruntime": lambda: raw.run(outputs, feeds),
        "edgekit Session.run": lambda: session.run(feeds),
        "Agent.predict": lambda: agent.predict(feeds),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():
        for _ in range(200):
            fn()
    for _ in range(rounds):
        for key, fn in calls.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    agent.stop()
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    return {
        "median_us": med,
        "ratio_vs_raw": med["Agent.predict"] / med["raw onnxruntime"],
        "ratio_vs_session": med["Agent.predict"] / med["edgekit Session.run"],
        "overhead_us": med["Agent.predict"] - med["raw onnxruntime"],
    }


def p99_worker(package: Path, work: Path, mode: str, seconds: float, broker_url: str) -> None:
    """Run in a child process: print the p99 of Agent.predict over ``seconds``."""
    overrides: dict[str, Any] = {}
    if mode == "on":
        overrides = {"mqtt.broker": broker_url, "telemetry.interval_s": 1.0,
                     "device.id": f"bench-{uuid.uuid4().hex[:6]}", "device.fleet": "bench"}
    agent = _agent(package, work, **overrides)
    agent.start()
    if mode == "on":
        deadline = time.monotonic() + 30
        while not agent.link.connected and time.monotonic() < deadline:
            time.sleep(0.01)
    x = sample_inputs(package)[:1]
    feeds = {agent.model.manifest.inputs[0].name: x}
    for _ in range(500):
        agent.predict(feeds)
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        agent.predict(feeds)
        lat.append(time.perf_counter() - t0)
    ticks = agent.outbox.counter("seq.metrics") if agent.outbox is not None else 0
    agent.stop()
    arr = np.asarray(lat) * 1e6
    print(json.dumps({"p99_us": float(np.percentile(arr, 99)), "p50_us": float(np.median(arr)),
                      "calls": len(lat), "metrics_sent": ticks}))


def rss_floor_worker(package: Path) -> None:
    """Run in a child process: onnxruntime alone with the package's model; print its RSS."""
    import psutil

    session = _raw_session(package)
    x = sample_inputs(package)[:1]
    session.run(None, {session.get_inputs()[0].name: x})
    time.sleep(0.5)
    print(json.dumps({"rss": int(psutil.Process().memory_info().rss)}))


def rss_floor(package: Path) -> float:
    """The RSS (MB) of a bare process that imports onnxruntime and runs the model once."""
    out = subprocess.run([sys.executable, str(BENCH), "--rss-floor-worker", "--package",
                          str(package)], capture_output=True, text=True, check=True, timeout=120)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["rss"]) / 1e6


def telemetry_p99(package: Path, work: Path, seconds: float, broker_url: str,
                  repeats: int = 5) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for i in range(repeats):
        for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
            out = subprocess.run(
                [sys.executable, str(BENCH), "--p99-worker", mode, "--package", str(package),
                 "--work", str(work / f"p99-{mode}-{i}"), "--seconds", str(seconds),
                 "--broker", broker_url],
                capture_output=True, text=True, check=True, timeout=300)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    p99 = {m: statistics.median(r["p99_us"] for r in rs) for m, rs in results.items()}
    return {"p99_us": p99, "ratio": p99["on"] / p99["off"],
            "metrics_sent_per_run": [r["metrics_sent"] for r in results["on"]], "runs": results}


# --------------------------------------------------------------------------- agent process


class AgentProc:
    """An agent process (``python -m device_agent run``) of the checkout at ``root``."""

    def __init__(self, package: Path, work: Path, broker_url: str, device: str,
                 root: Path = ROOT) -> None:
        from mqtt_broker import free_port

        self.port = free_port()
        self.device = device
        self.t0 = time.perf_counter()
        self.log = open(work / f"{device}.log", "wb")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
        env["PYTHONPATH"] = str(root)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "run", "--device-id", device, "--fleet",
             "bench", "--broker", broker_url, "--model", str(package), "--model-dir",
             str(work / device), "--allow-unsigned", "--http", f"127.0.0.1:{self.port}",
             "--telemetry-interval", "5", "--threads", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=root, env=env)

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def post(conn: http.client.HTTPConnection, path: str, body: bytes, ctype: str) -> bytes:
    conn.request("POST", path, body=body, headers={"Content-Type": ctype})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
    return data


def startup_time(package: Path, work: Path, broker_url: str, repeats: int = 3) -> float:
    """Median seconds from starting the agent process to its first HTTP answer."""
    body = json.dumps({"inputs": {"x": sample_inputs(package)[:1].tolist()}}).encode()
    times = []
    for i in range(repeats):
        proc = AgentProc(package, work, broker_url, f"start-{i}")
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=5)
                post(conn, "/predict", body, "application/json")
                conn.close()
                break
            except (OSError, RuntimeError):
                if proc.proc.poll() is not None:
                    raise RuntimeError("the agent exited during start-up") from None
                time.sleep(0.01)
        times.append(time.perf_counter() - proc.t0)
        proc.stop()
    return statistics.median(times)


def http_numbers(proc: AgentProc, x: np.ndarray, seconds: float, clients: int = 4,
                 round_trips: int = 500) -> dict[str, Any]:
    import io

    conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=10)
    body = json.dumps({"inputs": {"x": x[:1].tolist()}, "outputs": "none"}).encode()
    buf = io.BytesIO()
    np.save(buf, x[:1])
    npy = buf.getvalue()
    rtt: dict[str, list[float]] = {"json": [], "npy": []}
    for _ in range(100):
        post(conn, "/predict", body, "application/json")
    for _ in range(round_trips):
        for kind, payload, ctype in (("json", body, "application/json"),
                                     ("npy", npy, "application/x-npy")):
            t0 = time.perf_counter()
            post(conn, "/predict?outputs=none", payload, ctype)
            rtt[kind].append(time.perf_counter() - t0)
    conn.close()
    count = [0] * clients
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        c = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=10)
        while time.monotonic() < stop:
            post(c, "/predict", body, "application/json")
            count[i] += 1
        c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    peak = [proc.rss()]

    def sampler() -> None:
        while time.monotonic() < stop:
            peak.append(proc.rss())
            time.sleep(0.2)

    t_start = time.perf_counter()
    threads.append(threading.Thread(target=sampler))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    return {
        "rtt_ms": {k: {"p50": float(np.median(v) * 1e3), "p99": float(np.percentile(v, 99) * 1e3)}
                   for k, v in rtt.items()},
        "rps": sum(count) / elapsed, "clients": clients, "rss_peak": max(peak),
    }


def mqtt_rps(proc: AgentProc, broker_url: str, x: np.ndarray, seconds: float,
             window: int = 32) -> dict[str, Any]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    host, port = broker_url.removeprefix("mqtt://").rsplit(":", 1)
    reply_to = f"edgekit/v1/bench/{proc.device}/reply/bench"
    request_topic = f"edgekit/v1/bench/{proc.device}/predict"
    inputs = {"x": x[:1].tolist()}
    done = threading.Semaphore(0)
    received = [0]
    sent_at: dict[str, float] = {}
    rtts: list[float] = []
    subscribed = threading.Event()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        doc = json.loads(msg.payload)
        t0 = sent_at.pop(doc.get("request_id", ""), None)
        if t0 is not None and doc.get("ok"):
            rtts.append(time.perf_counter() - t0)
            received[0] += 1
            done.release()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_socket_open = lambda c, u, sock: sock.setsockopt(socket.IPPROTO_TCP,
                                                               socket.TCP_NODELAY, 1)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(host, int(port))
    client.loop_start()
    client.subscribe(reply_to, qos=1)
    subscribed.wait(10)
    peak = [proc.rss()]

    def send() -> None:
        rid = uuid.uuid4().hex
        sent_at[rid] = time.perf_counter()
        client.publish(request_topic, json.dumps({
            "schema": "edgekit.predict-request/1", "request_id": rid, "reply_to": reply_to,
            "inputs": inputs, "outputs": "none"}), qos=1)

    for _ in range(window):
        send()
    t_start = time.perf_counter()
    stop = time.monotonic() + seconds
    last_sample = 0.0
    while time.monotonic() < stop:
        if done.acquire(timeout=5):
            send()
        if time.monotonic() - last_sample > 0.2:
            peak.append(proc.rss())
            last_sample = time.monotonic()
    elapsed = time.perf_counter() - t_start
    client.loop_stop()
    client.disconnect()
    return {"rps": received[0] / elapsed, "window": window, "rss_peak": max(peak),
            "rtt_ms_p50": float(np.median(rtts) * 1e3) if rtts else None}


# --------------------------------------------------------------------------- install size


_INSTALLER = {"pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils"}


def install_size(work: Path) -> dict[str, Any]:
    venv = work / "size-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = venv / "bin" / "pip"
    done = subprocess.run([str(pip), "install", "--quiet", f"{ROOT}[agent]"], capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"pip install edgekit-fleet[agent] failed:\n{done.stderr[-3000:]}")
    site = next((venv / "lib").glob("python3*/site-packages"))
    sizes: dict[str, int] = {}
    for entry in site.iterdir():
        if entry.name.split("-")[0] in _INSTALLER or entry.suffix == ".pth":
            continue  # the venv's own installer, not the agent's
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) \
            if entry.is_dir() else entry.stat().st_size
        key = entry.name.split("-")[0].split(".")[0].lower()
        sizes[key] = sizes.get(key, 0) + size
    total = sum(sizes.values())
    top = dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:8])
    shutil.rmtree(venv, ignore_errors=True)
    return {"total_mb": total / 1e6, "largest_mb": {k: v / 1e6 for k, v in top.items()}}
