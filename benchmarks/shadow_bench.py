"""What shadow evaluation costs the serving path: p95 latency of ``Agent.predict`` with and
without a candidate running in shadow, in the same run.

For each model an in-process agent serves the package (one runtime thread). Requests go
one after the other from the caller, in alternating blocks: plain, then with a
:class:`device_agent._shadow.ShadowRunner` attached (the candidate is a second session of the
same package, so the shadow's work equals the serving model's; sample 0.2, CPU share 0.25,
as a shadow deploy uses by default), and so on. The table gives p50/p95 per mode, the p95
ratio (shadow / plain; the goal is at most 1.10) and what the shadow compared and dropped.

Models: ``digits`` (the digits CNN, trained briefly and converted to ONNX fp32; ``--quick``
uses the tests' ridge classifier instead, no torch) and ``minilm`` (the bundled
all-MiniLM-L6-v2 sentence encoder converted to ONNX fp32, sequence length 128).

Run from the repository root::

    python benchmarks/shadow_bench.py [--models digits,minilm] [--requests 3000] [--blocks 10]
    python benchmarks/shadow_bench.py --quick   # ridge digits only, 600 requests
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

SAMPLE = 0.2
CPU_SHARE = 0.25


def digits_package(out: Path, quick: bool) -> tuple[Path, list[dict[str, np.ndarray]]]:
    sys.path.insert(0, str(ROOT / "tests" / "agent"))
    from _digits import digits_data, write_digits_package

    if quick:
        x, _ = digits_data()
        path = write_digits_package(out / "digits-ridge.edgepkg", version="1.0.0")
        return path, [{"x": x[i:i + 1]} for i in range(1200, 1797)]
    from agent_bench import build_package

    from edgekit.host.demo.digits import load_digits_split

    x = load_digits_split()["eval"][0]
    return build_package(out), [{"x": x[i:i + 1]} for i in range(len(x))]


def minilm_package(out: Path) -> tuple[Path, list[dict[str, np.ndarray]]]:
    from _minilm import load_encoder, sentences, tokenize

    from converters import ConvertOptions, convert
    from edgekit.data import Dataset

    calib = Dataset(tokenize(sentences(16, seed=1)), None, "MiniLM calibration sentences")
    evald = Dataset(tokenize(sentences(8, seed=2)), None, "MiniLM evaluation sentences")
    path = out / "minilm.edgepkg"
    convert(load_encoder(), ConvertOptions(target="onnx", quantize="none", threads=1,
                                           latency_runs=3, task="embedding", name="minilm",
                                           version="1.0.0"),
            output=path, calibration=calib, eval_data=evald)
    tokens = tokenize(sentences(200, seed=3))
    return path, [{k: v[i:i + 1] for k, v in tokens.items()} for i in range(200)]


def measure(package: Path, inputs: list[dict[str, np.ndarray]], work: Path, requests: int,
            blocks: int) -> dict[str, Any]:
    from device_agent import Agent, load_config
    from device_agent._model import TrustPolicy, load_model
    from device_agent._shadow import ShadowRunner, attach

    agent = Agent(load_config(env={}, overrides={
        "model.dir": str(work / package.stem), "model.package": str(package),
        "model.allow_unsigned": True, "telemetry.interval_s": 0.0, "runtime.threads": 1}))
    try:
        serving = agent.model
        assert serving is not None
        candidate = load_model(package, TrustPolicy([], True), agent.slot.loader.options)
        for i in range(20):  # warm-up
            agent.predict(inputs[i % len(inputs)])
        times: dict[str, list[float]] = {"plain": [], "shadow": []}
        runner = ShadowRunner(candidate, serving, target=10**9, sample=SAMPLE,
                              cpu_share=CPU_SHARE, seed=0)
        per_block = max(1, requests // blocks)
        n = 0
        detach = None
        for block in range(blocks * 2):
            mode = "plain" if block % 2 == 0 else "shadow"
            if mode == "shadow":
                detach = attach(agent.predictor, runner)
            elif detach is not None:
                detach()
                detach = None
            for _ in range(per_block):
                t0 = time.perf_counter()
                agent.predict(inputs[n % len(inputs)])
                times[mode].append((time.perf_counter() - t0) * 1000.0)
                n += 1
        if detach is not None:
            detach()
        runner.close()
        report = runner.report("bench", "stopped")
    finally:
        agent.stop()
    out: dict[str, Any] = {"shadowed": report.requests, "dropped": report.dropped,
                           "offered": report.offered, "agreement": report.agreement,
                           "kind": report.kind}
    for mode, values in times.items():
        arr = np.asarray(values)
        out[mode] = {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
                     "count": len(values)}
    out["ratio_p95"] = out["shadow"]["p95"] / out["plain"]["p95"]
    return out


def print_table(name: str, r: dict[str, Any]) -> None:
    print(f"## {name}: serving latency of Agent.predict, batch 1, 1 thread; shadow sample"
          f" {SAMPLE:g}, CPU share {CPU_SHARE:g}")
    print(f"{'mode':<10}{'requests':>10}{'p50 ms':>10}{'p95 ms':>10}")
    for mode in ("plain", "shadow"):
        m = r[mode]
        print(f"{mode:<10}{m['count']:>10}{m['p50']:>10.3f}{m['p95']:>10.3f}")
    agreement = "n/a" if r["agreement"] is None else f"{r['agreement']:.4f}"
    print(f"p95 ratio (shadow / plain)  {r['ratio_p95']:.3f}x  (goal <= 1.10)")
    print(f"shadowed {r['shadowed']} of {r['offered']} offered, dropped {r['dropped']},"
          f" {r['kind']} agreement {agreement}")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--requests", type=int, default=3000, help="per mode and model")
    parser.add_argument("--blocks", type=int, default=10, help="alternations per mode")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    models = ["digits"] if args.quick else [m.strip() for m in args.models.split(",")]
    requests = 600 if args.quick else args.requests
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in models:
            if name == "digits":
                package, inputs = digits_package(work, args.quick)
            elif name == "minilm":
                package, inputs = minilm_package(work)
            else:
                parser.error(f"unknown model {name!r}")
            print_table(name, measure(package, inputs, work, requests, args.blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
