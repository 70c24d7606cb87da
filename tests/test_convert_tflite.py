"""The TFLite target: Keras (.keras, SavedModel folder, in-memory) and PyTorch sources, every
quantization mode, each artifact run by the real LiteRT interpreter.

Each conversion is done once per module and shared; the checks compare the artifact with the
source model directly and with what the manifest claims.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import torch
from ai_edge_litert.interpreter import Interpreter
from convert_cases import (
    digits_split,
    keras_digits_data,
    trained_digits_cnn,
    trained_keras_digits,
)

from converters import ConvertOptions, convert, load_source, run_batches
from converters.targets.tflite_target import TFLiteTarget
from edgekit.artifact import open_package
from edgekit.data import Dataset, save_npz
from edgekit.errors import ConversionError, DataError, ModelError, UsageError
from edgekit.runtimes import RuntimeOptions, load_session
from edgekit.runtimes.litert import LiteRTBackend

MODES = [("none", False), ("dynamic", False), ("fp16", False), ("int8", False), ("int8", True)]


def mode_id(mode: tuple[str, bool]) -> str:
    return mode[0] + ("-int8io" if mode[1] else "")


def named(data: Dataset, name: str) -> Dataset:
    return Dataset({name: data.inputs["x"]}, data.labels, data.source)


@pytest.fixture(scope="module")
def data() -> dict[str, Dataset]:
    """Digits in NHWC for Keras: 300 calibration samples, 397 labelled evaluation samples."""
    calib, evald, _ = keras_digits_data()
    return {"calib": named(calib, "image"), "eval": named(evald, "image")}


@pytest.fixture(scope="module")
def kmodel() -> Any:
    return trained_keras_digits()


@pytest.fixture(scope="module")
def files(kmodel: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keras-src")
    kfile = root / "digits.keras"
    kmodel.save(kfile)
    saved = root / "digits_savedmodel"
    kmodel.export(str(saved), verbose=False)
    return {"keras": kfile, "saved_model": saved}


class Conversions:
    """Converts on first use and keeps the result for the rest of the module."""

    def __init__(self, root: Path, sources: dict[str, Any],
                 datasets: dict[str, dict[str, Dataset]]) -> None:
        self.root = root
        self.sources = sources
        self.datasets = datasets
        self.done: dict[tuple[str, str, bool], Any] = {}

    def get(self, kind: str, quantize: str, int8_io: bool = False) -> Any:
        key = (kind, quantize, int8_io)
        if key not in self.done:
            data = self.datasets[kind]
            opts = ConvertOptions(target="tflite", quantize=quantize, int8_io=int8_io,
                                  latency_runs=3)
            self.done[key] = convert(self.sources[kind], opts,
                                     output=self.root / f"{kind}-{quantize}-{int8_io}.edgepkg",
                                     calibration=data["calib"], eval_data=data["eval"])
        return self.done[key]


@pytest.fixture(scope="module")
def torch_data() -> dict[str, Dataset]:
    """Digits in NCHW; the CNN's forward argument (and so its input) is ``x``."""
    calib, evald, _ = digits_split()
    return {"calib": calib, "eval": evald}


@pytest.fixture(scope="module")
def tmodel() -> torch.nn.Module:
    return trained_digits_cnn()


@pytest.fixture(scope="module")
def conv(tmp_path_factory: pytest.TempPathFactory, data: dict[str, Dataset],
         torch_data: dict[str, Dataset], kmodel: Any, files: dict[str, Path],
         tmodel: torch.nn.Module) -> Conversions:
    sources = {"keras": files["keras"], "saved_model": files["saved_model"],
               "object": kmodel, "torch": tmodel}
    datasets = {"keras": data, "saved_model": data, "object": data, "torch": torch_data}
    return Conversions(tmp_path_factory.mktemp("tflite"), sources, datasets)


def session_of(path: Path) -> Any:
    pkg = open_package(path)
    return pkg, load_session(pkg.manifest, pkg.model_bytes(), RuntimeOptions(threads=1))


def keras_logits(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False))


def torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# --- Keras sources, every mode ------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_keras_file_every_mode_runs_in_litert(conv: Conversions, data: dict[str, Dataset],
                                              kmodel: Any, mode: tuple[str, bool]) -> None:
    quantize, int8_io = mode
    res = conv.get("keras", quantize, int8_io)
    pkg, session = session_of(res.path)
    m = pkg.manifest
    assert m.format.value == "tflite" and m.model_file == "model.tflite"
    assert m.target["runtime"] == "litert" and m.target["batch"] == "dynamic"
    assert m.source["framework"] == "keras" and m.recipe["quantize"] == quantize
    assert [s.name for s in m.inputs] == ["image"] and m.inputs[0].shape == ["batch", 8, 8, 1]
    assert [s.name for s in m.outputs] == ["logits"]
    # The operators are the model's own (no delegate nodes): float16 weights are dequantized
    # at load, and int8 with float I/O dequantizes its output.
    ops = m.target["ops"]
    assert "CONV_2D" in ops and "DELEGATE" not in ops
    assert ("DEQUANTIZE" in ops) == (quantize == "fp16" or (quantize == "int8" and not int8_io))

    ev = data["eval"]
    out = run_batches(session.run, ev)["logits"]
    ref = keras_logits(kmodel, ev.inputs["image"])
    # The manifest's accuracy is what the artifact scores here, and the source's what Keras
    # scores on the same data.
    acc = float(np.mean(out.argmax(1) == ev.labels))
    src_acc = float(np.mean(ref.argmax(1) == ev.labels))
    assert m.metrics["accuracy"]["artifact"]["accuracy"] == pytest.approx(acc)
    assert m.metrics["accuracy"]["source"]["accuracy"] == pytest.approx(src_acc)
    assert src_acc > 0.9
    assert m.metrics["parity"]["passed"], m.metrics["parity"]["failures"]
    err = float(np.abs(out - ref).max())
    assert m.metrics["parity"]["max_abs_error"] == pytest.approx(err, rel=1e-3, abs=1e-6)
    agree = float(np.mean(out.argmax(1) == ref.argmax(1)))
    if quantize == "none":
        assert err < 1e-4
    elif quantize == "fp16":
        assert err < 2e-2 and agree == 1.0
    else:
        assert agree >= 0.97 and src_acc - acc <= 0.02
        assert 0 < err < 0.1 * float(ref.max() - ref.min())

    # The golden samples in the package are what this runtime gives on their inputs.
    g_in, g_out = pkg.golden()
    np.testing.assert_allclose(session.run(g_in)["logits"], g_out["logits"], rtol=1e-5, atol=1e-5)


def test_keras_sizes_shrink_with_quantization(conv: Conversions) -> None:
    sizes = {mode_id(m): conv.get("keras", *m).manifest.metrics["size"]["artifact_model_bytes"]
             for m in MODES}
    for key, size in sizes.items():
        if key != "none":
            assert size < sizes["none"], sizes
    assert sizes["dynamic"] < sizes["fp16"], sizes


def test_keras_int8_io_records_quantization_and_dequantizes(
        conv: Conversions, data: dict[str, Dataset], kmodel: Any) -> None:
    res = conv.get("keras", "int8", True)
    pkg, session = session_of(res.path)
    (inp,), (outp,) = pkg.manifest.inputs, pkg.manifest.outputs
    assert inp.dtype == "int8" and outp.dtype == "int8"
    assert inp.quantization is not None and outp.quantization is not None
    assert inp.quantization.scale > 0 and outp.quantization.scale > 0

    # The raw interpreter agrees with the manifest on the I/O quantization ...
    interp = Interpreter(model_content=pkg.model_bytes())
    d_in, d_out = interp.get_input_details()[0], interp.get_output_details()[0]
    assert d_in["dtype"] == np.int8 and d_out["dtype"] == np.int8
    assert d_in["quantization"] == pytest.approx((inp.quantization.scale,
                                                   inp.quantization.zero_point))
    assert d_out["quantization"] == pytest.approx((outp.quantization.scale,
                                                    outp.quantization.zero_point))

    # ... and quantizing by hand with the manifest's parameters gives what the session gives.
    x = data["eval"].inputs["image"][:32]
    q = inp.quantization
    xq = np.clip(np.round(x / q.scale + q.zero_point), -128, 127).astype(np.int8)
    interp.resize_tensor_input(d_in["index"], xq.shape)
    interp.allocate_tensors()
    interp.set_tensor(d_in["index"], xq)
    interp.invoke()
    raw = interp.get_tensor(interp.get_output_details()[0]["index"])
    assert raw.dtype == np.int8
    deq = (raw.astype(np.float32) - outp.quantization.zero_point) * outp.quantization.scale
    got = session.run({"image": x})["logits"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, deq, rtol=1e-6, atol=1e-6)
    # The dequantized outputs are the float model's, within a few output quantization steps.
    ref = keras_logits(kmodel, x)
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.95
    assert np.abs(got - ref).max() < 20 * outp.quantization.scale


# --- the other Keras source kinds -------------------------------------------------------

@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_saved_model_folder_converts(conv: Conversions, data: dict[str, Dataset], kmodel: Any,
                                     files: dict[str, Path], quantize: str) -> None:
    res = conv.get("saved_model", quantize)
    pkg, session = session_of(res.path)
    m = pkg.manifest
    assert m.source["framework"] == "keras" and m.source["reference"] == str(files["saved_model"])
    # A SavedModel's names are its serving signature's.
    assert [s.name for s in m.inputs] == ["image"] and [s.name for s in m.outputs] == ["output_0"]
    out = run_batches(session.run, data["eval"])["output_0"]
    ref = keras_logits(kmodel, data["eval"].inputs["image"])
    agree = np.mean(out.argmax(1) == ref.argmax(1))
    assert agree == 1.0 if quantize == "none" else agree >= 0.97
    assert m.metrics["parity"]["passed"]


def test_in_memory_keras_model_converts(conv: Conversions, data: dict[str, Dataset],
                                        kmodel: Any) -> None:
    res = conv.get("object", "none")
    m = res.manifest
    assert m.source["framework"] == "keras" and m.source["reference"] == "in-memory Functional"
    # The sha256 of an in-memory model is taken over its weights: the same weights in another
    # object give the same digest, other weights another one.
    twin = trained_keras_digits()
    assert load_source(twin, ConvertOptions()).sha256 == m.source["sha256"]
    twin.get_layer("logits").bias.assign(np.ones(10, np.float32))
    assert load_source(twin, ConvertOptions()).sha256 != m.source["sha256"]
    x = data["eval"].inputs["image"][:50]
    _, session = session_of(res.path)
    np.testing.assert_allclose(session.run({"image": x})["logits"], keras_logits(kmodel, x),
                               atol=1e-4)


def test_multi_input_multi_output_names_map_to_tensors(tmp_path: Path) -> None:
    """Two inputs and two outputs: each manifest name reaches its own TFLite tensor, whatever
    order the interpreter lists them in."""
    keras.utils.set_random_seed(1)
    a = keras.Input((3,), name="alpha")
    b = keras.Input((5,), name="beta")
    h = keras.layers.Dense(4, name="mix")(keras.layers.Concatenate()([a * 10.0, b]))
    model = keras.Model([a, b], {"scores": h, "total": keras.ops.sum(h, axis=1, keepdims=True)})
    rng = np.random.default_rng(0)
    feeds = {"alpha": rng.standard_normal((20, 3)).astype(np.float32),
             "beta": rng.standard_normal((20, 5)).astype(np.float32)}
    res = convert(model, ConvertOptions(target="tflite", latency_runs=2), output=tmp_path / "m.edgepkg",
                  eval_data=Dataset(feeds, None, "random"))
    pkg, session = session_of(res.path)
    assert {s.name for s in pkg.manifest.inputs} == {"alpha", "beta"}
    assert {s.name for s in pkg.manifest.outputs} == {"scores", "total"}
    ref = model([feeds["alpha"], feeds["beta"]], training=False)
    got = session.run(feeds)
    for name in ("scores", "total"):
        np.testing.assert_allclose(got[name], np.asarray(ref[name]), atol=1e-4)
    # A manifest that lists the inputs and outputs in another order still maps by name.
    swapped = LiteRTBackend.load(pkg.model_bytes(), pkg.manifest.inputs[::-1],
                                 pkg.manifest.outputs[::-1], RuntimeOptions(threads=1))
    again = swapped.run(feeds)
    for name in ("scores", "total"):
        np.testing.assert_allclose(again[name], got[name], atol=0)


# --- PyTorch source -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_torch_every_mode_runs_in_litert(conv: Conversions, torch_data: dict[str, Dataset],
                                         tmodel: torch.nn.Module, mode: tuple[str, bool]) -> None:
    quantize, int8_io = mode
    res = conv.get("torch", quantize, int8_io)
    pkg, session = session_of(res.path)
    m = pkg.manifest
    assert m.source["framework"] == "pytorch" and m.recipe["converter"] == "litert_torch.convert"
    # litert-torch exports a fixed batch of 1; the session slices larger batches.
    assert m.target["batch"] == 1
    assert any("fixed batch of 1" in w for w in res.warnings)
    assert [s.name for s in m.inputs] == ["x"] and m.inputs[0].shape == ["batch", 1, 8, 8]
    assert [s.name for s in m.outputs] == ["output"]
    ev = torch_data["eval"]
    x = ev.inputs["x"]
    out = session.run({"x": x})["output"]  # the whole set in one call
    assert out.shape == (len(x), 10)
    ref = torch_logits(tmodel, x)
    acc = float(np.mean(out.argmax(1) == ev.labels))
    src_acc = float(np.mean(ref.argmax(1) == ev.labels))
    assert m.metrics["accuracy"]["artifact"]["accuracy"] == pytest.approx(acc)
    assert src_acc > 0.9 and m.metrics["parity"]["passed"], m.metrics["parity"]
    err = float(np.abs(out - ref).max())
    agree = float(np.mean(out.argmax(1) == ref.argmax(1)))
    if quantize == "none":
        assert err < 1e-4
    elif quantize == "fp16":
        assert err < 2e-2 and agree == 1.0
    else:
        # Quantized for real, and off by no more than a small part of the logits' spread
        # (evaluation logits may pass the calibrated range a little and clip there).
        assert 0 < err < 0.1 * float(ref.max() - ref.min())
        assert agree >= 0.97 and src_acc - acc <= 0.02
    interp = Interpreter(model_content=pkg.model_bytes())
    io_types = {interp.get_input_details()[0]["dtype"], interp.get_output_details()[0]["dtype"]}
    assert io_types == ({np.int8} if int8_io else {np.float32})
    if int8_io:
        assert m.inputs[0].quantization is not None and m.outputs[0].quantization is not None
    else:
        assert m.inputs[0].quantization is None and m.outputs[0].quantization is None


def test_torch_sizes_shrink_with_quantization(conv: Conversions) -> None:
    sizes = {mode_id(m): conv.get("torch", *m).manifest.metrics["size"]["artifact_model_bytes"]
             for m in MODES}
    assert all(size < sizes["none"] for key, size in sizes.items() if key != "none"), sizes


def _weight_scales(model: bytes) -> list[int]:
    """How many scales each int8 weight tensor carries (1: per tensor, more: per channel)."""
    interp = Interpreter(model_content=model)
    return [len(t["quantization_parameters"]["scales"]) for t in interp.get_tensor_details()
            if t["dtype"] == np.int8 and t["name"] and "serving" not in t["name"]
            and len(t["quantization_parameters"]["scales"])]


@pytest.mark.parametrize("kind", ["keras", "torch"])
def test_per_tensor_weights_when_per_channel_is_off(conv: Conversions, kind: str,
                                                   tmp_path: Path) -> None:
    per_channel = open_package(conv.get(kind, "dynamic").path).model_bytes()
    assert max(_weight_scales(per_channel)) > 1
    data = conv.datasets[kind]
    res = convert(conv.sources[kind], ConvertOptions(target="tflite", quantize="dynamic",
                                                     per_channel=False, latency_runs=2),
                  output=tmp_path / "pt.edgepkg", calibration=data["calib"],
                  eval_data=data["eval"])
    assert res.manifest.recipe["per_channel"] is False and res.report["parity"]["passed"]
    scales = _weight_scales(open_package(res.path).model_bytes())
    # Per tensor everywhere, except depthwise convolutions, which LiteRT's hybrid kernel only
    # runs right with per-channel scales (the torch CNN's first layer becomes one).
    exempt = res.manifest.recipe.get("per_channel_ops", [])
    assert 1 in scales and sum(n > 1 for n in scales) <= len(exempt)
    assert res.report["accuracy"]["drop"] <= 0.02


def test_pt2_with_fixed_batch_runs_in_padded_slices(tmp_path: Path, tmodel: torch.nn.Module,
                                                    torch_data: dict[str, Dataset]) -> None:
    """A torch.export program traced at batch 2 keeps that batch in TFLite; the session runs
    any batch (odd ones pad their last slice) and matches PyTorch.

    The backend is driven directly: the PyTorch source itself only runs whole batches of 2,
    which the pipeline's batch-1 latency probe does not give it.
    """
    path = tmp_path / "digits_b2.pt2"
    torch.export.save(torch.export.export(tmodel, (torch.zeros(2, 1, 8, 8),)), str(path))
    opts = ConvertOptions(target="tflite")
    src = load_source(path, opts, example={"x": torch_data["eval"].inputs["x"][:1]})
    res = TFLiteTarget.convert(src, opts, None, lambda _: None)
    assert res.runtime["batch"] == 2 and any("fixed batch of 2" in n for n in res.notes)
    session = LiteRTBackend.load(res.model, res.inputs, res.outputs, RuntimeOptions(threads=1))
    x = torch_data["eval"].inputs["x"]
    for count in (len(x), 1, 3):
        out = session.run({"x": x[:count]})["output"]
        np.testing.assert_allclose(out, torch_logits(tmodel, x[:count]), atol=1e-4)


# --- bad input ----------------------------------------------------------------------------

def _no_output(tmp_path: Path) -> None:
    assert not any(p.suffix == ".edgepkg" or ".tmp" in p.name for p in tmp_path.iterdir())


def test_corrupt_keras_files_are_model_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"this is not a zip archive")
    truncated = tmp_path / "truncated.keras"
    with zipfile.ZipFile(truncated, "w") as zf:
        zf.writestr("config.json", '{"class_name": "Functional"}')
    out = tmp_path / "out.edgepkg"
    with pytest.raises(ModelError, match="not a Keras 3 model archive") as e1:
        convert(garbage, ConvertOptions(target="tflite"), output=out)
    with pytest.raises(ModelError, match="cannot load Keras model .*truncated.keras") as e2:
        convert(truncated, ConvertOptions(target="tflite"), output=out)
    assert e1.value.exit_code == e2.value.exit_code == 1 and e1.value.hint and e2.value.hint
    _no_output(tmp_path)


def test_folder_that_is_not_a_saved_model(tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="not a TensorFlow SavedModel .*notes.txt"):
        convert(folder, ConvertOptions(target="tflite"), output=tmp_path / "out.edgepkg")
    _no_output(tmp_path)


def test_calibration_of_wrong_shape(tmp_path: Path, files: dict[str, Path]) -> None:
    calib = tmp_path / "calib.npz"
    save_npz(calib, {"image": np.zeros((10, 8, 8, 3), np.float32)})
    with pytest.raises(DataError, match=r"input 'image': expected shape \[batch, 8, 8, 1\],"
                                        r" found \[10, 8, 8, 3\]"):
        convert(files["keras"], ConvertOptions(target="tflite", quantize="int8"),
                output=tmp_path / "out.edgepkg", calibration=calib)
    _no_output(tmp_path)


def test_int8_without_calibration_data(tmp_path: Path, files: dict[str, Path],
                                       kmodel: Any) -> None:
    with pytest.raises(DataError, match="needs calibration data"):
        convert(files["keras"], ConvertOptions(target="tflite", quantize="int8"),
                output=tmp_path / "out.edgepkg")
    _no_output(tmp_path)
    # The backend itself refuses too, before any conversion starts.
    src = load_source(kmodel, ConvertOptions())
    with pytest.raises(DataError, match="needs calibration data"):
        TFLiteTarget.convert(src, ConvertOptions(target="tflite", quantize="int8"), None,
                             lambda _: None)


def test_calibration_method_other_than_minmax_is_refused(
        tmp_path: Path, files: dict[str, Path], data: dict[str, Dataset]) -> None:
    with pytest.raises(UsageError, match="entropy is not available for --to tflite") as err:
        convert(files["keras"], ConvertOptions(target="tflite", quantize="int8",
                                               calibration_method="entropy"),
                output=tmp_path / "out.edgepkg", calibration=data["calib"])
    assert err.value.exit_code == 2
    _no_output(tmp_path)


def test_model_with_ops_outside_tflite_builtins(tmp_path: Path) -> None:
    inp = keras.Input((4, 4), name="m")
    out = keras.layers.Lambda(lambda t: keras.ops.svd(t, compute_uv=False))(inp)
    with pytest.raises(ConversionError, match="ops outside the TFLite builtins: tf.Svd") as err:
        convert(keras.Model(inp, out), ConvertOptions(target="tflite"),
                output=tmp_path / "out.edgepkg")
    assert err.value.exit_code == 1 and "--to onnx" in (err.value.hint or "")
    _no_output(tmp_path)


def test_torch_token_ids_int8_calibrates_with_model_dtype(tmp_path) -> None:
    """litert-torch turns int64 token ids into int32 inputs; calibration must follow."""
    import numpy as np
    import torch

    from converters import ConvertOptions, convert
    from edgekit.data import Dataset

    class Embed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.out = torch.nn.Linear(16, 8)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(ids).mean(1))

    torch.manual_seed(0)
    ids = np.random.default_rng(0).integers(0, 50, (32, 6)).astype(np.int64)
    data = Dataset({"ids": ids}, None, "token ids")
    res = convert(Embed().eval(), ConvertOptions(target="tflite", quantize="int8", task="embedding"),
                  output=tmp_path / "e.edgepkg", calibration=data, eval_data=data)
    assert res.manifest.inputs[0].dtype == "int32"
    assert res.report["parity"]["passed"], res.report["parity"]
    assert res.report["parity"]["mean_cosine"] > 0.99
