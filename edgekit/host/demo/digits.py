"""The digits data set and CNN shared by the example, the benchmarks and the demo.

Data: scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1], shaped (N, 1, 8, 8)
for PyTorch (channels first) and (N, 8, 8, 1) for Keras (channels last). Drift for the demo:
rotations and noise. Models: a small CNN in PyTorch and in Keras, with short training loops.
torch, keras and scikit-learn are imported inside the functions that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekit.data import save_npz


def load_digits_split(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train / calibration / eval splits of the 1,797 images, channels-first float32."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    return {
        "train": (x[:1200], y[:1200]),
        "calib": (x[1200:1400], y[1200:1400]),
        "eval": (x[1400:], y[1400:]),
    }


def to_channels_last(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def write_npz_files(folder: Path, *, channels_last: bool = False,
                    input_name: str = "x") -> dict[str, Path]:
    """Write calib.npz and eval.npz (labels under y) for one layout; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    split = load_digits_split()
    paths = {}
    suffix = "_nhwc" if channels_last else ""
    for part in ("calib", "eval", "train"):
        x, y = split[part]
        if channels_last:
            x = to_channels_last(x)
        path = folder / f"{part}{suffix}.npz"
        save_npz(path, {input_name: x}, y)
        paths[part] = path
    return paths


def drift(x: np.ndarray, angle_deg: float, noise: float, seed: int = 0) -> np.ndarray:
    """Rotate channels-first 8x8 images by ``angle_deg`` and add Gaussian noise."""
    from scipy.ndimage import rotate

    rng = np.random.default_rng(seed)
    rotated = rotate(x, angle_deg, axes=(2, 3), reshape=False, order=1, mode="constant")
    noisy = rotated + rng.normal(0.0, noise, size=x.shape)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


# Drift strengths (angle in degrees, noise) of the accuracy-estimate set: the clean images
# and copies from slight to beyond the demo's own drift (25 to 45 degrees, noise 0.15).
ESTIMATE_STRENGTHS = ((5, 0.05), (15, 0.05), (15, 0.1), (25, 0.1), (35, 0.15), (45, 0.2))


def drift_each(x: np.ndarray, angle: float, noise: float, seed: int) -> np.ndarray:
    """Each image rotated by its own random angle within ``angle`` +- 10 degrees, either
    way, and Gaussian noise added (:func:`drift`); ``angle`` 0 and ``noise`` 0: unchanged."""
    if angle == 0 and noise == 0:
        return x
    rng = np.random.default_rng(seed)
    angles = rng.uniform(max(angle - 10, 0), angle + 10, size=len(x)) \
        * rng.choice([-1, 1], size=len(x))
    return np.concatenate([drift(x[i:i + 1], float(a), noise, seed=seed * 100000 + i)
                           for i, a in enumerate(angles)])


def estimate_set(x: np.ndarray, y: np.ndarray, seed: int = 1000,
                 strengths: tuple[tuple[float, float], ...] = ESTIMATE_STRENGTHS
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled data for the package's accuracy estimate: ``x`` clean plus one copy per
    strength (angle, noise) of :func:`drift_each`, drawn with seeds from ``seed`` on (keep
    them apart from the seeds that draw the data the estimate is judged on); the images, the
    labels and each image's group (0 for the clean copy, k for the k-th strength)."""
    xs = [x] + [drift_each(x, a, n, seed + k) for k, (a, n) in enumerate(strengths)]
    return np.concatenate(xs), np.tile(y, len(xs)), np.repeat(np.arange(len(xs)), len(x))


def torch_cnn() -> Any:
    """A small CNN for 1x8x8 digits: `examples.digits.models:torch_cnn` as a factory."""
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            )
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
                                      nn.Linear(64, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    return DigitsCNN()


def train_torch(model: Any, x: np.ndarray, y: np.ndarray, *, epochs: int = 15,
                seed: int = 0, lr: float = 3e-3) -> Any:
    """Train with Adam on channels-first images; returns the model in eval mode."""
    import torch

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def keras_cnn(seed: int = 0) -> Any:
    """The same CNN in Keras, channels last (8x8x1), its initial weights drawn from ``seed``."""
    import keras

    keras.utils.set_random_seed(seed)  # the layers draw their weights as they are built
    return keras.Sequential([
        keras.Input((8, 8, 1), name="x"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])


def train_keras(model: Any, x_nhwc: np.ndarray, y: np.ndarray, *, epochs: int = 15,
                seed: int = 0) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x_nhwc, y, epochs=epochs, batch_size=64, verbose=0)
    return model
