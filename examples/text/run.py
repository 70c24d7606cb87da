"""The whole path for a transformer: an intent classifier on MiniLM, from training to a
head-only update rolled out to two agents.

1. data: templated sentences of seven intents (train, calibration, evaluation splits);
2. teacher: MiniLM encoder (frozen) + mean pooling + a linear head trained in seconds;
3. convert to ONNX fp32 and evaluate (accuracy, precision, recall, F1);
4. optimize to int8 under a one-point accuracy budget (fused transformer, dynamic int8,
   the float fallback keeping every calibration sentence at cosine >= the floor);
5. distill into a student with fewer encoder layers, initialised from the teacher's;
6. deploy the int8 model to two agents on a real broker (``edgekit deploy``);
7. retrain only the head on two new intents, convert with the same recipe and roll it out;
   the update's size is measured as a delta against the package the devices have.

Run from the repository root::

    python -m examples.text.run [--out DIR] [--json] [--no-deploy]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters import ConvertOptions, convert
from converters.compress import distill, optimize
from converters.evaluate import evaluate
from edgekit.data import Dataset
from edgekit.host.cli._table import format_table
from edgekit.signing import load_private_key

from .data import BASE_INTENTS, NEW_INTENTS, SEQ_LEN, make_split
from .fleet import LocalFleet, make_keys
from .models import IntentClassifier, load_bert, student_of, train_head

__all__ = ["Settings", "delta_bytes", "main", "patch_bytes", "run"]

NAME = "intents"


@dataclass
class Settings:
    """The sizes of the run; the defaults make the full example, tests use smaller ones."""

    out: Path = Path("out/text")
    per_intent: int = 60
    eval_per_intent: int = 30
    calib_per_intent: int = 10
    teacher_layers: int = 6
    student_layers: int = 3
    distill_epochs: int = 3
    seq_len: int = SEQ_LEN
    floor: float = 0.992
    latency_runs: int = 30
    deploy: bool = True
    broker: str | None = None
    threads: int = 1


@dataclass
class Row:
    """One line of the results table."""

    variant: str
    package: str | None
    size_bytes: int | None
    latency_p50_ms: float | None = None
    accuracy: float | None = None
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def delta_bytes(old_pkg: Path, new_pkg: Path) -> int:
    """Bytes of the model-aware delta that rebuilds ``new_pkg`` on a device holding
    ``old_pkg`` (what ``edgekit deploy`` sends to devices serving the old package): tensors
    the two share are copied from the old package, the rest is sent compressed."""
    from edgekit.host.ota.delta import delta_bytes as model_delta_bytes

    return model_delta_bytes(old_pkg, new_pkg)


def patch_bytes(old: bytes, new: bytes) -> int:
    """Size of ``new`` compressed by zstandard with ``old`` as its prefix: the compressed
    size of ``old + new`` less that of ``old`` (level 3, long-distance matching, a window
    holding both). python-zstandard's raw-content dictionaries do not reach back as far as
    a prefix does, so the two are compressed as one stream."""
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=max(20, min(31, (len(old) + len(new)).bit_length())), enable_ldm=True)
    compressor = zstandard.ZstdCompressor(compression_params=params)
    return max(0, len(compressor.compress(old + new)) - len(compressor.compress(old)))


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _evaluate(row: Row, data: Dataset) -> Row:
    assert row.package is not None
    head = evaluate(row.package, data, task="classification", threads=1).report.headline()
    row.accuracy, row.precision = head["accuracy"], head["precision"]
    row.recall, row.f1 = head["recall"], head["f1"]
    return row


def _options(s: Settings, **kw: Any) -> ConvertOptions:
    # No offline graph optimization: its level is chosen by timing, which differs from one
    # run to the next, and the head-only update must keep the encoder's bytes; onnxruntime
    # applies the same optimizations when it loads the model.
    base = {"name": NAME, "exporter": "torchscript", "threads": s.threads,
            "optimize_graph": False,
            "latency_runs": 10, "task": "classification", "labels": list(BASE_INTENTS)}
    base.update(kw)
    return ConvertOptions(**base)


@dataclass
class _Data:
    train: Dataset
    calib: Dataset
    eval: Dataset
    new_train: Dataset
    new_eval: Dataset


def _data(s: Settings) -> _Data:
    both = BASE_INTENTS + NEW_INTENTS
    return _Data(
        train=make_split(BASE_INTENTS, s.per_intent, 0, "train").dataset(s.seq_len),
        calib=make_split(BASE_INTENTS, s.calib_per_intent, 2, "calibration").dataset(s.seq_len),
        eval=make_split(BASE_INTENTS, s.eval_per_intent, 1, "evaluation").dataset(s.seq_len),
        new_train=make_split(both, s.per_intent, 3, "train-new").dataset(s.seq_len),
        new_eval=make_split(both, s.eval_per_intent, 4, "evaluation-new").dataset(s.seq_len))


def _teacher(s: Settings, data: _Data) -> IntentClassifier:
    bert = load_bert()
    if s.teacher_layers < len(bert.encoder.layer):
        bert = student_of(IntentClassifier(bert, 1), s.teacher_layers).bert
    model = IntentClassifier(bert, len(BASE_INTENTS))
    assert data.train.labels is not None
    train_head(model, data.train.inputs, data.train.labels)
    return model.eval()


def _distill(s: Settings, teacher: IntentClassifier, data: _Data, key: Any) -> Row:
    """Distill a student of ``s.student_layers`` layers and convert it like the teacher."""
    built: list[IntentClassifier] = []

    def factory() -> IntentClassifier:
        built.append(student_of(teacher, s.student_layers))
        return built[-1]

    report = distill(teacher, factory, data=data.train, eval_data=data.eval, output=None,
                     epochs=s.distill_epochs, lr=1e-4, batch=32, temperature=2.0, alpha=0.5,
                     threads=s.threads, progress=_log)
    student = built[-1].eval()
    path = s.out / f"{NAME}-student-int8.edgepkg"
    convert(student, _options(s, quantize="dynamic", version="1.0.0",
                              float_fallback_cosine=s.floor),
            output=path, calibration=data.calib, eval_data=data.eval, sign_key=key)
    return Row(f"student ({s.student_layers} layers) int8", str(path), path.stat().st_size,
               notes={"parameters": report.student.parameters,
                      "teacher_parameters": report.teacher.get("parameters"),
                      "distill_loss": report.loss})


def _retrain_head(s: Settings, teacher: IntentClassifier, data: _Data, int8: Path,
                  key: Any) -> Row:
    """The same encoder with a new head for base + new intents, converted with the recipe
    of ``int8`` (its nodes in float), so the encoder's bytes do not change."""
    from edgekit.artifact import open_package

    model = IntentClassifier(teacher.bert, len(BASE_INTENTS + NEW_INTENTS))
    assert data.new_train.labels is not None
    train_head(model, data.new_train.inputs, data.new_train.labels)
    recipe = open_package(int8).manifest.recipe
    path = s.out / f"{NAME}-1.1.0-int8.edgepkg"
    convert(model.eval(), _options(s, quantize="dynamic", version="1.1.0",
                                   per_channel=bool(recipe.get("per_channel", True)),
                                   nodes_to_exclude=list(recipe.get("nodes_in_float") or []),
                                   labels=list(BASE_INTENTS + NEW_INTENTS)),
            output=path, calibration=data.calib, eval_data=data.new_eval, sign_key=key,
            extra_manifest={"breaking": True})
    old_model = open_package(int8).model_bytes()
    new_model = open_package(path).model_bytes()
    return Row("head retrain (+2 intents) int8", str(path), path.stat().st_size,
               notes={"delta_bytes": delta_bytes(int8, path),
                      "full_bytes": path.stat().st_size,
                      "model_delta_bytes": patch_bytes(old_model, new_model),
                      "model_bytes": len(new_model)})


def _optimize(s: Settings, teacher: IntentClassifier, data: _Data, key: Any) -> Row:
    path = s.out / f"{NAME}-1.0.0-int8.edgepkg"
    result = optimize(teacher, eval_data=data.eval, calibration=data.calib, output=path,
                      metric="accuracy", max_drop=0.01, objective="size",
                      candidates=["onnx:fp32", "onnx:dynamic-per-channel"],
                      options=_options(s, version="1.0.0", float_fallback_cosine=s.floor),
                      latency_runs=10, sign_key=key, plot=False, progress=_log)
    from edgekit.artifact import open_package

    recipe = open_package(path).manifest.recipe
    return Row("ONNX int8 optimized", str(path), path.stat().st_size,
               notes={"chosen": result.chosen["name"], "reason": result.reason,
                      "fused_ops": (recipe.get("transformer_fusion") or {}).get("fused_ops"),
                      "nodes_in_float": recipe.get("nodes_in_float"),
                      "fallback": {k: v for k, v in (recipe.get("float_fallback") or {}).items()
                                   if k in ("plain", "final", "outcome", "met")}})


def run(s: Settings) -> dict[str, Any]:
    """Every step; returns the rows, the deploy outcomes and the settings."""
    s.out.mkdir(parents=True, exist_ok=True)
    keys = make_keys(s.out / "keys")
    key = load_private_key(keys["release_key"])
    _log("generating sentences and training the head on the frozen MiniLM encoder")
    data = _data(s)
    teacher = _teacher(s, data)
    rows: dict[str, Row] = {}
    _log("converting to ONNX fp32")
    fp32 = s.out / f"{NAME}-fp32.edgepkg"
    convert(teacher, _options(s, version="0.9.0"), output=fp32, eval_data=data.eval,
            sign_key=key)
    rows["fp32"] = _evaluate(Row("ONNX fp32", str(fp32), fp32.stat().st_size), data.eval)
    _log("optimizing to int8 under a one-point accuracy budget")
    rows["int8"] = _evaluate(_optimize(s, teacher, data, key), data.eval)
    _log(f"distilling into a {s.student_layers}-layer student")
    rows["student"] = _evaluate(_distill(s, teacher, data, key), data.eval)
    _log("retraining the head on the new intents")
    int8 = Path(str(rows["int8"].package))
    rows["retrain"] = _evaluate(_retrain_head(s, teacher, data, int8, key), data.new_eval)
    _latencies(teacher, rows, data.eval, s)
    deploys: dict[str, Any] = {}
    if s.deploy:
        _log("deploying to two agents, then rolling out the head update")
        with LocalFleet(s.out / "fleet", keys, broker=s.broker) as fleet:
            deploys["1.0.0"] = fleet.deploy(int8)
            deploys["1.1.0"] = fleet.deploy(Path(str(rows["retrain"].package)), breaking=True)
    return {"rows": [asdict(r) for r in rows.values()], "deploys": deploys,
            "settings": {k: str(v) if isinstance(v, Path) else v
                         for k, v in asdict(s).items()}}


def _latencies(teacher: IntentClassifier, rows: dict[str, Row], data: Dataset,
               s: Settings) -> None:
    """p50 batch-1 latency of every package and of the PyTorch teacher, interleaved."""
    import torch

    from converters.compress._torch import threads
    from edgekit.artifact import open_package
    from edgekit.runtimes import RuntimeOptions, load_session

    one = {k: v[:1] for k, v in data.inputs.items()}
    args = (torch.from_numpy(one["input_ids"]), torch.from_numpy(one["attention_mask"]))
    calls = {"pytorch": lambda: teacher(*args)}
    for key, row in rows.items():
        pkg = open_package(str(row.package))
        session = load_session(pkg.manifest, pkg.model_bytes(), RuntimeOptions(threads=1))
        calls[key] = (lambda sess: lambda: sess.run(one))(session)
    samples: dict[str, list[float]] = {k: [] for k in calls}
    with threads(s.threads), torch.no_grad():
        for fn in calls.values():
            fn()
        for _ in range(s.latency_runs):
            for key, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                samples[key].append((time.perf_counter() - t0) * 1000.0)
    eager = float(np.median(samples.pop("pytorch")))
    rows["fp32"].notes["pytorch_eager_p50_ms"] = eager
    for key, row in rows.items():
        row.latency_p50_ms = float(np.median(samples[key]))
        row.notes["vs_eager"] = row.latency_p50_ms / eager


def _table(result: dict[str, Any]) -> str:
    headers = ["variant", "MB", "p50 ms", "vs eager", "accuracy", "precision", "recall", "F1",
               "delta bytes"]
    lines = []
    for r in result["rows"]:
        delta = r["notes"].get("delta_bytes")
        lines.append([r["variant"], r["size_bytes"] / 1e6, r["latency_p50_ms"],
                      r["notes"].get("vs_eager"), r["accuracy"], r["precision"], r["recall"],
                      r["f1"], f"{delta:,} of {r['size_bytes']:,}" if delta else "-"])
    return format_table(headers, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Settings.out)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--no-deploy", action="store_true", help="skip the broker and agents")
    parser.add_argument("--broker", help="use this broker instead of starting mosquitto")
    parser.add_argument("--per-intent", type=int, default=Settings.per_intent,
                        help="training sentences per intent")
    parser.add_argument("--eval-per-intent", type=int, default=Settings.eval_per_intent)
    parser.add_argument("--calib-per-intent", type=int, default=Settings.calib_per_intent)
    parser.add_argument("--teacher-layers", type=int, default=Settings.teacher_layers)
    parser.add_argument("--student-layers", type=int, default=Settings.student_layers)
    parser.add_argument("--distill-epochs", type=int, default=Settings.distill_epochs)
    args = parser.parse_args(argv)
    s = Settings(out=args.out, deploy=not args.no_deploy, broker=args.broker,
                 per_intent=args.per_intent, eval_per_intent=args.eval_per_intent,
                 calib_per_intent=args.calib_per_intent, teacher_layers=args.teacher_layers,
                 student_layers=args.student_layers, distill_epochs=args.distill_epochs)
    result = run(s)
    (s.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
