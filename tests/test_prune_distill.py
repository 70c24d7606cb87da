"""Pruning and distillation on the digits data, through the CLI, with real exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from zoo import digits
from zoo.commands import cli_json, run_cli

from converters.compress import distill, prune
from converters.compress._channels import plan_groups
from edgekit.artifact import open_package
from edgekit.errors import ConversionError

STUDENT = f"{digits.__name__}:student"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("compress")
    paths = digits.write_digits_npz(folder)
    xt, yt, _, _ = digits.digits_split()
    teacher = digits.trained_teacher(xt, yt)
    paths["teacher"] = digits.save_pt2(teacher, folder / "teacher.pt2")
    paths["folder"] = folder
    return paths


def _state(path: Path) -> dict[str, np.ndarray]:
    program = torch.export.load(str(path))
    return {k: v.detach().numpy().copy() for k, v in program.state_dict.items()}


def _model_bytes(package: Path) -> int:
    pkg = open_package(package)
    return pkg.manifest.files[pkg.manifest.model_file].size


def test_distilled_student_is_small_and_keeps_the_accuracy(work: dict[str, Path]) -> None:
    out = work["folder"] / "student.pt2"
    doc = cli_json(run_cli("distill", "--teacher", work["teacher"], "--student", STUDENT,
                           "--data", work["train"], "--eval", work["eval"], "--temperature", "4",
                           "--alpha", "0.7", "--epochs", "15", "--seed", "0", "-o", out, "--json"))
    teacher, student = doc["teacher"], doc["student"]
    assert teacher["parameters"] >= 4 * student["parameters"]
    assert doc["parameter_ratio"] == pytest.approx(teacher["parameters"] / student["parameters"])
    assert student["accuracy"] >= 0.95 * teacher["accuracy"]
    assert teacher["accuracy"] > 0.9
    assert student["program_bytes"] == out.stat().st_size
    assert len(doc["loss"]) == 15 and doc["loss"][-1] < doc["loss"][0]

    # The student feeds convert, and its package scores what distill reported.
    pkg = work["folder"] / "student.edgepkg"
    assert run_cli("convert", out, "--to", "onnx", "--eval", work["eval"], "-o", pkg).exit_code == 0
    scored = cli_json(run_cli("evaluate", pkg, "--data", work["eval"], "--json"))
    assert scored["accuracy"] == pytest.approx(student["accuracy"], abs=1 / 360 + 1e-9)

    # And it feeds optimize.
    best = work["folder"] / "student-best.edgepkg"
    opt = cli_json(run_cli("optimize", out, "--eval", work["eval"], "--candidates",
                           "fp32,dynamic-per-channel", "--latency-runs", "5", "--no-plot",
                           "-o", best, "--json"))
    assert opt["chosen"] in {"onnx:fp32", "onnx:dynamic-per-channel"} and best.exists()


def test_distillation_is_deterministic_for_a_seed(work: dict[str, Path],
                                                  tmp_path: Path) -> None:
    outs = {}
    for tag, seed in (("a", 3), ("b", 3), ("c", 4)):
        outs[tag] = tmp_path / f"{tag}.pt2"
        distill(work["teacher"], STUDENT, data=work["train"], epochs=2, seed=seed,
                output=outs[tag])
    a, b, c = (_state(outs[t]) for t in "abc")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert any(not np.array_equal(a[name], c[name]) for name in a)


def test_structured_pruning_removes_channels_and_shrinks_the_artifact(
        work: dict[str, Path]) -> None:
    out = work["folder"] / "pruned.pt2"
    doc = cli_json(run_cli("prune", work["teacher"], "--sparsity", "0.5", "--structured",
                           "--finetune", work["train"], "--epochs", "2", "--eval", work["eval"],
                           "-o", out, "--json"))
    before, after = doc["before"], doc["after"]
    assert after["parameters"] < 0.5 * before["parameters"]
    assert after["program_bytes"] < before["program_bytes"]
    assert {(g["layer"], g["channels"], g["kept"]) for g in doc["layers"]} == {
        ("conv1", 16, 8), ("conv2", 32, 16), ("fc1", 64, 32)}
    assert doc["skipped"] == {"fc2": "it feeds the model output"}
    assert after["accuracy"] >= before["accuracy"] - 0.05
    # The channels are really gone from the saved program, the reshape included.
    state = _state(out)
    assert state["conv2.weight"].shape == (16, 8, 3, 3)
    assert state["bn2.running_var"].shape == (16,)
    assert state["fc1.weight"].shape == (32, 16 * 4 * 4)

    packages = {}
    for tag, source in (("full", work["teacher"]), ("pruned", out)):
        packages[tag] = work["folder"] / f"{tag}.edgepkg"
        result = run_cli("convert", source, "--to", "onnx", "--eval", work["eval"],
                         "-o", packages[tag])
        assert result.exit_code == 0, result.output
    assert _model_bytes(packages["pruned"]) < 0.5 * _model_bytes(packages["full"])


def test_unstructured_pruning_zeroes_the_smallest_weights_and_keeps_them_zero(
        work: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sparse.pt2"
    rep = prune(work["teacher"], sparsity=0.5, structured=False, output=out,
                finetune=work["train"], epochs=1, eval_data=work["eval"])
    weights = {layer["layer"]: layer for layer in rep.layers}
    total = sum(layer["weights"] for layer in weights.values())
    zeros = sum(layer["weights"] * layer["zeros"] for layer in weights.values())
    assert zeros == pytest.approx(0.5 * total, abs=1)
    assert rep.after.parameters == rep.before.parameters
    assert rep.compressed_bytes["after"] < rep.compressed_bytes["before"]
    state = _state(out)
    # Fine-tuning ran, yet the pruned weights are still zero.
    saved_zeros = sum(int((state[f"{name}.weight"] == 0).sum()) for name in weights)
    assert saved_zeros >= int(0.5 * total) - 1
    assert rep.finetune is not None and len(rep.finetune["loss"]) == 1


class _Residual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = h + self.c(torch.relu(self.b(h)))
        return self.head(h.mean(dim=(2, 3)))


def test_structured_plan_leaves_residual_branches_alone() -> None:
    program = torch.export.export(_Residual().eval(), (torch.zeros(2, 1, 8, 8),))
    groups, skipped = plan_groups(program.module())
    assert [g.layer for g in groups] == ["b"]
    assert set(skipped) == {"a", "c", "head"}
    assert "add" in skipped["a"] and "add" in skipped["c"]
    assert skipped["head"] == "it feeds the model output"


def test_nothing_to_prune_is_a_clear_error(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    source = digits.save_pt2(model, tmp_path / "linear.pt2")
    out = tmp_path / "pruned.pt2"
    with pytest.raises(ConversionError, match="no layer can lose channels"):
        prune(source, sparsity=0.5, structured=True, output=out,
              example={"x": np.zeros((1, 1, 8, 8), np.float32)})
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--student", "zoo.no_such_module:student"], 2, "cannot import"),
        (["--student", f"{digits.__name__}:missing"], 2, "no callable"),
        (["--student", f"{digits.__name__}:not_a_module"], 2, "not an nn.Module"),
        (["--student", STUDENT, "--alpha", "1.5"], 2, "--alpha"),
        (["--student", STUDENT, "--temperature", "0"], 2, "--temperature"),
        (["--student", STUDENT, "--data-unlabelled"], 1, "no labels"),
    ],
)
def test_distill_bad_input(work: dict[str, Path], tmp_path: Path, args: list[str], code: int,
                           needle: str) -> None:
    out = tmp_path / "student.pt2"
    data = work["train"]
    if "--data-unlabelled" in args:
        args = [a for a in args if a != "--data-unlabelled"]
        data = work["unlabelled"]
    result = run_cli("distill", "--teacher", work["teacher"], "--data", data, "--epochs", "1",
                     "-o", out, *args)
    assert result.exit_code == code, result.output
    assert needle in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--sparsity", "1.5"], 2, "--sparsity"),
        (["--sparsity", "0"], 2, "--sparsity"),
        (["--sparsity", "0.5", "--epochs", "2"], 2, "--epochs needs --finetune"),
        (["--sparsity", "0.5", "--finetune", "UNLABELLED", "--epochs", "1"], 1, "no labels"),
    ],
)
def test_prune_bad_input(work: dict[str, Path], tmp_path: Path, args: list[str], code: int,
                         needle: str) -> None:
    out = tmp_path / "pruned.pt2"
    args = [str(work["unlabelled"]) if a == "UNLABELLED" else a for a in args]
    result = run_cli("prune", work["teacher"], "-o", out, *args)
    assert result.exit_code == code, result.output
    assert needle in result.output
    assert not out.exists()


def test_prune_refuses_a_model_that_is_not_pytorch(work: dict[str, Path],
                                                   tmp_path: Path) -> None:
    converted = run_cli("convert", work["teacher"], "--to", "onnx", "--eval", work["eval"],
                        "-o", tmp_path / "t.edgepkg")
    assert converted.exit_code == 0, converted.output
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(open_package(tmp_path / "t.edgepkg").model_bytes())
    out = tmp_path / "pruned.pt2"
    result = run_cli("prune", onnx_path, "--sparsity", "0.5", "--eval", work["eval"], "-o", out)
    assert result.exit_code == 2, result.output
    assert "takes PyTorch models" in result.output
    assert not out.exists()


def test_human_reports(work: dict[str, Path], tmp_path: Path) -> None:
    pruned = run_cli("prune", work["teacher"], "--sparsity", "0.3", "--eval", work["eval"],
                     "-o", tmp_path / "p.pt2")
    assert pruned.exit_code == 0, pruned.output
    for word in ("unstructured pruning at sparsity 0.3", "parameters", ".pt2 size",
                 "latency p50", "accuracy", "weights zero", "wrote"):
        assert word in pruned.output
    distilled = run_cli("distill", "--teacher", work["teacher"], "--student", STUDENT,
                        "--data", work["train"], "--epochs", "1", "-o", tmp_path / "s.pt2")
    assert distilled.exit_code == 0, distilled.output
    for word in ("teacher", "student", "x fewer", "latency p50", "accuracy", "wrote"):
        assert word in distilled.output


def test_an_onnx_teacher_works_too(work: dict[str, Path], tmp_path: Path) -> None:
    converted = run_cli("convert", work["teacher"], "--to", "onnx", "--eval", work["eval"],
                        "-o", tmp_path / "t.edgepkg")
    assert converted.exit_code == 0, converted.output
    onnx_teacher = tmp_path / "teacher.onnx"
    onnx_teacher.write_bytes(open_package(tmp_path / "t.edgepkg").model_bytes())
    rep = distill(onnx_teacher, STUDENT, data=work["train"], eval_data=work["eval"],
                  epochs=3, seed=0, output=tmp_path / "s.pt2")
    assert rep.teacher["framework"] == "onnx" and rep.teacher["accuracy"] > 0.9
    assert rep.teacher["bytes"] == onnx_teacher.stat().st_size
    assert rep.parameter_ratio is None
    assert rep.student.accuracy is not None and rep.student.accuracy > 0.5
