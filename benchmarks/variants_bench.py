"""The device's choice among a package's variants: what it measures, how stable the choice
is, and what measuring costs at load time.

A model is converted once into a package of variants (``converters.convert_variants``) and
once into a plain package of its float ONNX artifact. The agent's ``load_model`` then loads
the package of variants ``--repeats`` times; each load measures every (variant, provider)
candidate and picks the fastest eligible one. For each candidate the table gives the median
of its measured p50 over the loads, the ratio to the float ONNX candidate measured in the
same loads (the baseline), and how often it was chosen. The last lines compare the time of a
load of the package of variants with a load of the plain package, measured in turns.

Run from the repository root::

    python benchmarks/variants_bench.py [--model digits|minilm] [--repeats 10] [--threads 1]
    python benchmarks/variants_bench.py --quick   # digits, short training, 3 loads
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

VARIANTS = {"digits": [("onnx", "none"), ("onnx", "int8"), ("onnx", "dynamic"),
                       ("onnx", "fp16")],
            "minilm": [("onnx", "none"), ("onnx", "dynamic"), ("onnx", "fp16")]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(VARIANTS), default="digits")
    parser.add_argument("--repeats", type=int, default=10, help="loads of the package")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: digits, 3 loads")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.repeats = "digits", 3
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from convert_bench import digits_subject, minilm_subject

    from converters import ConvertOptions, convert, convert_variants
    from device_agent import TrustPolicy, load_model
    from edgekit.runtimes import RuntimeOptions

    subject = (digits_subject(epochs=3 if args.quick else 15) if args.model == "digits"
               else minilm_subject())
    opts = ConvertOptions(name=args.model, version="1.0.0", latency_runs=5,
                          threads=args.threads, exporter="torchscript",
                          task="classification" if subject.classifier else "embedding")
    trust = TrustPolicy(allow_unsigned=True)
    runtime = RuntimeOptions(threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="edgekit-variants-") as tmp:
        package, plain = Path(tmp) / "variants.edgepkg", Path(tmp) / "plain.edgepkg"
        convert_variants(subject.module, VARIANTS[args.model], opts, output=package,
                         calibration=subject.calibration, eval_data=subject.eval)
        convert(subject.module, opts, output=plain, calibration=subject.calibration,
                eval_data=subject.eval)
        load_s: dict[str, list[float]] = {"variants": [], "plain": []}
        p50s: dict[str, list[float]] = {}
        ratios: dict[str, list[float]] = {}
        chosen: Counter[str] = Counter()
        dropped: dict[str, str] = {}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model = load_model(package, trust, runtime)
            load_s["variants"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            load_model(plain, trust, runtime)
            load_s["plain"].append(time.perf_counter() - t0)
            assert model.variant is not None
            chosen[_key(model.variant.id, model.variant.provider)] += 1
            base = next(c.p50_ms for c in model.variant.candidates
                        if c.variant == "onnx-none" and c.provider == "CPUExecutionProvider")
            for c in model.variant.candidates:
                if not c.eligible:
                    dropped[_key(c.variant, c.provider)] = c.reason
                if c.p50_ms is not None and base:
                    p50s.setdefault(_key(c.variant, c.provider), []).append(c.p50_ms)
                    ratios.setdefault(_key(c.variant, c.provider), []).append(c.p50_ms / base)
    print(f"## {args.model}: {args.repeats} loads, {args.threads} thread(s), batch 1")
    print(f"{'candidate':<44} {'p50 ms':>9} {'vs onnx-none':>13} {'chosen':>7}")
    for key in p50s:
        print(f"{key:<44} {statistics.median(p50s[key]):>9.4f}"
              f" {statistics.median(ratios[key]):>12.2f}x {chosen[key]:>4}/{args.repeats}")
    for key, reason in dropped.items():
        print(f"not eligible: {key}: {reason}")
    variants_ms = statistics.median(load_s["variants"]) * 1000
    plain_ms = statistics.median(load_s["plain"]) * 1000
    print(f"load of the package of variants   {variants_ms:.1f} ms")
    print(f"load of the plain package          {plain_ms:.1f} ms")
    print(f"load ratio (variants / plain)      {variants_ms / plain_ms:.2f}x")
    return 0


def _key(variant: str, provider: str | None) -> str:
    return f"{variant} on {provider}" if provider else variant


if __name__ == "__main__":
    sys.exit(main())
