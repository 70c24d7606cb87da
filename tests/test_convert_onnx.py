"""PyTorch and ONNX sources to the ONNX target, through ``converters.convert`` and the CLI.

Real parts only: the digits CNN trained on scikit-learn's digits, torch's real exporters,
onnxruntime's real quantizers, and every artifact executed by onnxruntime.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from convert_cases import digits_split, export_digits_onnx, trained_digits_cnn, trained_digits_state

from converters import ConvertOptions, convert, run_batches
from edgekit.artifact import open_package, sha256_file
from edgekit.data import Dataset, check_inputs, save_npz
from edgekit.host.cli import cli
from edgekit.runtimes import load_session

FACTORY_MODULE = "edgekit_test_digits_factory"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every source kind of the same trained CNN, and the data files, written once."""
    import torch

    root = tmp_path_factory.mktemp("convert-onnx")
    calib, evald, _ = digits_split()
    save_npz(root / "calib.npz", calib.inputs)
    save_npz(root / "eval.npz", evald.inputs, evald.labels)
    model = trained_digits_cnn()
    example = (torch.zeros(2, 1, 8, 8),)
    program = torch.export.export(model, example,
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, root / "digits.pt2")
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 8, 8),)),
                      root / "digits_static.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, example), root / "digits_ts.pt")
    torch.save(trained_digits_state(), root / "state.pt")
    (root / f"{FACTORY_MODULE}.py").write_text(
        "from convert_cases import digits_cnn_class\n\n\n"
        "def build():\n    return digits_cnn_class()()\n")
    export_digits_onnx(root / "digits.onnx")
    return {"root": root, "calib": root / "calib.npz", "eval": root / "eval.npz",
            "pt2": root / "digits.pt2", "pt2_static": root / "digits_static.pt2",
            "ts": root / "digits_ts.pt", "state": root / "state.pt",
            "onnx": root / "digits.onnx"}


@pytest.fixture(scope="module")
def factory_on_path(work: dict[str, Path]) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(work["root"]))
        yield f"{FACTORY_MODULE}:build"


def run_cli(*args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def convert_cli(source: Any, out: Path, *args: Any) -> dict[str, Any]:
    result = run_cli("convert", source, "-o", out, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def artifact_accuracy(pkg_path: Path, data: Dataset) -> float:
    """Accuracy of the packaged model, run by onnxruntime outside the converter."""
    pkg = open_package(pkg_path)
    session = load_session(pkg.manifest, pkg.model_bytes())
    inputs = check_inputs(data.inputs, pkg.manifest.inputs)
    logits = run_batches(session.run, Dataset(inputs, data.labels, "eval"))
    return float(np.mean(logits[pkg.manifest.outputs[0].name].argmax(axis=1) == data.labels))


def onnx_graph(pkg_path: Path) -> Any:
    import onnx

    return onnx.load_from_string(open_package(pkg_path).model_bytes())


# ---- sources --------------------------------------------------------------------------


def test_pt2_program_with_dynamo_exporter(work: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pt2.edgepkg"
    doc = convert_cli(work["pt2"], out, "--exporter", "dynamo", "--eval", work["eval"])
    m = open_package(out).manifest
    assert m.source["framework"] == "pytorch" and m.source["kind"] == "export"
    assert m.source["sha256"] == sha256_file(work["pt2"])
    assert m.recipe["exporter"] == "dynamo" and m.recipe["opset"] >= 18
    assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [("x", "float32", ["batch", 1, 8, 8])]
    assert doc["report"]["parity"]["passed"]
    assert artifact_accuracy(out, digits_split()[1]) == pytest.approx(
        m.metrics["accuracy"]["artifact"]["accuracy"])
    assert m.metrics["accuracy"]["drop"] == pytest.approx(0.0, abs=1 / 397)


def test_pt2_program_with_a_fixed_batch_keeps_it(work: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "static.edgepkg"
    doc = convert_cli(work["pt2_static"], out, "--eval", work["eval"])
    m = open_package(out).manifest
    assert m.inputs[0].shape == [1, 1, 8, 8]
    assert any("fixed batch of 1" in w for w in doc["warnings"])
    assert doc["report"]["parity"]["passed"] and doc["report"]["parity"]["samples"] > 1
    assert artifact_accuracy(out, digits_split()[1]) == pytest.approx(
        m.metrics["accuracy"]["artifact"]["accuracy"])


def test_torchscript_file(work: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ts.edgepkg"
    convert_cli(work["ts"], out, "--exporter", "torchscript", "--eval", work["eval"])
    m = open_package(out).manifest
    assert m.source["kind"] == "torchscript" and m.source["sha256"] == sha256_file(work["ts"])
    assert m.recipe["exporter"] == "torchscript" and m.recipe["opset"] == 17
    assert m.inputs[0].name == "x" and m.inputs[0].shape[0] == "batch"
    assert m.metrics["parity"]["passed"] and m.metrics["parity"]["max_abs_error"] < 1e-4


def test_factory_with_weights(work: dict[str, Path], factory_on_path: str,
                              tmp_path: Path) -> None:
    out = tmp_path / "factory.edgepkg"
    convert_cli(factory_on_path, out, "--weights", work["state"], "--exporter", "torchscript",
                "--eval", work["eval"], "--name", "digits", "--version", "1.2.0")
    m = open_package(out).manifest
    assert (m.name, m.version) == ("digits", "1.2.0")
    assert m.source["kind"] == "module" and m.source["sha256"] == sha256_file(work["state"])
    assert m.metrics["parity"]["passed"]
    # The weights were loaded: the artifact classifies like the trained model.
    assert m.metrics["accuracy"]["artifact"]["accuracy"] > 0.9


def test_in_memory_module_with_auto_exporter(tmp_path: Path) -> None:
    calib, evald, _ = digits_split()
    out = tmp_path / "auto.edgepkg"
    res = convert(trained_digits_cnn(), ConvertOptions(exporter="auto", latency_runs=5),
                  output=out, eval_data=evald)
    recipe = res.manifest.recipe
    assert res.manifest.source["sha256"] is None
    assert recipe["exporters_tried"] == ["torchscript", "dynamo"]
    timings = recipe["exporter_latency_ms"]
    assert set(timings) == {"torchscript", "dynamo"} and all(t > 0 for t in timings.values())
    assert recipe["exporter"] in timings
    # The other exporter is kept only when it is faster by more than the tie margin.
    other = "dynamo" if recipe["exporter"] == "torchscript" else "torchscript"
    assert timings[recipe["exporter"]] <= timings[other] * 1.03
    assert res.passed


def test_onnx_file_with_external_data_is_folded_in(work: dict[str, Path], tmp_path: Path) -> None:
    import onnx

    folder = tmp_path / "external"
    folder.mkdir()
    model = onnx.load(str(work["onnx"]))
    onnx.save(model, str(folder / "digits.onnx"), save_as_external_data=True,
              location="weights.bin", size_threshold=0)
    assert (folder / "weights.bin").stat().st_size > 10_000
    out = tmp_path / "onnx.edgepkg"
    convert_cli(folder / "digits.onnx", out, "--eval", work["eval"])
    graph = onnx_graph(out)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in graph.graph.initializer)
    m = open_package(out).manifest
    assert m.source["framework"] == "onnx"
    assert m.source["sha256"] == sha256_file(folder / "digits.onnx")
    assert m.recipe["exporter"] == "onnx-source"
    assert [o.name for o in m.outputs] == ["logits"]
    assert m.metrics["parity"]["passed"]
    assert m.metrics["accuracy"]["drop"] == pytest.approx(0.0, abs=1 / 397)


def test_onnx_source_below_opset_17_is_converted(tmp_path: Path) -> None:
    path = export_digits_onnx(tmp_path / "old.onnx", opset=13)
    # No offline optimization: extended fusions would raise the minimum runtime on purpose.
    res = convert(path, ConvertOptions(latency_runs=5, optimize_graph=False),
                  output=tmp_path / "old.edgepkg",
                  eval_data=digits_split()[1])
    assert res.manifest.recipe["opset"] == 17 and res.manifest.recipe["source_opset"] == 13
    assert any("opset converted from 13 to 17" in w for w in res.warnings)
    assert res.manifest.target["min_runtime_version"] == "1.13.0"
    assert res.passed


def test_framework_without_onnx_exporter_is_a_conversion_error() -> None:
    """A source framework that nothing exports to ONNX: a stand-in source, since every real
    framework here has an exporter."""
    from converters import LoadedSource, SourceRef
    from converters.targets.onnx_target import OnnxTarget
    from edgekit.errors import ConversionError
    from edgekit.manifest import TensorSpec

    class Unexportable(LoadedSource):
        framework = "no-such-framework"

        def predict(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {}

    spec = TensorSpec("x", "float32", ["batch", 4])
    source = Unexportable(SourceRef(obj=object()), [spec], [spec], None)
    with pytest.raises(ConversionError, match="no ONNX exporter is registered for"
                                              " no-such-framework"):
        OnnxTarget.convert(source, ConvertOptions(), None, lambda _: None)


def _branching_cnn() -> Any:
    """The digits CNN behind a data-dependent branch: torch.export (the dynamo exporter)
    refuses it, tracing (the TorchScript exporter) records the branch the data take."""
    import torch

    class Guarded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = trained_digits_cnn()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.min() >= 0:
                return self.net(x)
            return self.net(x.clamp(min=0))

    return Guarded().eval()


def test_auto_exporter_uses_the_other_one_when_one_fails(tmp_path: Path) -> None:
    res = convert(_branching_cnn(), ConvertOptions(exporter="auto", latency_runs=5),
                  output=tmp_path / "guarded.edgepkg", eval_data=digits_split()[1])
    recipe = res.manifest.recipe
    assert recipe["exporter"] == "torchscript"
    assert set(recipe["exporter_failures"]) == {"dynamo"}
    assert "exporter_latency_ms" not in recipe
    assert any(w.startswith("the dynamo exporter failed") for w in res.warnings)
    assert res.passed


def test_only_exporter_failing_is_a_conversion_error(tmp_path: Path) -> None:
    from edgekit.errors import ConversionError

    with pytest.raises(ConversionError) as err:
        convert(_branching_cnn(), ConvertOptions(exporter="dynamo"),
                output=tmp_path / "guarded.edgepkg", eval_data=digits_split()[1])
    assert "dynamo exporter:" in err.value.message and "--exporter torchscript" in err.value.hint
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["export", "torchscript"])
def test_in_memory_program_and_script_module(kind: str, tmp_path: Path) -> None:
    import torch

    model = trained_digits_cnn()
    example = (torch.zeros(2, 1, 8, 8),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = (torch.export.export(model, example,
                                   dynamic_shapes=({0: torch.export.Dim("batch")},))
               if kind == "export" else torch.jit.trace(model, example))
    res = convert(obj, ConvertOptions(exporter="torchscript", latency_runs=5),
                  output=tmp_path / "m.edgepkg", eval_data=digits_split()[1])
    m = res.manifest
    assert m.source["kind"] == kind and m.source["sha256"] is None
    assert m.inputs[0].name == "x" and m.inputs[0].shape[0] == "batch"
    assert res.passed and m.metrics["parity"]["max_abs_error"] < 1e-4


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_dynamic_program_exported_with_fixed_batch_when_asked(tmp_path, exporter: str) -> None:
    """A .pt2 with a symbolic batch and dynamic_batch=False gives a fixed batch with either
    exporter (the choice between them is made by timing, so both must agree)."""
    import numpy as np
    import torch

    from converters import ConvertOptions, convert
    from edgekit.data import Dataset

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.rand(2, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "dyn.pt2")
    data = Dataset({"x": np.random.default_rng(0).random((8, 1, 8, 8), np.float32)}, None, "d")
    fixed = convert(tmp_path / "dyn.pt2", ConvertOptions(dynamic_batch=False, exporter=exporter),
                    output=None, eval_data=data)
    assert fixed.manifest.inputs[0].shape == [1, 1, 8, 8] and fixed.passed
    dynamic = convert(tmp_path / "dyn.pt2", ConvertOptions(exporter=exporter), output=None,
                      eval_data=data)
    assert dynamic.manifest.inputs[0].shape == ["batch", 1, 8, 8] and dynamic.passed
