"""Padding trimmed inside the graph (``converters.targets._onnx_trim``): real PyTorch models
with an ``attention_mask`` input, converted and run by onnxruntime.

A padded position's token id is set out of the embedding's range: a graph that still
computes that position fails in onnxruntime's ``Gather``, one that trims it does not. That
is how the tests see that the padding is no longer computed, without timing anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from converters import ConversionResult, ConvertOptions, convert
from edgekit.artifact import open_package
from edgekit.data import Dataset, save_npz
from edgekit.host.cli import cli

VOCAB, SEQ, WIDTH = 50, 12, 16


class MaskedMean(nn.Module):
    """Token embedding, a per-token layer, the mean over the kept tokens, a 3-class head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 3)

    def tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(self.emb(input_ids)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.tokens(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


class PerToken(MaskedMean):
    """An output per position (a tagger): trimming would change its shape."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.tokens(input_ids) * attention_mask.unsqueeze(-1).to(torch.float32)


class ReadsPadding(MaskedMean):
    """Averages every position, padded or not: trimming would change its values."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        scale = attention_mask[:, :1].to(torch.float32)
        return self.head(self.tokens(input_ids).mean(1)) * scale


def _data(count: int = 32, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (count, SEQ)).astype(np.int64)
    lengths = rng.integers(2, SEQ + 1, count)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    return Dataset({"input_ids": ids * mask, "attention_mask": mask}, None, "synthetic")


def _convert(module: nn.Module, tmp_path: Path, **options: Any
             ) -> tuple[ConversionResult, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"{type(module).__name__}.edgepkg"
    opts = ConvertOptions(exporter="torchscript", latency_runs=2, **options)
    res = convert(module.eval(), opts, output=out, calibration=_data())
    return res, out


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(open_package(path).model_bytes(), so,
                                providers=["CPUExecutionProvider"])


def _short_with_bad_padding() -> dict[str, np.ndarray]:
    """Two sentences of 3 and 5 tokens; every position after the fifth holds an id the
    embedding does not have (the first row's 4th and 5th are padding the batch needs)."""
    mask = (np.arange(SEQ)[None, :] < np.array([[3], [5]])).astype(np.int64)
    ids = np.where(mask == 1, 7, 0)
    ids[:, 5:] = VOCAB + 1000
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask}


@pytest.mark.parametrize("quantize", ["none", "fp16", "dynamic", "int8"])
def test_a_pooled_model_computes_only_the_kept_positions(tmp_path: Path, quantize: str) -> None:
    module = MaskedMean()
    res, path = _convert(module, tmp_path, quantize=quantize)
    record = res.manifest.recipe["padding_trim"]
    assert record["applied"] is True, record
    assert sorted(record["inputs"]) == ["attention_mask", "input_ids"]
    assert record["max_rel_diff"] <= 1e-4
    session = _session(path)
    feeds = _short_with_bad_padding()
    got = session.run(None, feeds)[0]  # would fail in Gather if a padded id were read
    clean = {"input_ids": np.where(feeds["attention_mask"] == 1, 7, 0).astype(np.int64),
             "attention_mask": feeds["attention_mask"]}
    data = _data(seed=1)
    quantized = quantize in ("dynamic", "int8")
    if quantized:
        # How far int8 lands from PyTorch on this small random model depends on the
        # onnxruntime version; what the trim must keep is the quantized graph's own answer:
        # the same conversion with its padding kept, fed the padding it can read.
        _, kept_path = _convert(module, tmp_path / "kept", quantize=quantize, trim_padding=False)
        kept = _session(kept_path)
        np.testing.assert_allclose(got, kept.run(None, clean)[0], atol=1e-5)
        np.testing.assert_allclose(session.run(None, data.inputs)[0],
                                   kept.run(None, data.inputs)[0], atol=1e-5)
        return
    with torch.no_grad():
        want = module(*(torch.from_numpy(clean[k]) for k in ("input_ids", "attention_mask")))
    atol = {"none": 1e-5, "fp16": 5e-3}[quantize]
    np.testing.assert_allclose(got, want.numpy(), atol=atol)
    # every row of the data set, at its own lengths in one batch: the same as PyTorch
    with torch.no_grad():
        want = module(*(torch.from_numpy(data.inputs[k]) for k in ("input_ids", "attention_mask")))
    error = np.abs(session.run(None, data.inputs)[0] - want.numpy()).max()
    assert error <= atol, (error, atol)


def test_trimming_can_be_turned_off(tmp_path: Path) -> None:
    res, path = _convert(MaskedMean(), tmp_path, trim_padding=False)
    assert res.manifest.recipe["padding_trim"] == {"applied": False, "reason": "disabled"}
    with pytest.raises(Exception, match="out of|bounds|indices"):
        _session(path).run(None, _short_with_bad_padding())


@pytest.mark.parametrize(("module", "why"), [(PerToken(), "per position"),
                                              (ReadsPadding(), "reads padded positions")])
def test_a_model_that_needs_its_padding_keeps_it(tmp_path: Path, module: nn.Module,
                                                 why: str) -> None:
    res, path = _convert(module, tmp_path)
    record = res.manifest.recipe["padding_trim"]
    assert record["applied"] is False and why in record["check"], record
    assert any("padding not trimmed" in n and why in n for n in res.warnings), res.warnings
    data = _data(seed=2)
    with torch.no_grad():
        want = module(*(torch.from_numpy(data.inputs[k]) for k in ("input_ids", "attention_mask")))
    np.testing.assert_allclose(_session(path).run(None, data.inputs)[0], want.numpy(), atol=1e-5)


def test_a_model_without_a_mask_is_left_alone(tmp_path: Path) -> None:
    module = nn.Sequential(nn.Linear(4, 3)).eval()
    out = tmp_path / "plain.edgepkg"
    data = Dataset({"x": np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)},
                   None, "synthetic")
    res = convert(module, ConvertOptions(exporter="torchscript", latency_runs=2), output=out,
                  calibration=data)
    assert res.manifest.recipe["padding_trim"] is None


@pytest.mark.parametrize("keep", [False, True])
def test_the_cli_trims_unless_told_to_keep_the_padding(tmp_path: Path, keep: bool) -> None:
    source = tmp_path / "masked.onnx"
    data = _data()
    example = tuple(torch.from_numpy(data.inputs[k][:2]) for k in ("input_ids", "attention_mask"))
    torch.onnx.export(MaskedMean().eval(), example, str(source), dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                    "logits": {0: "batch"}})
    save_npz(tmp_path / "calib.npz", data.inputs)
    args = ["convert", str(source), "--calibration", str(tmp_path / "calib.npz"), "--json",
            "-o", str(tmp_path / "out.edgepkg"), *(["--keep-padding"] if keep else [])]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)["recipe"]["padding_trim"]
    assert record["applied"] is (not keep), record


def test_a_trimmed_graph_converted_again_is_not_trimmed_twice(tmp_path: Path) -> None:
    _, first = _convert(MaskedMean(), tmp_path / "first")
    source = tmp_path / "trimmed.onnx"
    source.write_bytes(open_package(first).model_bytes())
    out = tmp_path / "again.edgepkg"
    res = convert(str(source), ConvertOptions(latency_runs=2), output=out,
                  calibration=_data())
    assert res.manifest.recipe["padding_trim"] is None
    got = _session(out).run(None, _short_with_bad_padding())[0]
    np.testing.assert_allclose(got, _session(first).run(None, _short_with_bad_padding())[0],
                               atol=1e-6)


def test_a_graph_with_a_fixed_batch_is_checked_at_that_batch(tmp_path: Path) -> None:
    # A batch of two rows (the check's third example) cannot run on a batch-1 graph: only
    # the examples it can run are used, and the rewrite is kept.
    res, path = _convert(MaskedMean(), tmp_path, dynamic_batch=False)
    record = res.manifest.recipe["padding_trim"]
    assert record["applied"] is True, record
    feeds = {k: v[1:2] for k, v in _short_with_bad_padding().items()}
    assert np.isfinite(_session(path).run(None, feeds)[0]).all()
