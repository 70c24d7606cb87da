"""Package hygiene: light imports, an honest __all__, and both console scripts."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

HEAVY = ["torch", "tensorflow", "keras", "onnx", "sklearn", "litert_torch", "jax"]


@pytest.mark.parametrize("module", ["edgekit", "edgekit.host.cli", "converters"])
def test_import_stays_light(module: str) -> None:
    code = (
        f"import sys, json; import {module}; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize(
    "module",
    ["edgekit", "edgekit.artifact", "edgekit.manifest", "edgekit.metrics", "edgekit.data",
     "edgekit.errors", "edgekit.signing", "edgekit.runtimes", "edgekit.timing", "converters",
     "edgekit.calibration"],
)
def test_exported_members_exist_and_are_public(module: str) -> None:
    mod = importlib.import_module(module)
    exported = getattr(mod, "__all__", None)
    assert exported, f"{module} has no __all__"
    assert len(set(exported)) == len(exported)
    for name in exported:
        assert hasattr(mod, name), f"{module}.__all__ names missing {name}"
    public = {
        n for n, v in vars(mod).items()
        if not n.startswith("_") and getattr(v, "__module__", "").startswith(module)
        and callable(v)
    }
    assert public <= set(exported), f"{module} defines public {public - set(exported)} not in __all__"
