"""The int8 MiniLM encoder's accuracy corrections side by side, in one process.

From one TorchScript export at ``--seq-len`` tokens, fused and rewritten as the int8 recipe
does (``converters.targets._onnx_quant.fuse_transformer``, ``preprocess``), three graphs are
quantized (dynamic int8, per channel, no float fallback):

- plain: no correction;
- split: the outlier input channels split off in float (``_onnx_outliers``), no scaling;
- smoothed + split: the feed-forward input scaled SmoothQuant-style (``_onnx_smooth``), then
  the split of what is left;
- trimmed recipe: the same, on the graph whose inputs are cut after the last position the
  attention mask keeps (``_onnx_trim``, the recipe now).

Each is timed against PyTorch eager (transformers' default attention) in interleaved runs,
batch 1, one thread, like ``text_bench.py``, and scored by the min and mean cosine of its
sentence embedding to PyTorch's on held-out sentences. The ratios of one invocation are
comparable with each other; across invocations the machine's load moves them.

Run from the repository root::

    python benchmarks/text_steps_bench.py [--repeats 5] [--runs 20] [--seq-len 128]
    python benchmarks/text_steps_bench.py --quick   # 2 layers, 32 tokens, few sentences
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]


def _graphs(encoder: Any, calib: Any, seq_len: int) -> dict[str, bytes]:
    import onnx

    from converters import ConvertOptions, convert
    from converters.targets._onnx_outliers import split_outlier_channels
    from converters.targets._onnx_quant import (
        fuse_transformer,
        preprocess,
        quantize_dynamic_int8,
        transformer_shape,
    )
    from converters.targets._onnx_smooth import DEFAULT_ALPHA, smooth_products
    from converters.targets._onnx_trim import trim_padding
    from edgekit.artifact import open_package

    with tempfile.TemporaryDirectory(prefix="text-steps-") as tmp:
        path = Path(tmp) / "fp32.edgepkg"
        convert(encoder, ConvertOptions(name="encoder", exporter="torchscript",
                                        optimize_graph=False, latency_runs=1,
                                        trim_padding=False),
                output=path, calibration=calib)
        fp32 = open_package(path).model_bytes()
    shape = transformer_shape(encoder)
    assert shape is not None
    fused_raw = fuse_transformer(fp32, shape)[0]
    fused = preprocess(fused_raw).model
    proto = onnx.load_from_string(fused_raw)
    assert trim_padding(proto)
    trimmed = preprocess(bytes(proto.SerializeToString())).model

    def quantized(model: bytes, split: bool) -> bytes:
        kept: list[str] = []
        if split:
            result = split_outlier_channels(model, calib, most=4)
            model, kept = result.model, result.float_nodes
        return quantize_dynamic_int8(model, per_channel=True, nodes_to_exclude=kept)

    smoothed = smooth_products(fused, calib, alpha=DEFAULT_ALPHA).model
    smoothed_trimmed = smooth_products(trimmed, calib, alpha=DEFAULT_ALPHA).model
    return {"plain": quantized(fused, False), "split": quantized(fused, True),
            "smoothed + split": quantized(smoothed, True),
            "trimmed recipe": quantized(smoothed_trimmed, True)}


def main() -> int:
    import onnxruntime as ort
    import torch
    from text_bench import _time

    from examples.text.data import BASE_INTENTS, make_split
    from examples.text.models import IntentClassifier, SentenceEncoder, load_bert, student_of

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calib-per-intent", type=int, default=6)
    parser.add_argument("--eval-per-intent", type=int, default=10)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=6, help="encoder layers")
    parser.add_argument("--quick", action="store_true", help="small and fast (the test suite)")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.seq_len, args.calib_per_intent, args.eval_per_intent = 2, 32, 3, 3
        args.runs, args.repeats = 3, 1

    def bert(attn: str | None) -> Any:
        model = load_bert(attn)
        if args.layers < len(model.encoder.layer):
            model = student_of(IntentClassifier(model, 1), args.layers).bert
        return model.eval()

    calib = make_split(BASE_INTENTS, args.calib_per_intent, 2, "calibration").dataset(args.seq_len)
    held = make_split(BASE_INTENTS, args.eval_per_intent, 1, "evaluation").dataset(args.seq_len)
    graphs = _graphs(SentenceEncoder(bert("eager")).eval(), calib, args.seq_len)
    eager = SentenceEncoder(bert(None)).eval()
    ids, mask = (torch.from_numpy(held.inputs[k]) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        reference = eager(ids, mask).numpy()
    one = {k: v[:1] for k, v in held.inputs.items()}
    calls: dict[str, Any] = {"eager": lambda: eager(ids[:1], mask[:1])}
    scores = {}
    for name, model in graphs.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        emb = np.concatenate([session.run(None, {k: v[i:i + 16] for k, v in
                                                 held.inputs.items()})[0]
                              for i in range(0, len(held), 16)])
        cos = (emb * reference).sum(1) / (np.linalg.norm(emb, axis=1)
                                          * np.linalg.norm(reference, axis=1))
        scores[name] = (float(cos.min()), float(cos.mean()))
        calls[name] = (lambda s: lambda: s.run(None, one))(session)
    timing = _time(calls, args.runs, args.repeats)
    print(f"## int8 MiniLM corrections ({args.layers} layers, {args.seq_len} tokens, batch 1, 1 thread, median of"
          f" {args.repeats} rounds x {args.runs} runs; eager p50"
          f" {timing['eager']['p50_ms']:.2f} ms)")
    for name, (low, mean) in scores.items():
        t = timing[name]
        print(f"{name:18s} p50 {t['p50_ms']:6.2f} ms  {t['ratio']:.3f}x eager"
              f" (rounds {', '.join(f'{r:.3f}' for r in t['ratios'])})"
              f"  min cos {low:.4f}  mean cos {mean:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
