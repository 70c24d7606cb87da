"""The device agent's costs, with the digits model, in one run.

Measured:
  - overhead: median batch-1 latency of the raw onnxruntime call, edgekit's runtime Session,
    and Agent.predict (interleaved rounds, so load on a shared machine hits all three alike);
    goals: Agent.predict <= 1.15x the raw call at batch 1, <= 1.02x at batch 32;
  - p99 of Agent.predict with telemetry on (MQTT connected, metrics every second) and off,
    each in its own process, alternated; goal: within 5%;
  - HTTP round trip (JSON and .npy bodies, keep-alive) and requests per second over HTTP
    and over MQTT (request/response through a real mosquitto);
  - the agent process's RSS at idle and under load beside onnxruntime's own floor (a bare
    process that imports onnxruntime and loads the same model), and the time from starting
    the process to the first answered HTTP request;
  - with --install-size: the installed size of ``edgekit-fleet[agent]`` in a fresh venv.

The digits model is the project's digits CNN (examples/digits), trained for a few epochs
and converted to ONNX fp32 with the converter; ``--package`` uses an existing package.

Run from the repository root::

    python benchmarks/agent_bench.py [--package PKG] [--seconds 5] [--install-size]
                                     [--json results.json] [--quick]
    python benchmarks/agent_bench.py --package PKG --compare-with OTHER_CHECKOUT [--repeats 5]

``--compare-with`` measures only the overhead and the HTTP requests per second, of this
checkout's agent and of another checkout's (an earlier commit, say), each in its own
processes, alternated ``--repeats`` times, and prints both side by side with their medians.

``--quick`` (the test suite runs it) uses the tests' ridge digits model (no training) and
short runs: it shows the script works, its numbers are not results.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _agent_cases import (  # noqa: E402 (after the path set-up)
    AgentProc,
    build_package,
    http_numbers,
    install_size,
    mqtt_rps,
    overhead,
    p99_worker,
    post,
    quick_package,
    rss_floor,
    rss_floor_worker,
    sample_inputs,
    startup_time,
    telemetry_p99,
)

# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, help="a digits .edgepkg (default: build one)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load run")
    parser.add_argument("--install-size", action="store_true",
                        help="also install edgekit-fleet[agent] into a fresh venv (slow)")
    parser.add_argument("--json", type=Path, help="write the numbers to this file")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in well under a minute (tiny model, short runs)")
    parser.add_argument("--compare-with", type=Path, metavar="CHECKOUT",
                        help="only the overhead and HTTP requests/s, side by side with another"
                        " checkout's agent")
    parser.add_argument("--repeats", type=int, default=5,
                        help="processes per checkout with --compare-with")
    parser.add_argument("--overhead-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--p99-worker", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--rss-floor-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.p99_worker:
        p99_worker(args.package, args.work, args.p99_worker, args.seconds, args.broker)
        return 0
    if args.rss_floor_worker:
        rss_floor_worker(args.package)
        return 0
    if args.overhead_worker:
        overhead_worker(args.overhead_worker, args.package, args.quick)
        return 0
    if args.quick:
        args.seconds = min(args.seconds, 1.0)
    if args.compare_with:
        return compare(args)

    from mqtt_broker import MqttBroker

    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        work = Path(tmp)
        package = args.package or (quick_package(work) if args.quick else build_package(work))
        results: dict[str, Any] = {"package": str(package), "cpu_count": os.cpu_count(),
                                   "python": sys.version.split()[0], "quick": args.quick}
        rounds = (3, 50) if args.quick else (30, 300)
        print("overhead ...", file=sys.stderr)
        results["overhead"] = overhead(package, work, batch=1, rounds=rounds[0],
                                       per_round=rounds[1])
        results["overhead_batch32"] = overhead(package, work, batch=32, rounds=rounds[0],
                                               per_round=rounds[1] // 3)
        results["rss_floor_mb"] = rss_floor(package)
        with MqttBroker(work / "broker") as broker:
            print("p99 with telemetry on and off ...", file=sys.stderr)
            results["telemetry_p99"] = telemetry_p99(package, work, args.seconds, broker.url,
                                                     repeats=1 if args.quick else 5)
            print("start-up ...", file=sys.stderr)
            results["startup_s"] = startup_time(package, work, broker.url,
                                                repeats=1 if args.quick else 3)
            results.update(process_numbers(package, work, broker.url, args.seconds, args.quick))
        if args.install_size:
            print("installing edgekit-fleet[agent] into a fresh venv ...", file=sys.stderr)
            results["install"] = install_size(work)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def wait_answering(proc: AgentProc, x: Any) -> None:
    """Until the agent process answers an HTTP request."""
    body = json.dumps({"inputs": {"x": x[:1].tolist()}}).encode()
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=5)
            post(c, "/predict", body, "application/json")
            c.close()
            return
        except (OSError, RuntimeError):
            if proc.proc.poll() is not None:
                raise RuntimeError("the agent process exited") from None
            time.sleep(0.05)


def process_numbers(package: Path, work: Path, broker_url: str, seconds: float,
                    quick: bool) -> dict[str, Any]:
    """RSS, HTTP and MQTT numbers of one agent process under load."""
    x = sample_inputs(package)
    results: dict[str, Any] = {}
    proc = AgentProc(package, work, broker_url, "load")
    try:
        wait_answering(proc, x)
        time.sleep(0.5 if quick else 2.0)
        results["rss_idle_mb"] = proc.rss() / 1e6
        print("HTTP ...", file=sys.stderr)
        results["http"] = http_numbers(proc, x, seconds, round_trips=50 if quick else 500)
        print("MQTT ...", file=sys.stderr)
        results["mqtt"] = mqtt_rps(proc, broker_url, x, seconds)
        results["rss_load_mb"] = max(results["http"]["rss_peak"],
                                     results["mqtt"]["rss_peak"]) / 1e6
    finally:
        proc.stop()
    return results


def overhead_worker(checkout: Path, package: Path, quick: bool) -> None:
    """Run in a child process: the overhead at batch 1 and 32 of ``checkout``'s agent."""
    sys.path.insert(0, str(checkout))  # its device_agent and edgekit, not this checkout's
    import device_agent

    rounds = (3, 50) if quick else (30, 300)
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        work = Path(tmp)
        out = {"agent": device_agent.__file__,
               "batch1": overhead(package, work, 1, rounds[0], rounds[1]),
               "batch32": overhead(package, work, 32, rounds[0], rounds[1] // 3)}
    print(json.dumps(out))


def compare(args: argparse.Namespace) -> int:
    """This checkout's overhead and HTTP requests/s beside ``--compare-with``'s, alternated
    in fresh processes."""
    from mqtt_broker import MqttBroker

    trees = {"this checkout": ROOT, "compared": args.compare_with.resolve()}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
    rps: dict[str, list[float]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        work = Path(tmp)
        package = args.package or (quick_package(work) if args.quick else build_package(work))
        x = sample_inputs(package)
        with MqttBroker(work / "broker") as broker:
            for i in range(args.repeats):
                for name in (list(trees) if i % 2 == 0 else list(trees)[::-1]):
                    cmd = [sys.executable, __file__, "--overhead-worker", str(trees[name]),
                           "--package", str(package)] + (["--quick"] if args.quick else [])
                    done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                          cwd=trees[name], timeout=1800)
                    runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    proc = AgentProc(package, work, broker.url, f"cmp-{i}-{len(rps[name])}"
                                     f"-{'a' if trees[name] == ROOT else 'b'}", trees[name])
                    try:
                        wait_answering(proc, x)
                        rps[name].append(http_numbers(proc, x, args.seconds,
                                                      round_trips=20)["rps"])
                    finally:
                        proc.stop()
    print(f"Agent.predict / raw onnxruntime call, and HTTP requests/s (4 clients),"
          f" {args.repeats} processes each, alternated ({os.cpu_count()} CPUs)")
    for name, rs in runs.items():
        for batch in ("batch1", "batch32"):
            ratios = [r[batch]["ratio_vs_raw"] for r in rs]
            raw = statistics.median(r[batch]["median_us"]["raw onnxruntime"] for r in rs)
            agent = statistics.median(r[batch]["median_us"]["Agent.predict"] for r in rs)
            print(f"  {name:<14} {batch:<8} median {statistics.median(ratios):.3f}x"
                  f" (raw {raw:.1f} us, Agent.predict {agent:.1f} us; runs:"
                  f" {' '.join(f'{r:.3f}' for r in ratios)})")
        print(f"  {name:<14} HTTP     median {statistics.median(rps[name]):.0f} requests/s"
              f" (runs: {' '.join(f'{r:.0f}' for r in rps[name])})")
        print(f"  {name:<14} agent    {rs[0]['agent']}")
    if args.json:
        args.json.write_text(json.dumps({"overhead": runs, "http_rps": rps}, indent=2))
    return 0


def print_table(r: dict[str, Any]) -> None:
    o = r["overhead"]
    o32 = r["overhead_batch32"]
    t = r["telemetry_p99"]
    rows = [
        ("raw onnxruntime, batch 1 (median)", f"{o['median_us']['raw onnxruntime']:.1f} us"),
        ("edgekit Session.run (median)", f"{o['median_us']['edgekit Session.run']:.1f} us"),
        ("Agent.predict (median)", f"{o['median_us']['Agent.predict']:.1f} us"),
        ("Agent.predict / raw call (goal <= 1.15)", f"{o['ratio_vs_raw']:.3f}x"
                                                     f" (+{o['overhead_us']:.1f} us)"),
        ("Agent.predict / Session.run", f"{o['ratio_vs_session']:.3f}x"),
        ("batch 32: raw / Agent.predict (median)", f"{o32['median_us']['raw onnxruntime']:.1f}"
                                                   f" / {o32['median_us']['Agent.predict']:.1f} us"
                                                   f" ({o32['ratio_vs_raw']:.3f}x,"
                                                   " goal <= 1.02)"),
        ("p99 telemetry off / on", f"{t['p99_us']['off']:.1f} / {t['p99_us']['on']:.1f} us"),
        ("p99 on / off (goal <= 1.05)", f"{t['ratio']:.3f}x"),
        ("HTTP round trip JSON p50 / p99", f"{r['http']['rtt_ms']['json']['p50']:.2f} /"
                                           f" {r['http']['rtt_ms']['json']['p99']:.2f} ms"),
        ("HTTP round trip .npy p50 / p99", f"{r['http']['rtt_ms']['npy']['p50']:.2f} /"
                                           f" {r['http']['rtt_ms']['npy']['p99']:.2f} ms"),
        (f"HTTP requests/s ({r['http']['clients']} clients)", f"{r['http']['rps']:.0f}"),
        (f"MQTT requests/s ({r['mqtt']['window']} in flight)", f"{r['mqtt']['rps']:.0f}"),
        ("agent RSS idle / under load", f"{r['rss_idle_mb']:.0f} / {r['rss_load_mb']:.0f} MB"),
        ("onnxruntime alone with the model (RSS floor)", f"{r['rss_floor_mb']:.0f} MB"),
        ("agent RSS idle - floor (goal <= 15)",
         f"{r['rss_idle_mb'] - r['rss_floor_mb']:.0f} MB"),
        ("start-up to first HTTP answer", f"{r['startup_s']:.2f} s"),
    ]
    if "install" in r:
        rows.append(("edgekit-fleet[agent] installed size", f"{r['install']['total_mb']:.0f} MB"))
    width = max(len(k) for k, _ in rows)
    quick = ", --quick: a smoke run, not results" if r["quick"] else ""
    print(f"agent benchmark ({r['cpu_count']} CPUs, Python {r['python']}{quick})")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if "install" in r:
        largest = ", ".join(f"{k} {v:.0f}" for k, v in r["install"]["largest_mb"].items())
        print(f"  largest installed (MB): {largest}")


if __name__ == "__main__":
    sys.exit(main())
