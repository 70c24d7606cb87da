"""The digits CNN in PyTorch and in Keras, and small training loops for each."""

from __future__ import annotations

from typing import Any

import numpy as np


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


def keras_cnn() -> Any:
    """The same CNN in Keras, channels last (8x8x1)."""
    import keras

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
