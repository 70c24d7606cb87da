"""The demo's retrain command: train the digits CNN on the base training split plus the
labelled samples collected from the field, and write a ``torch.export`` program.

    python -m edgekit.host.demo.retrain --data recent.npz --current current.edgepkg --out new.pt2

``--current`` is accepted so the command fits the controller's retrain contract; the demo
trains from scratch (the running artifact is an ONNX file, not trainable weights).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from edgekit.data import load_npz
from edgekit.errors import EdgekitError


def retrain(data: Path, out: Path, *, epochs: int = 20, seed: int = 0,
            field_weight: int = 6) -> dict[str, float]:
    """Train on base + field samples (field samples repeated ``field_weight`` times).

    Raises:
        DataError: the field data has no labels or the wrong layout.
    """
    import torch

    from edgekit.host.demo.digits import load_digits_split, torch_cnn, train_torch

    field = load_npz(data, require_labels=True)
    fx = next(iter(field.inputs.values())).astype(np.float32)
    if fx.shape[1:] != (1, 8, 8):
        fx = fx.reshape(-1, 1, 8, 8)
    fy = np.asarray(field.labels, dtype=np.int64)
    base_x, base_y = load_digits_split()["train"]
    x = np.concatenate([base_x, *([fx] * field_weight)])
    y = np.concatenate([base_y, *([fy] * field_weight)])
    torch.set_num_threads(1)
    model = train_torch(torch_cnn(), x, y, epochs=epochs, seed=seed)
    example = (torch.from_numpy(base_x[:2]),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, example, dynamic_shapes=({0: batch},))
    tmp = out.with_name(out.name + ".tmp")
    torch.export.save(program, tmp)
    tmp.replace(out)
    with torch.no_grad():
        field_acc = float((model(torch.from_numpy(fx)).argmax(1).numpy() == fy).mean())
    return {"base_samples": float(len(base_y)), "field_samples": float(len(fy)),
            "field_train_accuracy": field_acc}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Retrain the demo's digits CNN.")
    parser.add_argument("--data", type=Path, required=True, help="recent labelled samples (.npz)")
    parser.add_argument("--current", type=Path, help="the running artifact (unused)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the .pt2")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        stats = retrain(args.data, args.out, epochs=args.epochs, seed=args.seed)
    except EdgekitError as exc:
        print(f"error: {exc.format()}", file=sys.stderr)
        return exc.exit_code
    print(f"retrained on {int(stats['base_samples'])} base + {int(stats['field_samples'])} field"
          f" samples; field train accuracy {stats['field_train_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
