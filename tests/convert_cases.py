"""Tiny models for every (source framework, target, quantization mode) the converters declare.

``CASES`` maps each triple to a builder: a function that takes a scratch folder and returns a
:class:`CaseModel` (the source to convert, calibration and labelled evaluation data, and the
options the case needs). ``tests/test_convert_registry.py`` converts every row and fails when
a registered triple has no row. To cover a new backend, add one builder per source framework
(if it is new) and one row per triple.

Models are trained once per test session (``functools.cache``); the digits data are
scikit-learn's bundled 8x8 images.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.data import Dataset

QUANT_MODES = ("none", "fp16", "dynamic", "int8")


@dataclass
class CaseModel:
    """What one case converts, with the data to calibrate and check it."""

    source: Any
    calibration: Dataset
    eval: Dataset
    options: dict[str, Any] = field(default_factory=dict)
    max_accuracy_drop: float = 0.02


Builder = Callable[[Path], CaseModel]


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Digits images as float32 NCHW in [0, 1], and labels (int64), in a fixed shuffle."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    return x[order], y[order]


def digits_split() -> tuple[Dataset, Dataset, tuple[np.ndarray, np.ndarray]]:
    """Calibration (300 training images), evaluation (the last 397 images, labelled), and
    the training arrays."""
    x, y = digits()
    train = (x[:1400], y[:1400])
    calib = Dataset({"x": x[:300]}, None, "digits calibration")
    evald = Dataset({"x": x[1400:]}, y[1400:], "digits evaluation")
    return calib, evald, train


def digits_cnn_class() -> type:
    """The small digits CNN (built lazily so importing this file does not import torch)."""
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.fc1 = nn.Linear(32 * 2 * 2, 64)
            self.fc2 = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
            return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    return DigitsCNN


@functools.cache
def trained_digits_state() -> dict[str, Any]:
    """A state_dict of the digits CNN after a few epochs (about 97% on held-out images)."""
    import torch

    torch.manual_seed(0)
    _, _, (x, y) = digits_split()
    model = digits_cnn_class()()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(12):
        perm = torch.randperm(len(yt))
        for i in range(0, len(yt), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_digits_cnn() -> Any:
    """A fresh trained digits CNN in eval mode."""
    model = digits_cnn_class()()
    model.load_state_dict(trained_digits_state())
    return model.eval()


def pytorch_digits(tmp: Path) -> CaseModel:
    """Source framework ``pytorch``: the trained CNN as an in-memory module."""
    calib, evald, _ = digits_split()
    return CaseModel(trained_digits_cnn(), calib, evald, {"exporter": "torchscript"})


def onnx_digits(tmp: Path) -> CaseModel:
    """Source framework ``onnx``: the trained CNN exported to an .onnx file."""
    path = export_digits_onnx(tmp / "digits.onnx")
    calib, evald, _ = digits_split()
    return CaseModel(path, calib, evald)


def export_digits_onnx(path: Path, opset: int = 17) -> Path:
    """Write the trained CNN as a float ONNX file with a symbolic batch."""
    import io
    import warnings

    import torch

    model = trained_digits_cnn()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), buf, dynamo=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=opset)
    path.write_bytes(buf.getvalue())
    return path


def keras_digits_data() -> tuple[Dataset, Dataset, tuple[np.ndarray, np.ndarray]]:
    """The digits split of :func:`digits_split` in channels-last layout [N, 8, 8, 1], as
    Keras convolutions want it."""
    x, y = digits()
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    calib = Dataset({"x": x[:300]}, None, "digits calibration (NHWC)")
    evald = Dataset({"x": x[1400:]}, y[1400:], "digits evaluation (NHWC)")
    return calib, evald, (x[:1400], y[:1400])


def keras_digits_cnn_model() -> Any:
    """The small Keras digits CNN, untrained: input ``image`` [batch, 8, 8, 1], output
    ``logits`` [batch, 10]."""
    import keras

    inp = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(10, name="logits")(h)
    return keras.Model(inp, out, name="digits_cnn")


@functools.cache
def trained_keras_digits_weights() -> list[np.ndarray]:
    """Weights of the Keras digits CNN after a few seeded epochs (about 95% held out)."""
    import keras

    keras.utils.set_random_seed(0)
    _, _, (x, y) = keras_digits_data()
    model = keras_digits_cnn_model()
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=10, batch_size=32, verbose=0)
    return [np.array(w) for w in model.get_weights()]


def trained_keras_digits() -> Any:
    """A fresh trained Keras digits CNN."""
    model = keras_digits_cnn_model()
    model.set_weights(trained_keras_digits_weights())
    return model


def keras_digits(tmp: Path) -> CaseModel:
    """Source framework ``keras``: the trained Keras CNN saved as a ``.keras`` file."""
    path = tmp / "digits.keras"
    trained_keras_digits().save(path)
    calib, evald, _ = keras_digits_data()
    return CaseModel(path, calib, evald)


CASES: dict[tuple[str, str, str], Builder] = {
    **{("pytorch", "onnx", mode): pytorch_digits for mode in QUANT_MODES},
    **{("onnx", "onnx", mode): onnx_digits for mode in QUANT_MODES},
    **{("keras", "onnx", mode): keras_digits for mode in QUANT_MODES},
    **{("keras", "tflite", mode): keras_digits for mode in QUANT_MODES},
    **{("pytorch", "tflite", mode): pytorch_digits for mode in QUANT_MODES},
}
