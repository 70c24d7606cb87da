"""How large a fleet the controller keeps up with, alone and with a second one sharing the load.

Simulated devices are lightweight publishers, not agents: a few processes, each publishing
the metrics of many devices over one MQTT connection, one message per device every 10 s
(0.1 Hz), QoS 1, the agent's payload (about 850 bytes). Everything runs against one
mosquitto on this machine, controllers as ``edgekit controller run`` processes.

Measured in one run:
  - bare: the rate at which a plain paho subscriber (its own process, QoS 1) receives a
    flood of metrics messages that the publishers send as fast as they can, measured again
    right before each configuration's flood (the machine's load moves between them);
  - flood: the rate at which a controller writes the same flood to its database, and its
    ratio to the bare subscriber's rate just before; with --repeat N, N rounds of bare then
    flood (fresh controller processes each round) and the medians;
  - fleet steps: fleets of growing size at 0.1 Hz for --seconds each; the ingest lag of a
    message is the time it was written to the database minus the time it was sent. A
    controller keeps up with a fleet when the 95th percentile lag is under 1 s and every
    message is stored. The largest such fleet is reported.

Configurations: one controller on SQLite, one on PostgreSQL, two sharing the fleet through
a shared subscription ($share/...) and one PostgreSQL database (PostgreSQL ones are skipped
when no server answers at 127.0.0.1:5432).

Run from the repository root::

    python benchmarks/controller_bench.py [--seconds 20] [--start 1000] [--max 64000]
                                          [--flood 20000] [--repeat 3] [--json results.json]
                                          [--quick]

``--quick`` (the test suite runs it) floods 2,000 messages and tries one fleet of 100
devices on SQLite only: it shows the script works, its numbers are not results.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

INTERVAL_S = 10.0  # 0.1 Hz per device
PUBLISHERS = 2
LAG_LIMIT_S = 1.0


# --------------------------------------------------------------------------- payloads


def payload_template() -> str:
    """A metrics payload as the agent sends it, with placeholders for the moving parts."""
    doc = {
        "schema": "edgekit.metrics/1", "device": "@DEVICE@", "fleet": "@FLEET@", "seq": 0,
        "ts": 0.0, "interval_s": INTERVAL_S,
        "model": {"name": "digits", "version": "1.0.0", "sha256": "ab" * 32,
                  "format": "onnx", "runtime": "onnxruntime"},
        "requests": {"total": 1200, "interval": 40, "errors_total": 0, "errors_interval": 0,
                     "by_channel": {"http": 40}, "errors_by_code": {}},
        "latency": {"count": 40, "mean_ms": 0.41, "p50_ms": 0.38, "p95_ms": 0.61,
                    "p99_ms": 0.9},
        "throughput_rps": 4.0,
        "system": {"cpu_percent": 3.1, "rss_bytes": 81234567, "memory_percent": 2.0,
                   "temperature_c": 48.5, "load1": 0.2},
        "predictions": {"count": 40, "histogram": {"digit-1": 20, "digit-7": 20},
                        "mean_confidence": 0.93},
        "quality": {"window": 500, "labels": 120, "accuracy": 0.95, "f1_macro": 0.94,
                    "confusion": None, "feedback_total": 480, "feedback_rejected": 0},
        "telemetry": {"queue_depth": 0, "dropped_total": 0},
    }
    text = json.dumps(doc, separators=(",", ":"))
    return text.replace('"seq":0', '"seq":@SEQ@').replace('"ts":0.0', '"ts":@TS@')


def publisher(port: int, fleet: str, devices: list[str], start: float, rounds: int,
              flood: bool, out: Any) -> None:
    """Publish the devices' metrics: paced at 0.1 Hz, or (``flood``) as fast as possible."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port, 60)
    client.loop_start()
    template = payload_template().replace("@FLEET@", fleet)
    sent, late = 0, 0.0
    n = len(devices)
    try:
        while time.time() < start:
            time.sleep(0.005)
        last = None
        for k in range(rounds):
            for i, device in enumerate(devices):
                if not flood:
                    due = start + k * INTERVAL_S + i * INTERVAL_S / n
                    wait = due - time.time()
                    if wait > 0:
                        time.sleep(wait)
                    else:
                        late = max(late, -wait)
                body = (template.replace("@DEVICE@", device).replace("@SEQ@", str(k + 1))
                        .replace("@TS@", repr(time.time())))
                last = client.publish(f"edgekit/v1/{fleet}/{device}/metrics", body, qos=1)
                sent += 1
        if last is not None:
            last.wait_for_publish(120)
    finally:
        client.disconnect()
        client.loop_stop()
    out.put({"sent": sent, "late_s": late})


def run_publishers(port: int, fleet: str, devices: int, rounds: int, *,
                   flood: bool) -> dict[str, Any]:
    """Start the publisher processes on a common start time; wait for them."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    names = [f"d{i:06d}" for i in range(devices)]
    start = time.time() + 3.0  # time for the processes to start and connect
    procs = [ctx.Process(target=publisher, args=(port, fleet, names[p::PUBLISHERS], start,
                                                 rounds, flood, out))
             for p in range(PUBLISHERS)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=rounds * INTERVAL_S + 600) for _ in procs]
    for proc in procs:
        proc.join(30)
    return {"sent": sum(r["sent"] for r in results), "start": start,
            "late_s": max(r["late_s"] for r in results)}


# --------------------------------------------------------------------------- bare subscriber


def bare_subscriber(port: int, fleet: str, expected: int, out: Any, ready: Any) -> None:
    """Count the fleet's metrics messages as a plain paho client; report the receive rate."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got = {"n": 0, "first": 0.0, "last": 0.0}
    done = threading.Event()

    def on_message(_c: Any, _u: Any, _msg: Any) -> None:
        now = time.time()
        got["n"] += 1
        got["first"] = got["first"] or now
        got["last"] = now
        if got["n"] >= expected:
            done.set()

    def on_connect(client: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not rc.is_failure:
            client.subscribe(f"edgekit/v1/{fleet}/+/metrics", qos=1)

    def on_subscribe(*_args: Any) -> None:
        ready.put(True)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-{uuid.uuid4().hex[:8]}")
    client.on_message = on_message
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.connect("127.0.0.1", port, 60)
    client.loop_start()
    done.wait(600)
    client.disconnect()
    client.loop_stop()
    out.put(dict(got))


def measure_bare(port: int, messages: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out, ready = ctx.Queue(), ctx.Queue()
    fleet = f"bare-{uuid.uuid4().hex[:6]}"
    proc = ctx.Process(target=bare_subscriber, args=(port, fleet, messages, out, ready))
    proc.start()
    ready.get(timeout=60)
    sent = run_publishers(port, fleet, messages // 2, 2, flood=True)
    got = out.get(timeout=900)
    proc.join(30)
    return {"messages": got["n"], "rate": got["n"] / max(got["last"] - sent["start"], 1e-9)}


# --------------------------------------------------------------------------- databases


def postgres_admin() -> tuple[Any, str] | None:
    try:
        import psycopg
    except ImportError:
        return None
    for user in ("postgres", "root"):
        try:
            return psycopg.connect(host="127.0.0.1", port=5432, user=user, dbname="postgres",
                                   connect_timeout=3, autocommit=True), user
        except psycopg.OperationalError:
            continue
    return None


@contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / f'bench-{uuid.uuid4().hex[:6]}.db'}"
        return
    found = postgres_admin()
    assert found is not None
    admin, user = found
    name = f"edgekit_bench_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{user}@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def lags(db_url: str, fleet: str) -> list[float]:
    """Written-to-the-database minus sent, per stored metrics message of the fleet."""
    from sqlalchemy import select

    from edgekit.host.db import Store
    from edgekit.host.db._schema import MetricRow

    with Store(db_url) as store, store.engine.connect() as conn:
        rows = conn.execute(select(MetricRow.ts, MetricRow.received)
                            .where(MetricRow.fleet == fleet)).all()
    return [(r.received - r.ts).total_seconds() for r in rows]


def stored_count(db_url: str, fleet: str) -> int:
    from sqlalchemy import func, select

    from edgekit.host.db import Store
    from edgekit.host.db._schema import MetricRow

    with Store(db_url) as store, store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(MetricRow)
                                .where(MetricRow.fleet == fleet)).scalar_one())


# --------------------------------------------------------------------------- controllers


class Controllers:
    """``count`` controller processes on one database, sharing the fleet when two."""

    def __init__(self, port: int, db_url: str, count: int, workdir: Path) -> None:
        from edgekit.host.controller import load_config, to_toml

        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.ids = [f"bench-{uuid.uuid4().hex[:6]}" for _ in range(count)]
        exe = Path(sys.executable).parent / "edgekit"
        command = [str(exe)] if exe.exists() else [sys.executable, "-c",
                                                   "from edgekit.host.cli import main; main()"]
        for cid in self.ids:
            cfg = load_config(overrides={
                "controller.id": cid, "mqtt.broker": f"mqtt://127.0.0.1:{port}",
                "database.url": db_url, "registry.store": str(workdir / "store"),
                "mqtt.share_group": "bench" if count > 1 else "",
                "ingest.workers": 1 if db_url.startswith("sqlite") else 2,
                "serve.mqtt": False, "controller.log_level": "warning"})
            path = workdir / f"{cid}.toml"
            path.write_text(to_toml(cfg))
            log = workdir / f"{cid}.log"
            self.logs.append(log)
            with open(log, "wb") as handle:
                self.procs.append(subprocess.Popen([*command, "controller", "run", "--config",
                                                    str(path)], stdout=handle,
                                                   stderr=subprocess.STDOUT, cwd=ROOT))
        self._wait_ready(port)

    def _wait_ready(self, port: int) -> None:
        """Until every controller's retained presence is on the broker."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        seen: set[str] = set()
        client = mqtt.Client(CallbackAPIVersion.VERSION2)
        client.on_message = lambda _c, _u, msg: seen.add(msg.topic.rsplit("/", 1)[-1]) \
            if msg.payload else None
        client.connect("127.0.0.1", port, 60)
        client.subscribe("edgekit/v1/_controllers/+", qos=1)
        client.loop_start()
        deadline = time.monotonic() + 60
        try:
            while not set(self.ids) <= seen:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise RuntimeError("a controller did not start: "
                                       + " | ".join(log.read_text()[-2000:] for log in self.logs))
                time.sleep(0.1)
        finally:
            client.disconnect()
            client.loop_stop()

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_stored(db_url: str, fleet: str, expected: int, settle_s: float) -> int:
    """The stored count once it reaches ``expected`` or stops growing for ``settle_s``."""
    last, since = -1, time.monotonic()
    while True:
        count = stored_count(db_url, fleet)
        if count >= expected:
            return count
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since > settle_s:
            return count
        time.sleep(0.25)


def flood(port: int, db_url: str, messages: int) -> dict[str, Any]:
    """The rate at which the running controllers write a flood to the database."""
    from sqlalchemy import func, select

    from edgekit.host.db import Store
    from edgekit.host.db._schema import MetricRow

    fleet = f"flood-{uuid.uuid4().hex[:6]}"
    sent = run_publishers(port, fleet, messages // 2, 2, flood=True)
    stored = wait_stored(db_url, fleet, sent["sent"], 15.0)
    with Store(db_url) as store, store.engine.connect() as conn:
        last = conn.execute(select(func.max(MetricRow.received))
                            .where(MetricRow.fleet == fleet)).scalar_one()
    elapsed = last.timestamp() - sent["start"]
    return {"messages": stored, "sent": sent["sent"], "rate": stored / max(elapsed, 1e-9)}


def fleet_step(port: int, db_url: str, devices: int, seconds: float) -> dict[str, Any]:
    fleet = f"fleet-{devices}-{uuid.uuid4().hex[:4]}"
    rounds = max(1, int(round(seconds / INTERVAL_S)))
    sent = run_publishers(port, fleet, devices, rounds, flood=False)
    stored = wait_stored(db_url, fleet, sent["sent"], 10.0)
    values = sorted(lags(db_url, fleet))
    p95 = values[int(0.95 * (len(values) - 1))] if values else float("inf")
    return {
        "devices": devices, "rate": devices / INTERVAL_S, "sent": sent["sent"],
        "stored": stored, "publisher_late_s": round(sent["late_s"], 3),
        "lag_p50_s": statistics.median(values) if values else None, "lag_p95_s": p95,
        "lag_max_s": values[-1] if values else None,
        # Publishers that fell more than a second behind their schedule did not offer the
        # nominal rate: such a step proves nothing either way.
        "paced": sent["late_s"] < 1.0,
        "ok": stored == sent["sent"] and p95 < LAG_LIMIT_S and sent["late_s"] < 1.0,
    }


def _verdict(step: dict[str, Any]) -> str:
    if step["ok"]:
        return "ok"
    if not step["paced"]:
        return f"publishers {step['publisher_late_s']:.1f} s behind schedule (saturated)"
    return "falls behind"


def run_config(name: str, port: int, db_kind: str, count: int, args: argparse.Namespace,
               workdir: Path) -> dict[str, Any]:
    """Floods (``--repeat`` rounds, each right after a bare paho measurement), then the
    fleet steps with the controllers of the last round."""
    print(f"\n== {name}", file=sys.stderr)
    rounds: list[dict[str, float]] = []
    errors = 0
    with database(db_kind, workdir) as db_url:
        for round_ in range(args.repeat):
            # Before the controllers start: they would take their share of the bare flood too.
            bare_rate = measure_bare(port, args.flood)["rate"]
            ctl = Controllers(port, db_url, count, workdir)
            try:
                fl = flood(port, db_url, args.flood)
                rounds.append({"bare_rate": bare_rate, "flood_rate": fl["rate"],
                               "ratio": fl["rate"] / bare_rate})
                print(f"   round {round_ + 1}: bare paho {bare_rate:.0f} msg/s, flood"
                      f" {fl['rate']:.0f} msg/s ({fl['messages']}/{fl['sent']} stored),"
                      f" ratio {fl['rate'] / bare_rate:.2f}", file=sys.stderr)
                steps = fleet_steps(port, db_url, args) if round_ + 1 == args.repeat else []
            finally:
                ctl.stop()
                errors += sum(log.read_text(errors="replace").count(" ERROR ")
                              for log in ctl.logs)
    passed = [s["devices"] for s in steps if s["ok"]]
    return {"name": name, "controllers": count, "database": db_kind, "rounds": rounds,
            "bare_rate": statistics.median(r["bare_rate"] for r in rounds),
            "flood_rate": statistics.median(r["flood_rate"] for r in rounds),
            "ratio_to_bare": statistics.median(r["ratio"] for r in rounds),
            "controller_errors": errors,
            "max_devices": max(passed) if passed else 0,
            "max_rate": (max(passed) / INTERVAL_S) if passed else 0.0, "steps": steps}


def fleet_steps(port: int, db_url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fleets doubling from ``--start`` until one falls behind, then ``--refine`` bisection
    steps between the last size kept up with and the first not."""
    steps: list[dict[str, Any]] = []

    def step_at(devices: int) -> bool:
        step = fleet_step(port, db_url, devices, args.seconds)
        steps.append(step)
        print(f"   {devices:6d} devices: lag p50 {step['lag_p50_s']:.3f} s, p95"
              f" {step['lag_p95_s']:.3f} s, stored {step['stored']}/{step['sent']}"
              f" -> {_verdict(step)}", file=sys.stderr)
        return bool(step["ok"])

    devices, good, bad = args.start, 0, 0
    while devices <= args.max:
        if not step_at(devices):
            bad = devices
            break
        good, devices = devices, devices * 2
    for _ in range(args.refine):
        if not bad or bad - good <= args.start // 2:
            break
        middle = (good + bad) // 2 // 500 * 500
        if step_at(middle):
            good = middle
        else:
            bad = middle
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="Length of each fleet step (each device sends every 10 s).")
    parser.add_argument("--start", type=int, default=1000, help="First fleet size.")
    parser.add_argument("--max", type=int, default=64000, help="Largest fleet size tried.")
    parser.add_argument("--flood", type=int, default=20000, help="Messages in each flood.")
    parser.add_argument("--refine", type=int, default=2,
                        help="Steps of bisection after the first fleet size that fails.")
    parser.add_argument("--configs", default="sqlite,postgresql,shared",
                        help="Which of sqlite, postgresql, shared to run.")
    parser.add_argument("--repeat", type=int, default=1,
                        help="Flood rounds per configuration, each with its own bare paho"
                             " measurement right before it; medians are reported.")
    parser.add_argument("--json", dest="json_path", help="Also write the results here.")
    parser.add_argument("--quick", action="store_true",
                        help="A smoke run in well under a minute (SQLite, one small fleet).")
    args = parser.parse_args()
    if args.quick:
        args.flood, args.start, args.max, args.refine, args.repeat = 2000, 100, 100, 0, 1
        args.seconds = INTERVAL_S
        if "--configs" not in sys.argv:
            args.configs = "sqlite"
    from mqtt_broker import MqttBroker

    from edgekit.host.cli._table import format_table

    have_pg = postgres_admin() is not None
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="controller-bench-"))
    try:
        with MqttBroker(workdir / "broker", kind="mosquitto") as broker:
            print(f"mosquitto on port {broker.port}", file=sys.stderr)
            results = []
            plan = [("1 controller, SQLite", "sqlite", 1, "sqlite"),
                    ("1 controller, PostgreSQL", "postgresql", 1, "postgresql"),
                    ("2 controllers, PostgreSQL, $share", "postgresql", 2, "shared")]
            for name, db_kind, count, key in plan:
                if key not in wanted:
                    continue
                if db_kind == "postgresql" and not have_pg:
                    print(f"skipping {name}: no PostgreSQL at 127.0.0.1:5432", file=sys.stderr)
                    continue
                results.append(run_config(name, broker.port, db_kind, count, args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [[r["name"], r["max_devices"], r["max_rate"], round(r["flood_rate"]),
             round(r["bare_rate"]), f"{r['ratio_to_bare']:.2f}"] for r in results]
    print()
    print(format_table(["CONFIGURATION", "MAX FLEET @0.1HZ", "MSG/S", "FLOOD MSG/S",
                        "BARE PAHO MSG/S", "RATIO"], rows))
    print(f"\n(ingest lag p95 < {LAG_LIMIT_S:g} s and every message stored; {os.cpu_count()}"
          f" CPUs shared by broker, publishers and controllers"
          + ("; --quick: a smoke run, not results)" if args.quick else ")"))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "cpus": os.cpu_count(), "interval_s": INTERVAL_S, "lag_limit_s": LAG_LIMIT_S,
            "configs": results}, indent=2))


if __name__ == "__main__":
    main()
