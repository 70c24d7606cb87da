"""The text example's numbers: MiniLM intent classifier, from PyTorch eager to the int8
student, with the head-only update's delta.

Variants (each an encoder: token ids -> sentence embedding; the intent head is applied to
its embeddings for accuracy and F1):

- PyTorch eager fp32: transformers' default attention, the baseline of every ratio, fed
  the sentence padded to ``--seq-len`` like every other variant;
- PyTorch eager fp32, unpadded: the same, fed only the sentence's own tokens (what a
  PyTorch user who does not pad a single sentence runs);
- ONNX fp32: ``edgekit convert``, no quantization (its graph trims the padding after the
  last position the attention mask keeps: recipe ``padding_trim``);
- ONNX fp32 fused: the untrimmed graph through the int8 recipe's fusion and CPU rewrites
  (``converters.targets._onnx_quant.fuse_transformer``), then trimmed, not quantized;
- ONNX int8 optimized: the transformer fused by onnxruntime's optimizer and rewritten for its
  CPU kernels, the uneven inputs of the products after a layer normalization scaled
  SmoothQuant-style, the outlier input channels left split off in float, dynamic int8 per
  channel, the float fallback keeping every calibration sentence at cosine >=
  ``--floor``, the padding trimmed;
- ONNX int8, padding kept: the same recipe with ``trim_padding`` off (``--keep-padding``):
  every variant before the trimming computed all ``--seq-len`` positions;
- student int8: ``--student-layers`` of the teacher's layers, distilled, then as above.

Latency: batch 1, one thread, all variants interleaved run by run in each of ``--repeats``
rounds; the table gives the median over rounds of each round's p50, and the ratio to eager
measured in the same round (median over rounds). Cosine: per held-out sentence, against
PyTorch's embedding; min and mean. The head retrain row converts the classifier (encoder +
head) twice with the same recipe, before and after retraining only the head on two new
intents, and gives the full package bytes and the delta (``examples.text.run.delta_bytes``).

Goals checked: int8 optimized at or below 0.25x eager latency, with min cosine >= 0.99;
the ratio to unpadded eager is printed beside it.

Run from the repository root::

    python benchmarks/text_bench.py [--repeats 3] [--runs 30] [--seq-len 128]
    python benchmarks/text_bench.py --quick   # 2-layer teacher, 1-layer student, few sentences
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

RATIO_GOAL = 0.25
COSINE_GOAL = 0.99


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _models(args: argparse.Namespace) -> dict[str, Any]:
    """Teacher (eager-attention copy for export, default-attention copy for the baseline),
    its trained head, and the data."""
    import torch

    from examples.text.data import BASE_INTENTS, NEW_INTENTS, make_split
    from examples.text.models import IntentClassifier, load_bert, student_of, train_head

    def bert(attn: str | None) -> Any:
        model = load_bert(attn)
        if args.layers < len(model.encoder.layer):
            model = student_of(IntentClassifier(model, 1), args.layers).bert
        return model.eval()

    data = {"train": make_split(BASE_INTENTS, args.per_intent, 0, "train"),
            "calib": make_split(BASE_INTENTS, args.calib_per_intent, 2, "calibration"),
            "eval": make_split(BASE_INTENTS, args.eval_per_intent, 1, "evaluation"),
            "new": make_split(BASE_INTENTS + NEW_INTENTS, args.per_intent, 3, "train-new")}
    ds = {k: v.dataset(args.seq_len) for k, v in data.items()}
    teacher = IntentClassifier(bert("eager"), len(BASE_INTENTS))
    train_head(teacher, ds["train"].inputs, ds["train"].labels)
    baseline = IntentClassifier(bert(None), len(BASE_INTENTS))
    baseline.head.load_state_dict(teacher.head.state_dict())
    with torch.no_grad():
        for mine, theirs in zip(baseline.bert.parameters(), teacher.bert.parameters(),
                                strict=True):
            mine.copy_(theirs)
    return {"teacher": teacher.eval(), "baseline": baseline.eval(), "data": ds}


def _convert(module: Any, path: Path, ds: dict[str, Any], args: argparse.Namespace,
             **opts: Any) -> Path:
    from converters import ConvertOptions, convert

    base = {"name": "intents", "exporter": "torchscript", "latency_runs": 5,
            "optimize_graph": False, "version": "1.0.0"}
    base.update(opts)
    convert(module, ConvertOptions(**base), output=path, calibration=ds["calib"],
            eval_data=ds["eval"])
    return path


def _student(teacher: Any, ds: dict[str, Any], args: argparse.Namespace) -> Any:
    from converters.compress import distill
    from examples.text.models import student_of

    built: list[Any] = []

    def factory() -> Any:
        built.append(student_of(teacher, args.student_layers))
        return built[-1]

    distill(teacher, factory, data=ds["train"], eval_data=ds["eval"], output=None,
            epochs=args.distill_epochs, lr=1e-4, batch=32, temperature=2.0, alpha=0.5)
    return built[-1].eval()


def _time(calls: dict[str, Any], runs: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per variant: median over rounds of the round's p50 (ms) and of its ratio to eager."""
    import torch

    torch.set_num_threads(1)
    p50s: dict[str, list[float]] = {k: [] for k in calls}
    ratios: dict[str, list[float]] = {k: [] for k in calls}
    with torch.no_grad():
        for fn in calls.values():
            fn()
            fn()
        for _ in range(repeats):
            samples: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(runs):
                for key, fn in calls.items():
                    t0 = time.perf_counter()
                    fn()
                    samples[key].append((time.perf_counter() - t0) * 1000.0)
            eager = float(np.median(samples["eager"]))
            for key, values in samples.items():
                p50s[key].append(float(np.median(values)))
                ratios[key].append(float(np.median(values)) / eager)
    return {k: {"p50_ms": float(np.median(p50s[k])), "ratio": float(np.median(ratios[k])),
                "ratios": ratios[k]} for k in calls}


def _scores(emb: np.ndarray, reference: np.ndarray, head: Any, labels: np.ndarray
            ) -> dict[str, float]:
    from edgekit.evaluation import evaluate_outputs

    cos = (emb * reference).sum(1) / (np.linalg.norm(emb, axis=1)
                                      * np.linalg.norm(reference, axis=1))
    logits = emb @ head.weight.detach().numpy().T + head.bias.detach().numpy()
    rep = evaluate_outputs(logits, labels, task="classification").headline()
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "accuracy": rep["accuracy"], "f1": rep["f1"]}


def _head_delta(teacher: Any, ds: dict[str, Any], int8: Path, work: Path,
                args: argparse.Namespace) -> dict[str, Any]:
    """The classifier before and after a head-only retrain, converted with int8's recipe."""
    from edgekit.artifact import open_package
    from examples.text.data import BASE_INTENTS, NEW_INTENTS
    from examples.text.models import IntentClassifier, train_head
    from examples.text.run import delta_bytes, patch_bytes

    kept = list(open_package(int8).manifest.recipe.get("nodes_in_float") or [])
    old = _convert(teacher, work / "cls-1.0.0.edgepkg", ds, args, quantize="dynamic",
                   nodes_to_exclude=kept, task="classification")
    new_model = IntentClassifier(teacher.bert, len(BASE_INTENTS + NEW_INTENTS))
    train_head(new_model, ds["new"].inputs, ds["new"].labels)
    new = _convert(new_model.eval(), work / "cls-1.1.0.edgepkg", ds, args, quantize="dynamic",
                   nodes_to_exclude=kept, task="classification", version="1.1.0")
    return {"package_bytes": new.stat().st_size, "delta_bytes": delta_bytes(old, new),
            "model_bytes": len(open_package(new).model_bytes()),
            "model_delta_bytes": patch_bytes(open_package(old).model_bytes(),
                                             open_package(new).model_bytes())}


def _unpadded(eager: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """PyTorch's embedding of each sentence fed alone at its own length."""
    import torch

    out = []
    with torch.no_grad():
        for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True):
            n = int(mask.sum())
            out.append(eager(torch.from_numpy(ids[None, :n]),
                             torch.from_numpy(mask[None, :n])).numpy())
    return np.concatenate(out)


def _fused(teacher: Any, model: bytes) -> bytes:
    """The untrimmed float graph with the int8 recipe's fusion and CPU rewrites, then its
    padding trimmed (the fusion's patterns start at the graph inputs), not quantized."""
    import onnx

    from converters.targets._onnx_quant import fuse_transformer, transformer_shape
    from converters.targets._onnx_trim import trim_padding

    shape = transformer_shape(teacher.encoder())
    assert shape is not None
    proto = onnx.load_from_string(fuse_transformer(model, shape)[0])
    assert trim_padding(proto)
    return bytes(proto.SerializeToString())


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from edgekit.artifact import open_package
    from edgekit.runtimes import RuntimeOptions, load_session

    _log("training the head on the frozen encoder")
    m = _models(args)
    ds, teacher = m["data"], m["teacher"]
    _log("distilling the student")
    student = _student(teacher, ds, args)
    _log("converting: ONNX fp32, ONNX int8 optimized (padding trimmed and kept), student"
         " int8")
    packages = {
        "onnx_fp32": _convert(teacher.encoder(), work / "fp32.edgepkg", ds, args),
        "onnx_int8": _convert(teacher.encoder(), work / "int8.edgepkg", ds, args,
                              quantize="dynamic", float_fallback_cosine=args.floor),
        "onnx_int8_padded": _convert(teacher.encoder(), work / "int8-padded.edgepkg", ds,
                                     args, quantize="dynamic", float_fallback_cosine=args.floor,
                                     trim_padding=False),
        "student_int8": _convert(student.encoder(), work / "student.edgepkg", ds, args,
                                 quantize="dynamic", float_fallback_cosine=args.floor)}
    ev = ds["eval"]
    one = {k: v[:1] for k, v in ev.inputs.items()}
    targs = (torch.from_numpy(one["input_ids"]), torch.from_numpy(one["attention_mask"]))
    eager = m["baseline"].encoder()
    with torch.no_grad():
        reference = eager(torch.from_numpy(ev.inputs["input_ids"]),
                          torch.from_numpy(ev.inputs["attention_mask"])).numpy()
    length = int(one["attention_mask"].sum())
    short = tuple(t[:, :length] for t in targs)
    calls: dict[str, Any] = {"eager": lambda: eager(*targs),
                             "eager_unpadded": lambda: eager(*short)}
    size = sum(p.numel() * p.element_size() for p in eager.parameters())
    rows: dict[str, dict[str, Any]] = {
        "eager": {"variant": "PyTorch eager fp32", "bytes": size,
                  **_scores(reference, reference, teacher.head, ev.labels)},
        "eager_unpadded": {"variant": f"PyTorch eager fp32, unpadded ({length} tokens)",
                           "bytes": size,
                           **_scores(_unpadded(eager, ev.inputs), reference, teacher.head,
                                     ev.labels)}}
    heads = {"onnx_fp32": teacher.head, "onnx_fp32_fused": teacher.head,
             "onnx_int8": teacher.head, "onnx_int8_padded": teacher.head,
             "student_int8": student.head}
    names = {"onnx_fp32": "ONNX fp32", "onnx_fp32_fused": "ONNX fp32 fused",
             "onnx_int8": "ONNX int8 optimized",
             "onnx_int8_padded": "ONNX int8, padding kept",
             "student_int8": f"student int8 ({args.student_layers} layers)"}
    models = {key: open_package(path).model_bytes() for key, path in packages.items()}
    untrimmed = _convert(teacher.encoder(), work / "fp32-padded.edgepkg", ds, args,
                         trim_padding=False)
    models["onnx_fp32_fused"] = _fused(teacher, open_package(untrimmed).model_bytes())
    packages = {"onnx_fp32": packages["onnx_fp32"], "onnx_fp32_fused": packages["onnx_fp32"],
                **{k: v for k, v in packages.items() if k != "onnx_fp32"}}
    for key, path in packages.items():
        pkg = open_package(path)
        session = load_session(pkg.manifest, models[key], RuntimeOptions(threads=1))
        emb = np.concatenate([next(iter(session.run({k: v[i:i + 32] for k, v in
                                                     ev.inputs.items()}).values()))
                              for i in range(0, len(ev), 32)])
        recipe = pkg.manifest.recipe
        fallback = recipe.get("float_fallback") or {}
        rows[key] = {"variant": names[key], "bytes": len(models[key]),
                     **_scores(emb, reference, heads[key], ev.labels),
                     "fused_ops": (recipe.get("transformer_fusion") or {}).get("fused_ops"),
                     "outlier_split": (recipe.get("outlier_split") or {}).get("channels"),
                     "smoothed": list((recipe.get("smoothing") or {}).get("products") or []),
                     "kept_in_float": fallback.get("kept_in_float")}
        calls[key] = (lambda s: lambda: s.run(one))(session)
    _log(f"timing: {args.repeats} rounds of {args.runs} interleaved runs, batch 1, 1 thread")
    for key, stats in _time(calls, args.runs, args.repeats).items():
        rows[key].update(latency_p50_ms=stats["p50_ms"], ratio=stats["ratio"],
                         ratios=stats["ratios"])
    _log("head retrain: two classifier packages and their delta")
    delta = _head_delta(teacher, ds, packages["onnx_int8"], work, args)
    return {"rows": list(rows.values()), "head_retrain": delta,
            "settings": {k: v for k, v in vars(args).items() if k != "out"}}


def _print(result: dict[str, Any]) -> None:
    from edgekit.host.cli._table import format_table

    s = result["settings"]
    print(f"## MiniLM intents ({s['layers']} layers, {s['seq_len']} tokens, batch 1, 1 thread,"
          f" median of {s['repeats']} rounds x {s['runs']} runs)")
    headers = ["variant", "MB", "p50 ms", "vs eager", "accuracy", "F1", "min cos", "mean cos"]
    print(format_table(headers, [[r["variant"], r["bytes"] / 1e6, r["latency_p50_ms"],
                                  r["ratio"], r["accuracy"], r["f1"], r["min_cosine"],
                                  r["mean_cosine"]] for r in result["rows"]]))
    d = result["head_retrain"]
    print(f"head retrain (+2 intents): package {d['package_bytes']:,} bytes, delta"
          f" {d['delta_bytes']:,} bytes; model.onnx {d['model_bytes']:,} bytes, delta"
          f" {d['model_delta_bytes']:,} bytes")
    int8 = next(r for r in result["rows"] if r["variant"] == "ONNX int8 optimized")
    split = int8["outlier_split"] or {}
    print(f"fused: {int8['fused_ops']}; smoothed products: {len(int8['smoothed'])};"
          f" outlier channels split off in float:"
          f" {sum(len(c) for c in split.values())} in {len(split)} products;"
          f" kept in float by the fallback: {int8['kept_in_float'] or 'none'}")
    unpadded = next(r for r in result["rows"] if r["variant"].startswith(
        "PyTorch eager fp32, unpadded"))
    print(f"goal int8 <= {RATIO_GOAL}x eager: {int8['ratio']:.3f}x"
          f" ({'met' if int8['ratio'] <= RATIO_GOAL else 'missed'}; against unpadded eager"
          f" {int8['latency_p50_ms'] / unpadded['latency_p50_ms']:.3f}x);"
          f" min cosine >= {COSINE_GOAL}: {int8['min_cosine']:.4f}"
          f" ({'met' if int8['min_cosine'] >= COSINE_GOAL else 'missed'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small and fast (the test suite)")
    parser.add_argument("--layers", type=int, default=6, help="teacher encoder layers")
    parser.add_argument("--student-layers", type=int, default=3)
    parser.add_argument("--distill-epochs", type=int, default=3)
    parser.add_argument("--per-intent", type=int, default=60)
    parser.add_argument("--calib-per-intent", type=int, default=10)
    parser.add_argument("--eval-per-intent", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--floor", type=float, default=0.992,
                        help="float fallback: calibration cosine floor")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write results.json here")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.student_layers, args.distill_epochs = 2, 1, 1
        args.per_intent, args.calib_per_intent, args.eval_per_intent = 8, 4, 4
        args.seq_len, args.runs, args.repeats = 32, 5, 1
    with tempfile.TemporaryDirectory(prefix="text-bench-") as tmp:
        result = run(args, Path(tmp))
    _print(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
