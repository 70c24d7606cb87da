"""Digits models for the compression tests: a teacher CNN, a small student, and a model
built so that plain int8 quantization breaks it.

The factories take no arguments, so ``zoo.digits:student`` style specs can name them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F


def digits_split(eval_count: int = 360) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 [N, 1, 8, 8] in [0, 1], shuffled once with a fixed seed."""
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return x[eval_count:], y[eval_count:], x[:eval_count], y[:eval_count]


class TeacherCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        # A literal reshape (not flatten) so that pruning must adjust the reshape too.
        x = x.reshape(-1, 32 * 4 * 4)
        return self.fc2(F.relu(self.fc1(x)))


class StudentMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class OutlierMLP(nn.Module):
    """An MLP whose third layer has two units with activations near 2,000.

    The outlier units feed the classifier through weights that cancel, so in float they do
    no harm. Every int8 scheme quantizes activations per tensor: the third layer's output
    (static QDQ) and the classifier's input (static and dynamic) get a step of about
    2000/255, which wipes out the informative units (values below 10). Keeping the last two
    layers in float restores the accuracy; the first two stay int8.
    """

    def __init__(self, extra: int = 0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, 16 + extra)
        self.fc4 = nn.Linear(16 + extra, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))
        return self.fc4(F.relu(self.fc3(x)))


def teacher() -> nn.Module:
    return TeacherCNN()


def student() -> nn.Module:
    return StudentMLP()


def not_a_module() -> int:
    return 3


def trained_teacher(x: np.ndarray, y: np.ndarray, *, epochs: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return train_classifier(teacher(), x, y, epochs=epochs, seed=0)


def train_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int,
                     seed: int = 0, lr: float = 3e-3) -> nn.Module:
    """Plain cross-entropy training, seeded; returns the model in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(yt), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def make_outlier_model(x: np.ndarray, y: np.ndarray, *, outlier: float = 30000.0) -> nn.Module:
    """Train an OutlierMLP, then add two outlier units that leave its outputs unchanged.

    The new units of ``fc3`` sit at ``outlier`` on every sample (so ReLU passes them) and
    ``fc4`` reads them with weights that cancel: the float model predicts exactly as the
    trained one.
    """
    torch.manual_seed(1)
    trained = train_classifier(OutlierMLP(), x, y, epochs=30, seed=1)
    model = OutlierMLP(extra=2)
    with torch.no_grad():
        model.fc1.load_state_dict(trained.fc1.state_dict())
        model.fc2.load_state_dict(trained.fc2.state_dict())
        model.fc3.weight.zero_()
        model.fc3.bias.fill_(outlier)
        model.fc3.weight[:16] = trained.fc3.weight
        model.fc3.bias[:16] = trained.fc3.bias
        model.fc4.weight[:, :16] = trained.fc4.weight
        model.fc4.weight[:, 16] = 1e-3
        model.fc4.weight[:, 17] = -1e-3
        model.fc4.bias.copy_(trained.fc4.bias)
    return model.eval()


def write_digits_npz(folder: Path) -> dict[str, Path]:
    """train.npz, eval.npz (labelled), calib.npz and eval_unlabelled.npz under ``folder``."""
    xt, yt, xe, ye = digits_split()
    paths = {name: folder / f"{name}.npz" for name in ("train", "eval", "calib", "unlabelled")}
    np.savez(paths["train"], x=xt, y=yt)
    np.savez(paths["eval"], x=xe, y=ye)
    np.savez(paths["calib"], x=xt[:300])
    np.savez(paths["unlabelled"], x=xe)
    return paths


def save_pt2(model: nn.Module, path: Path) -> Path:
    """Save a model as a torch.export program with a dynamic batch dimension."""
    example = (torch.zeros(2, 1, 8, 8),)
    program = torch.export.export(model.eval(), example,
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path
