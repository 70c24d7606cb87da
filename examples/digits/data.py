"""The digits data set (scikit-learn's bundled 8x8 images), split and saved as .npz files.

Images are scaled to [0, 1] and shaped (N, 1, 8, 8) for PyTorch (channels first) and
(N, 8, 8, 1) for Keras (channels last). Drift for the demo: rotations and noise.
"""

from __future__ import annotations

from pathlib import Path

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
