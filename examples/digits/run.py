"""Train the digits CNN in PyTorch and in Keras, convert each to every target and
quantization mode, and print one table of size, latency and accuracy.

Run from the repository root::

    python -m examples.digits.run [--out DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from converters import ConvertOptions, convert, supported_pairs
from edgekit.errors import EdgekitError
from edgekit.host.cli._table import format_table

from .data import load_digits_split, to_channels_last, write_npz_files
from .models import keras_cnn, torch_cnn, train_keras, train_torch


def build_sources(out: Path) -> dict[str, tuple[Path, dict[str, Path]]]:
    """Train both models and save them; return source path and data files per framework."""
    import keras
    import torch

    split = load_digits_split()
    x, y = split["train"]
    print("training the PyTorch CNN ...", file=sys.stderr)
    tmodel = train_torch(torch_cnn(), x, y)
    pt2 = out / "digits_torch.pt2"
    example = (torch.from_numpy(split["eval"][0][:2]),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(tmodel, example, dynamic_shapes=({0: batch},))
    torch.export.save(program, pt2)

    print("training the Keras CNN ...", file=sys.stderr)
    kmodel = train_keras(keras_cnn(), to_channels_last(x), y)
    kpath = out / "digits_keras.keras"
    keras.saving.save_model(kmodel, kpath)
    return {
        "pytorch": (pt2, write_npz_files(out / "data")),
        "keras": (kpath, write_npz_files(out / "data", channels_last=True)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/digits"),
                        help="folder for models, data and packages (default: out/digits)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sources = build_sources(args.out)
    rows = []
    for framework, target, mode in supported_pairs():
        if framework not in sources:
            continue
        src, data = sources[framework]
        variants = [True, False] if mode in ("dynamic", "int8") and target == "onnx" else [True]
        for per_channel in variants:
            label = f"{mode}{'' if per_channel or mode not in ('dynamic', 'int8') else '/tensor'}"
            out = args.out / f"{framework}-{target}-{label.replace('/', '-')}.edgepkg"
            print(f"converting {framework} -> {target} {label} ...", file=sys.stderr)
            opts = ConvertOptions(target=target, quantize=mode, per_channel=per_channel,
                                  name=f"digits-{framework}", threads=args.threads,
                                  version="1.0.0")
            t0 = time.perf_counter()
            try:
                res = convert(src, opts, output=out, calibration=data["calib"],
                              eval_data=data["eval"])
            except EdgekitError as exc:
                rows.append({"source": framework, "target": target, "mode": label,
                             "error": exc.message})
                continue
            rep = res.report
            rows.append({
                "source": framework, "target": target, "mode": label,
                "exporter": res.manifest.recipe.get("exporter"),
                "size_kib": rep["size"]["artifact_model_bytes"] / 1024,
                "p50_ms": rep["latency"]["artifact"]["p50_ms"],
                "source_p50_ms": rep["latency"]["source"]["p50_ms"],
                "accuracy": rep["accuracy"]["artifact"]["accuracy"],
                "drop_points": rep["accuracy"]["drop"] * 100,
                "top1_agreement": rep["parity"]["top1_agreement"],
                "convert_s": time.perf_counter() - t0,
            })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    headers = ["source", "target", "mode", "exporter", "size KiB", "p50 ms", "source p50 ms",
               "accuracy", "drop pts", "top-1 agree"]
    table = [[r["source"], r["target"], r["mode"], r.get("exporter"), r.get("size_kib"),
              r.get("p50_ms"), r.get("source_p50_ms"), r.get("accuracy"), r.get("drop_points"),
              r.get("top1_agreement")] for r in rows]
    print(format_table(headers, table))
    for r in rows:
        if "error" in r:
            print(f"failed: {r['source']} -> {r['target']} {r['mode']}: {r['error']}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
