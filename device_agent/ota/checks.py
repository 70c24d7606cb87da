"""Verify and stage: the checks a downloaded package passes before it may serve.

Each check raises :class:`~device_agent.ota.errors.UpdateFailure` with the reason code an
event reports; the model in service is not touched by any of them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.artifact import open_package, sha256_file
from edgekit.errors import ArtifactError, RuntimeBackendError, SignatureError
from edgekit.manifest import Manifest, TensorSpec
from edgekit.protocol.ota import DesiredDocument, UpdateReason
from edgekit.runtimes import RuntimeOptions

from .._model import LoadedModel, TrustPolicy, load_model
from .errors import UpdateFailure

__all__ = ["check_compatible", "stage", "verify_package_file"]

_LATENCY_RUNS = 5


def verify_package_file(path: Path, doc: DesiredDocument, trust: TrustPolicy,
                        options: RuntimeOptions, max_batch: int, *,
                        checked_sha256: str | None = None) -> LoadedModel:
    """sha256 of the file, the signature, and a load in the runtime (a second session).

    ``checked_sha256``: the file's sha256 as this process computed it from the bytes it
    wrote (a download that just ended); when it is the document's, the file is not read
    and hashed again. The members' own hashes and the signature are checked either way.

    Raises:
        UpdateFailure: sha256_mismatch, unsigned, bad_signature, load_failed.
    """
    expected = doc.model.sha256
    actual = None
    if expected is not None:
        actual = checked_sha256 if checked_sha256 == expected else sha256_file(path)
        if actual != expected:
            raise UpdateFailure(UpdateReason.SHA256_MISMATCH,
                                f"the downloaded file's sha256 is {actual[:16]}..., the desired"
                                f" document names {expected[:16]}...")
    try:
        pkg = open_package(path)
    except ArtifactError as exc:
        raise UpdateFailure(UpdateReason.LOAD_FAILED, f"not a usable package: {exc.message}") from exc
    if pkg.signature is None and not trust.allow_unsigned:
        raise UpdateFailure(UpdateReason.UNSIGNED,
                            f"{pkg.manifest.name} {pkg.manifest.version} is not signed and this"
                            " device requires signatures",
                            hint="sign it with `edgekit sign PKG --key KEY`")
    manifest = pkg.manifest
    doc_model = doc.model
    if (manifest.name, manifest.version) != (doc_model.name, doc_model.version):
        raise UpdateFailure(UpdateReason.SHA256_MISMATCH,
                            f"the package is {manifest.name} {manifest.version}, the desired"
                            f" document names {doc_model.name} {doc_model.version}")
    try:
        model = load_model(path, trust, options, max_batch=max_batch, check_golden=False,
                           sha256=actual)
    except SignatureError as exc:
        raise UpdateFailure(UpdateReason.BAD_SIGNATURE, exc.message, hint=exc.hint) from exc
    except (ArtifactError, RuntimeBackendError) as exc:
        raise UpdateFailure(UpdateReason.LOAD_FAILED, exc.message, hint=exc.hint) from exc
    key_id = doc_model.key_id
    if key_id is not None and model.signed and model.key_id is not None and model.key_id != key_id:
        raise UpdateFailure(UpdateReason.BAD_SIGNATURE,
                            f"signed by key {model.key_id}, the desired document names {key_id}")
    return model


def check_compatible(new: Manifest, serving: LoadedModel | None, allow_breaking: bool) -> None:
    """Inputs and outputs must match the running model's, unless the document allows a
    breaking change and the manifest declares one (``extra.breaking: true``).

    Raises:
        UpdateFailure: incompatible_io, naming each difference.
    """
    if serving is None:
        return
    old = serving.manifest
    diffs = _diff("input", old.inputs, new.inputs) + _diff("output", old.outputs, new.outputs)
    if not diffs:
        return
    declared = new.extra.get("breaking") is True
    if allow_breaking and declared:
        return
    why = ("the manifest does not declare a breaking change (extra.breaking)" if allow_breaking
           else "the desired document does not allow breaking changes")
    raise UpdateFailure(UpdateReason.INCOMPATIBLE_IO,
                        f"inputs/outputs differ from the model in service ({'; '.join(diffs)})"
                        f" and {why}",
                        hint="keep the interface, or deploy with --allow-breaking a package"
                             " whose manifest sets extra.breaking")


def stage(model: LoadedModel, budget_ms: float | None) -> dict[str, Any]:
    """Run the golden samples in the new session and check outputs (finite, within the
    manifest's atol/rtol) and, with a budget, the mean latency of one sample.

    Raises:
        UpdateFailure: nonfinite_output, golden_mismatch, slow, load_failed (the runtime
            fails on the golden inputs).
    """
    details: dict[str, Any] = {}
    try:
        golden_in, golden_out = open_package(model.path).golden()
        if golden_in:
            outputs = model.session.run(golden_in)
            bad = [name for name, arr in outputs.items()
                   if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all()]
            if bad:
                raise UpdateFailure(UpdateReason.NONFINITE_OUTPUT,
                                    f"NaN or infinite values in {', '.join(bad)} on the golden"
                                    " samples")
            excess = model.run_golden()
            details["golden_samples"] = int(len(next(iter(golden_in.values()))))
            details["golden_excess"] = excess
            if excess is not None and excess > 0:
                raise UpdateFailure(UpdateReason.GOLDEN_MISMATCH,
                                    f"outputs on the golden samples differ from the expected"
                                    f" ones by up to {excess:.3g} beyond the tolerance",
                                    details=details)
        else:
            details["golden_samples"] = 0
        if budget_ms is not None:
            feeds = _one_sample(golden_in, model.manifest.inputs)
            model.session.run(feeds)  # warm-up
            t0 = time.perf_counter()
            for _ in range(_LATENCY_RUNS):
                model.session.run(feeds)
            mean_ms = (time.perf_counter() - t0) * 1000.0 / _LATENCY_RUNS
            details["latency_ms"] = round(mean_ms, 3)
            details["latency_budget_ms"] = budget_ms
            if mean_ms > budget_ms:
                raise UpdateFailure(UpdateReason.SLOW,
                                    f"mean latency {mean_ms:.1f} ms over the budget of"
                                    f" {budget_ms:g} ms", details=details)
    except (RuntimeBackendError, ArtifactError) as exc:
        raise UpdateFailure(UpdateReason.LOAD_FAILED,
                            f"the model fails on its golden samples: {exc.message}") from exc
    return details


def _one_sample(golden: dict[str, np.ndarray], specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    if golden:
        return {name: arr[:1] for name, arr in golden.items()}
    feeds = {}
    for spec in specs:
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


def _diff(kind: str, old: list[TensorSpec], new: list[TensorSpec]) -> list[str]:
    def key(spec: TensorSpec) -> tuple[str, list[int | str], Any]:
        q = spec.quantization
        return spec.dtype, spec.shape, (q.scale, q.zero_point) if q else None

    before = {s.name: key(s) for s in old}
    after = {s.name: key(s) for s in new}
    out = [f"{kind} {n} removed" for n in before if n not in after]
    out += [f"{kind} {n} added" for n in after if n not in before]
    out += [f"{kind} {n}: {before[n][0]}{before[n][1]} -> {after[n][0]}{after[n][1]}"
            for n in before if n in after and before[n] != after[n]]
    return out

