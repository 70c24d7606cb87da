"""Registry-driven conversion tests: every declared (source framework, target, mode) triple
has a tiny model in ``tests/convert_cases.py``, and every row converts, runs in its real
runtime, and matches what its manifest claims."""

from __future__ import annotations

import numpy as np
import pytest
from convert_cases import CASES

import converters
from converters import ConvertOptions, convert, run_batches
from edgekit.artifact import open_package
from edgekit.data import Dataset, check_inputs
from edgekit.runtimes import load_session


def test_every_registered_triple_has_a_case() -> None:
    missing = [t for t in converters.supported_pairs() if t not in CASES]
    assert not missing, (
        "registered (framework, target, mode) triples without a tiny-model case in"
        f" tests/convert_cases.py: {missing}")


@pytest.mark.parametrize("triple", sorted(CASES), ids=lambda t: "-".join(t))
def test_case_converts_runs_and_matches_its_manifest(triple: tuple[str, str, str],
                                                     tmp_path: object) -> None:
    framework, target, mode = triple
    if triple not in converters.supported_pairs():
        pytest.skip(f"the {target} target is not available here (its SDK is missing)")
    case = CASES[triple](tmp_path)  # type: ignore[arg-type]
    opts = ConvertOptions(target=target, quantize=mode, latency_runs=5, **case.options)
    out = tmp_path / "model.edgepkg"  # type: ignore[operator]
    convert(case.source, opts, output=out, calibration=case.calibration, eval_data=case.eval)

    pkg = open_package(out)
    m = pkg.manifest
    assert (m.source["framework"], m.target["format"], m.recipe["quantize"]) == (
        framework, target, mode)
    assert m.metrics["parity"]["passed"], m.metrics["parity"]["failures"]
    assert m.metrics["accuracy"]["drop"] <= case.max_accuracy_drop

    session = load_session(m, pkg.model_bytes())
    evald = Dataset(check_inputs(case.eval.inputs, m.inputs), case.eval.labels, "eval")
    logits = run_batches(session.run, evald)[m.outputs[0].name]
    accuracy = float(np.mean(logits.argmax(axis=1) == case.eval.labels))
    assert accuracy == pytest.approx(m.metrics["accuracy"]["artifact"]["accuracy"])

    golden_in, golden_out = pkg.golden()
    again = session.run(golden_in)
    for name, expected in golden_out.items():
        np.testing.assert_allclose(again[name], expected, atol=m.golden["atol"],
                                   rtol=m.golden["rtol"])
