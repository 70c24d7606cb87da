"""Keras and TensorFlow sources, and the Keras -> ONNX exporter run by onnxruntime.

The TFLite conversions of these sources are in test_convert_tflite.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf
import torch
from convert_cases import keras_digits_data, trained_keras_digits

from converters import ConvertOptions, convert, load_source, onnx_exporters
from converters.pipeline import source_sha256
from converters.sources.keras_source import KerasSource
from edgekit.artifact import open_package, sha256_file
from edgekit.data import Dataset
from edgekit.errors import ModelError, UsageError
from edgekit.runtimes import RuntimeOptions, load_session

EXPORT = onnx_exporters()["keras"]


def quiet(_: str) -> None:
    return None


@pytest.fixture(scope="module")
def kmodel() -> Any:
    return trained_keras_digits()


@pytest.fixture(scope="module")
def data() -> dict[str, Dataset]:
    calib, evald, _ = keras_digits_data()
    return {"calib": calib, "eval": evald}


@pytest.fixture(scope="module")
def files(kmodel: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keras-src")
    kfile = root / "digits.keras"
    kmodel.save(kfile)
    legacy = root / "digits.h5"
    kmodel.save(legacy)
    saved = root / "digits_savedmodel"
    kmodel.export(str(saved), verbose=False)
    return {"keras": kfile, "h5": legacy, "saved_model": saved}


@pytest.fixture(scope="module")
def tf_module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SavedModel written by plain TensorFlow (no Keras): two named inputs, two outputs."""

    class Blend(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="left"),
                                      tf.TensorSpec([None, 4], tf.float32, name="right")])
        def serve(self, left: Any, right: Any) -> dict[str, Any]:
            mixed = tf.matmul(left * 2.0 - right, self.w)
            return {"mixed": mixed, "norm": tf.reduce_sum(mixed * mixed, axis=1)}

    path = tmp_path_factory.mktemp("tfmodule") / "blend"
    module = Blend()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def logits(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False))


# --- sources ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_keras_file_source(files: dict[str, Path], kmodel: Any, data: dict[str, Dataset],
                           kind: str) -> None:
    src = load_source(files[kind], ConvertOptions())
    assert isinstance(src, KerasSource) and src.framework == "keras"
    assert [(s.name, s.dtype, s.shape) for s in src.inputs] == [("image", "float32",
                                                                 ["batch", 8, 8, 1])]
    assert [(s.name, s.shape) for s in src.outputs] == [("logits", ["batch", 10])]
    assert src.sha256 == sha256_file(files[kind])
    assert set(src.framework_version()) == {"keras", "tensorflow"}
    x = data["eval"].inputs["x"][:40]
    np.testing.assert_allclose(src.predict({"image": x})["logits"], logits(kmodel, x), atol=1e-5)


def test_saved_model_source_uses_the_serving_signature(files: dict[str, Path], kmodel: Any,
                                                       data: dict[str, Dataset]) -> None:
    src = load_source(files["saved_model"], ConvertOptions())
    assert isinstance(src, KerasSource) and src.model is None
    assert src.saved is not None and src.saved.signature == "serving_default"
    assert [(s.name, s.shape) for s in src.inputs] == [("image", ["batch", 8, 8, 1])]
    assert [(s.name, s.shape) for s in src.outputs] == [("output_0", ["batch", 10])]
    assert src.sha256 == source_sha256(files["saved_model"])
    x = data["eval"].inputs["x"][:40]
    np.testing.assert_allclose(src.predict({"image": x})["output_0"], logits(kmodel, x),
                               atol=1e-5)


def test_unbuilt_models_need_an_example_and_take_its_names() -> None:
    keras.utils.set_random_seed(2)
    seq = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(3)])
    with pytest.raises(ModelError, match="has not been built") as err:
        load_source(seq, ConvertOptions())
    assert "--input-shape" in (err.value.hint or "")
    src = load_source(seq, ConvertOptions(), example={"pixels": np.zeros((1, 2, 5), np.float32)})
    assert [(s.name, s.shape) for s in src.inputs] == [("pixels", ["batch", 2, 5])]
    assert [(s.name, s.shape) for s in src.outputs] == [("output_0", ["batch", 3])]


class TwoHeads(keras.Model):
    """A subclassed model (no functional inputs) returning a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = keras.layers.Dense(4)

    def call(self, x: Any) -> dict[str, Any]:
        z = self.dense(x)
        return {"score": z, "prob": keras.ops.softmax(z)}


def test_subclassed_model_with_dict_outputs_exports_to_onnx() -> None:
    keras.utils.set_random_seed(3)
    model = TwoHeads()
    x = np.random.default_rng(0).standard_normal((6, 7)).astype(np.float32)
    src = load_source(model, ConvertOptions(), example={"features": x[:1]})
    # dict outputs are laid out by sorted key, as keras.tree.flatten does
    assert [s.name for s in src.outputs] == ["prob", "score"]
    export = EXPORT(src, ConvertOptions(), quiet)
    sess = ort.InferenceSession(export.model, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["features"]
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"features": x}),
                   strict=True))
    ref = src.predict({"features": x})
    assert set(got) == {"prob", "score"}
    for name in got:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-5)
    np.testing.assert_allclose(got["prob"].sum(axis=1), 1.0, atol=1e-5)


# --- Keras -> ONNX exporter -------------------------------------------------------------

@pytest.mark.parametrize("opset", [17, 18])
def test_keras_file_to_onnx_runs_in_onnxruntime(files: dict[str, Path], kmodel: Any,
                                                data: dict[str, Dataset], opset: int) -> None:
    src = load_source(files["keras"], ConvertOptions())
    export = EXPORT(src, ConvertOptions(opset=opset), quiet)
    assert export.exporter == "keras.export(tf2onnx)" and export.tools["tf2onnx"]
    proto = onnx.load_from_string(export.model)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    # Weights live inside the model: no external-data references.
    assert not any(init.external_data for init in proto.graph.initializer)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("image", "logits")
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = ort.InferenceSession(export.model, providers=["CPUExecutionProvider"])
    x = data["eval"].inputs["x"]
    for count in (1, len(x)):  # the batch dimension is symbolic
        got = sess.run(None, {"image": x[:count]})[0]
        np.testing.assert_allclose(got, logits(kmodel, x[:count]), atol=1e-4)


def test_saved_model_folders_export_to_onnx(files: dict[str, Path], tf_module_dir: Path,
                                            kmodel: Any, data: dict[str, Dataset]) -> None:
    keras_saved = load_source(files["saved_model"], ConvertOptions())
    sess = ort.InferenceSession(EXPORT(keras_saved, ConvertOptions(), quiet).model,
                                providers=["CPUExecutionProvider"])
    x = data["eval"].inputs["x"][:50]
    assert [o.name for o in sess.get_outputs()] == ["output_0"]
    np.testing.assert_allclose(sess.run(None, {"image": x})[0], logits(kmodel, x), atol=1e-4)

    # A SavedModel that plain TensorFlow wrote, with two inputs and two outputs.
    blend = load_source(tf_module_dir, ConvertOptions())
    assert [s.name for s in blend.inputs] == ["left", "right"]
    assert [(s.name, s.shape) for s in blend.outputs] == [("mixed", ["batch", 3]),
                                                          ("norm", ["batch"])]
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((5, 4)).astype(np.float32) for n in ("left", "right")}
    sess = ort.InferenceSession(EXPORT(blend, ConvertOptions(), quiet).model,
                                providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    ref = blend.predict(feeds)
    expected = (feeds["left"] * 2 - feeds["right"]) @ np.linspace(-1, 1, 12).reshape(4, 3)
    np.testing.assert_allclose(ref["mixed"], expected, atol=1e-5)
    for name in ("mixed", "norm"):
        np.testing.assert_allclose(got[name], ref[name], atol=1e-4)


def test_tf_saved_model_converts_to_tflite(tf_module_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    feeds = {n: rng.standard_normal((20, 4)).astype(np.float32) for n in ("left", "right")}
    res = convert(tf_module_dir, ConvertOptions(target="tflite", task="regression",
                                                latency_runs=2),
                  output=tmp_path / "blend.edgepkg", eval_data=Dataset(feeds, None, "random"))
    pkg = open_package(res.path)
    session = load_session(pkg.manifest, pkg.model_bytes(), RuntimeOptions(threads=1))
    ref = load_source(tf_module_dir, ConvertOptions()).predict(feeds)
    got = session.run(feeds)
    for name in ("mixed", "norm"):
        np.testing.assert_allclose(got[name], ref[name], atol=1e-4)


def test_exporter_refuses_other_sources(tmp_path: Path) -> None:
    module = torch.nn.Linear(3, 2).eval()
    src = load_source(module, ConvertOptions(), example={"x": np.zeros((1, 3), np.float32)})
    with pytest.raises(UsageError, match="expected a Keras source"):
        EXPORT(src, ConvertOptions(), quiet)


# --- through the pipeline: Keras -> ONNX target -------------------------------------------

@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_keras_to_onnx_package(files: dict[str, Path], kmodel: Any, data: dict[str, Dataset],
                               tmp_path: Path, quantize: str) -> None:
    res = convert(files["keras"], ConvertOptions(target="onnx", quantize=quantize,
                                                 latency_runs=3),
                  output=tmp_path / f"{quantize}.edgepkg", calibration=data["calib"],
                  eval_data=data["eval"])
    pkg = open_package(res.path)
    m = pkg.manifest
    assert m.format.value == "onnx" and m.source["framework"] == "keras"
    assert m.recipe["exporter"] == "keras.export(tf2onnx)"
    assert [s.name for s in m.inputs] == ["image"] and [s.name for s in m.outputs] == ["logits"]
    session = load_session(m, pkg.model_bytes(), RuntimeOptions(threads=1))
    ev = data["eval"]
    x = ev.inputs["x"]
    out = session.run({"image": x})["logits"]
    ref = logits(kmodel, x)
    acc = float(np.mean(out.argmax(1) == ev.labels))
    assert m.metrics["accuracy"]["artifact"]["accuracy"] == pytest.approx(acc)
    assert m.metrics["parity"]["passed"], m.metrics["parity"]["failures"]
    if quantize == "none":
        np.testing.assert_allclose(out, ref, atol=1e-4)
    else:
        assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.97
        assert float(np.mean(ref.argmax(1) == ev.labels)) - acc <= 0.02
