"""A tiny torch.export program with a dynamic batch and data for it, shared by the first-hour
tests (what a new user converts first)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def first(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    root = tmp_path_factory.mktemp("first-hour")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(Net().eval(), (torch.zeros(2, 64),),
                                  dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(root / "model.pt2"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    np.savez(root / "eval.npz", x=x, y=rng.integers(0, 10, 64))
    np.savez(root / "wrong_shape.npz", x=rng.standard_normal((64, 32)).astype(np.float32))
    np.savez(root / "int64.npz", x=rng.integers(0, 4, (64, 64)))
    return {"root": root, "pt2": root / "model.pt2", "eval": root / "eval.npz",
            "wrong": root / "wrong_shape.npz", "int64": root / "int64.npz"}
