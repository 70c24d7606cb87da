"""What a ``torch.export`` program declares about its inputs, read without running it:
names, shapes (symbolic dimensions by name, the first one ``batch``) and dtypes."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.errors import ModelError
from edgekit.manifest import TensorSpec

__all__ = ["BATCH_DIM", "program_input_specs", "repeat_batch", "static_batch_of", "zeros_for"]

BATCH_DIM = "batch"


def program_input_specs(program: Any) -> list[TensorSpec]:
    """The user inputs a ``torch.export`` program declares: symbolic dimensions become
    names (the first one ``batch``), fixed ones stay numbers."""
    import torch

    wanted = list(program.graph_signature.user_inputs)
    metas = {node.name: node.meta.get("val") for node in program.graph.nodes
             if node.op == "placeholder"}
    specs = []
    for name in wanted:
        val = metas.get(name)
        if val is None or not hasattr(val, "shape"):
            raise ModelError(f"the program's input {name!r} is not a tensor",
                             hint="export a model whose inputs are tensors")
        shape: list[int | str] = [
            (BATCH_DIM if i == 0 else str(d)) if isinstance(d, torch.SymInt) else int(d)
            for i, d in enumerate(val.shape)]
        specs.append(TensorSpec(name=name, dtype=str(val.dtype).replace("torch.", ""),
                                shape=shape))
    return specs


def zeros_for(specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Batch-1 zeros for each input (any symbolic dimension gets 1)."""
    return {s.name: np.zeros([d if isinstance(d, int) else 1 for d in s.shape],
                             dtype=_numpy_dtype(s.dtype)) for s in specs}


def _numpy_dtype(dtype: str) -> Any:
    return np.bool_ if dtype == "bool" else np.dtype(dtype)


def static_batch_of(program: Any) -> int | None:
    """The fixed batch size of a program's first user input, or None when it is symbolic."""
    import torch

    first = program.graph_signature.user_inputs[0]
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == first:
            val = node.meta.get("val")
            if val is not None and not isinstance(val.shape[0], torch.SymInt):
                return int(val.shape[0])
    return None


def repeat_batch(tensor: Any, batch: int) -> Any:
    return tensor.expand(batch, *tensor.shape[1:]).contiguous()
