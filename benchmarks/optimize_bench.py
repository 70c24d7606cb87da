"""``optimize`` on the digits CNN and on the bundled MiniLM: the full candidate tables.

For each model, one ``optimize`` run converts every candidate, measures it (metric, latency
with the same thread count in interleaved rounds, size) and keeps the best within the
budget; the table, the choice and its reason are printed and saved. For MiniLM the metric
is the cosine of the sentence embeddings against PyTorch, and the chosen artifact's latency
is also given as a ratio to PyTorch eager measured in the same run.

Goal checked here: on MiniLM, ``--metric cosine --max-drop 0.01`` lands at or below 0.6x
PyTorch eager latency.

Run from the repository root::

    python benchmarks/optimize_bench.py [--models digits,minilm] [--threads 1] [--out DIR]
    python benchmarks/optimize_bench.py --quick   # digits, two ONNX candidates: a smoke run

``--quick`` (what the test suite runs) trains the CNN briefly and tries two ONNX candidates
with 5 timed runs each; it prints the same table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

MINILM_GOAL = 0.6


def _digits(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from converters.compress import optimize
    from examples.digits.data import load_digits_split, write_npz_files
    from examples.digits.models import torch_cnn, train_torch

    data = write_npz_files(out / "data")
    split = load_digits_split()
    model = train_torch(torch_cnn(), *split["train"], epochs=args.epochs)
    pt2 = out / "digits_cnn.pt2"
    example = (torch.from_numpy(split["eval"][0][:2]),)
    program = torch.export.export(model, example,
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, pt2)
    return _run(optimize, pt2, out / "digits_best.edgepkg", args, eval_data=data["eval"],
                calibration=data["calib"], metric="accuracy", targets=tuple(args.digits_targets))


def _minilm(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from _minilm import load_encoder, sentences, tokenize

    from converters.compress import optimize
    from edgekit.data import Dataset

    encoder = load_encoder()
    eval_set = Dataset(tokenize(sentences(args.minilm_eval, seed=1)), None, "minilm-eval")
    calib = Dataset(tokenize(sentences(args.minilm_calib, seed=2)), None, "minilm-calib")
    return _run(optimize, encoder, out / "minilm_best.edgepkg", args, eval_data=eval_set,
                calibration=calib, metric="cosine", targets=tuple(args.minilm_targets))


def _run(optimize: Any, source: Any, output: Path, args: argparse.Namespace,
         **kwargs: Any) -> dict[str, Any]:
    from converters import ConvertOptions

    t0 = time.perf_counter()
    result = optimize(source, output=output, max_drop=args.max_drop,
                      options=ConvertOptions(threads=args.threads),
                      latency_runs=args.runs, candidates=args.candidates,
                      max_probes=args.max_probes,
                      progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True), **kwargs)
    doc = result.to_dict()
    doc["table"] = result.table
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per candidate")
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--candidates", help="comma-separated subset (default: all)")
    parser.add_argument("--max-probes", type=int, default=24,
                        help="sensitivity probes when no int8 candidate meets the budget")
    parser.add_argument("--minilm-eval", type=int, default=64, help="sentences to score on")
    parser.add_argument("--minilm-calib", type=int, default=64, help="calibration sentences")
    parser.add_argument("--minilm-targets", default="onnx", help="onnx, or onnx,tflite")
    parser.add_argument("--digits-targets", default="onnx,tflite", help="onnx, or onnx,tflite")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of the CNN")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "optimize_bench")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: digits only, two ONNX candidates, 5 runs, short training")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.runs, args.epochs, args.digits_targets = "digits", 5, 3, "onnx"
        args.candidates = args.candidates or "onnx:fp32,onnx:dynamic-per-tensor"
    args.candidates = args.candidates.split(",") if args.candidates else None
    args.minilm_targets = args.minilm_targets.split(",")
    args.digits_targets = args.digits_targets.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    runs = {"digits": _digits, "minilm": _minilm}
    results: dict[str, Any] = {}
    for name in args.models.split(","):
        print(f"== optimize on {name}", file=sys.stderr, flush=True)
        results[name] = runs[name](args.out, args)
        print(f"\n## {name} (threads {args.threads}, max drop {args.max_drop:g},"
              f" {results[name]['wall_s']} s)\n")
        print(results[name]["table"])
        print(f"\nchosen: {results[name]['chosen']}\nreason: {results[name]['reason']}")
    if "minilm" in results:
        doc = results["minilm"]
        chosen = next(r for r in doc["candidates"] if r["name"] == doc["chosen"])
        ratio = chosen["latency_ratio"]
        print(f"\nMiniLM: {doc['chosen']} at {ratio:.2f}x PyTorch eager latency"
              f" (p50 {chosen['latency_p50_ms']:.2f} ms vs {doc['source']['latency_p50_ms']:.2f}"
              f" ms), embedding cosine {chosen['metric']:.5f};"
              f" goal <= {MINILM_GOAL}x: {'met' if ratio <= MINILM_GOAL else 'NOT met'}")
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.out / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
