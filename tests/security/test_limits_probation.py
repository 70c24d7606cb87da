"""Probation counts a non-finite output against the new model only when the serving model
stays finite on the same input (real models in onnxruntime).

Attack of issue 9 (item 7): one huge finite input that overflows to infinity in both models
rolled a good deployment back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _limits_support import build_package

import edgekit.protocol.ota as ota
from device_agent._model import LoadedModel, TrustPolicy, load_model
from device_agent._probation import ProbationWatch
from edgekit.protocol.ota import UpdateReason

SETTINGS = ota.Probation(requests=3, seconds=0.0, max_error_rate=0.0, max_nonfinite_rate=0.0,
                         max_latency_ms=None)
HUGE = {"x": np.full((1, 64), 3e38, dtype=np.float32)}
NORMAL = {"x": np.full((1, 64), 0.5, dtype=np.float32)}
NEGATIVE = {"x": np.full((1, 64), -0.5, dtype=np.float32)}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    root: Path = tmp_path_factory.mktemp("probation")
    trust = TrustPolicy(allow_unsigned=True)
    return {
        "v1": load_model(build_package(root / "v1.edgepkg", version="1.0.0", seed=1), trust),
        "v2": load_model(build_package(root / "v2.edgepkg", version="2.0.0", seed=2), trust),
        "nan": load_model(build_package(root / "nan.edgepkg", version="2.1.0", seed=3,
                                        kind="nan"), trust),
    }


def _finite(model: LoadedModel, feeds: dict[str, np.ndarray]) -> bool:
    return bool(all(np.isfinite(a).all() for a in model.session.run(dict(feeds)).values()))


def test_overflow_shared_with_the_serving_model_does_not_roll_back(
        models: dict[str, LoadedModel]) -> None:
    old, new = models["v1"], models["v2"]
    assert not _finite(old, HUGE) and not _finite(new, HUGE)  # the input is the problem
    watch = ProbationWatch(new, old, SETTINGS)
    watch.run(HUGE)
    assert watch.verdict() is None
    for _ in range(2):
        answered_by, _outputs = watch.run(NORMAL)
        assert answered_by is new
    verdict = watch.verdict()
    assert verdict is not None and verdict.passed, verdict
    assert verdict.details["nonfinite"] == 0 and verdict.details["nonfinite_on_both"] == 1


def test_nonfinite_output_of_the_new_model_alone_still_rolls_back(
        models: dict[str, LoadedModel]) -> None:
    old, new = models["v1"], models["nan"]
    assert _finite(old, NEGATIVE) and not _finite(new, NEGATIVE)
    watch = ProbationWatch(new, old, SETTINGS)
    answered_by, outputs = watch.run(NEGATIVE)
    assert answered_by is old and all(np.isfinite(a).all() for a in outputs.values())
    verdict = watch.verdict()
    assert verdict is not None and not verdict.passed
    assert verdict.reason == UpdateReason.NONFINITE_OUTPUT
