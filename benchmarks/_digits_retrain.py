"""The digits CNN of the demo in three versions, as signed ONNX packages: a base, the base
with only its last layer retrained (on rotated, noisy images: a drift fix), and a full
retrain from another seed. Shared by benchmarks/delta_bench.py and the delta tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

__all__ = ["digits_packages"]


def digits_packages(folder: Path, sign_key: Any = None, *, name: str = "digits"
                    ) -> dict[str, Path]:
    """``{"base", "last_layer", "full"}``: package paths (versions 1.0.0, 1.1.0, 2.0.0)."""
    import torch

    from converters import ConvertOptions, convert
    from edgekit.data import Dataset
    from edgekit.host.demo.digits import drift, load_digits_split, torch_cnn, train_torch

    split = load_digits_split()
    (x, y), (cx, _), (ex, ey) = split["train"], split["calib"], split["eval"]
    base = train_torch(torch_cnn(), x, y, epochs=6, seed=0)
    head = copy.deepcopy(base)
    for param in head.parameters():
        param.requires_grad = False
    last = head.head[3]
    for param in last.parameters():
        param.requires_grad = True
    head.train()
    xd = torch.from_numpy(drift(x, 15.0, 0.05))
    opt = torch.optim.Adam(last.parameters(), lr=3e-3)
    for _ in range(3):
        for idx in torch.randperm(len(xd), generator=torch.Generator().manual_seed(1)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(xd[idx]), torch.from_numpy(y)[idx]).backward()
            opt.step()
    full = train_torch(torch_cnn(), x, y, epochs=6, seed=1)
    out = {}
    for key, model, version in (("base", base, "1.0.0"), ("last_layer", head.eval(), "1.1.0"),
                                ("full", full, "2.0.0")):
        path = folder / f"{name}-{key}.edgepkg"
        convert(model, ConvertOptions(name=name, version=version, latency_runs=5),
                output=path, calibration=Dataset({"x": cx}, None, "calibration"),
                eval_data=Dataset({"x": ex}, ey, "evaluation"), sign_key=sign_key)
        out[key] = path
    return out
