"""The device's choice among the variants of a package: measured here, not assumed.

Int8 is not always faster (on ARM, on a GPU, with a runtime build that lacks the kernels),
so the device decides by measurement. The candidates are (variant, runtime, provider)
triples: an ONNX variant once per execution provider that onnxruntime reports here (the
CUDA provider is one more candidate where it is present), a TFLite variant once with LiteRT.
Each candidate is loaded, run on its variant's golden inputs and compared with that
variant's own golden outputs and tolerances, then timed at batch 1 (median). A candidate is
dropped, with its reason kept, when its runtime is missing, it fails to load, its provider
falls back to another, it fails parity here or in the converter's evidence, or its measured
accuracy drop is over the package's budget. The fastest of the rest serves.

The timed runs go round the candidates in turn, so a burst of load on the device slows them
all alike instead of the one being timed when it came.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edgekit.artifact import Package
from edgekit.errors import ArtifactError, EdgekitError, RuntimeBackendError
from edgekit.manifest import Manifest, Variant
from edgekit.protocol import VariantCandidate, VariantSection
from edgekit.runtimes import RuntimeOptions, Session, backend_for

__all__ = ["DEFAULT_RUNS", "choose_variant", "golden_excess"]

DEFAULT_RUNS = 30
_WARMUP = 3
# A large model (100 ms a run) must not hold a load for minutes: after _MIN_RUNS rounds the
# timing stops once it has taken _TIME_BUDGET_S.
_MIN_RUNS = 5
_TIME_BUDGET_S = 2.0
_CPU = "CPUExecutionProvider"
# Providers that do not compute on this device (Azure sends the model to a remote endpoint):
# never a candidate.
_REMOTE_PROVIDERS = frozenset({"AzureExecutionProvider"})
_REASON_CHARS = 256
_MAX_LISTED = 32  # VariantSection.candidates holds at most this many


_Golden = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


@dataclass
class _Trial:
    """One candidate on its way through the checks."""

    variant: Variant
    runtime: str
    providers: list[str]
    session: Session | None = None
    samples: list[float] | None = None
    dropped: str | None = None  # why it cannot serve; None while it still can

    @property
    def provider(self) -> str | None:
        return self.providers[0] if self.providers else None

    @property
    def label(self) -> str:
        return f"{self.variant.id} on {self.provider or self.runtime}"

    @property
    def p50_ms(self) -> float | None:
        return float(np.median(self.samples)) if self.samples else None


def golden_excess(outputs: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                  atol: float, rtol: float) -> float:
    """The largest ``|out - expected| - (atol + rtol * |expected|)`` over the expected
    outputs (at most 0 when all are within; infinite for a missing or misshapen output)."""
    worst = -np.inf
    for name, exp_arr in expected.items():
        got = outputs.get(name)
        if got is None or got.shape != exp_arr.shape:
            return float("inf")
        exp = exp_arr.astype(np.float64)
        excess = np.abs(got.astype(np.float64) - exp) - (atol + rtol * np.abs(exp))
        worst = max(worst, float(np.nan_to_num(excess, nan=np.inf).max()))
    return worst


def choose_variant(pkg: Package, options: RuntimeOptions | None = None, *,
                   runs: int = DEFAULT_RUNS) -> tuple[VariantSection, Manifest, Session]:
    """Measure every candidate of a package of variants; return the choice, the manifest as
    it reads for the chosen variant, and its loaded session.

    Raises:
        ArtifactError: a member of the package is unreadable or altered.
        RuntimeBackendError: no candidate can serve (the message lists each one's reason).
    """
    options = options or RuntimeOptions()
    manifest = pkg.manifest
    trials = [t for v in manifest.variants for t in _candidates(v, options)]
    golden: dict[str, _Golden] = {}
    for trial in trials:
        if trial.dropped is None:
            member = trial.variant.golden_file
            golden.setdefault(trial.variant.id, pkg.golden(member) if member else ({}, {}))
            _load_and_check(pkg, trial, options, golden[trial.variant.id])
    rounds = _time(trials, golden, runs)
    for trial in trials:
        if trial.dropped is None:
            trial.dropped = _evidence_problem(trial.variant, manifest.max_accuracy_drop)
    eligible = [t for t in trials if t.dropped is None and t.p50_ms is not None]
    if not eligible:
        raise RuntimeBackendError(
            f"{pkg.path.name}: none of the package's variants can serve here: "
            + "; ".join(f"{t.label}: {t.dropped}" for t in trials),
            hint="install the runtime a variant needs, or convert a variant this device runs"
                 " (edgekit-agent doctor shows the runtimes here)")
    best = min(eligible, key=lambda t: t.p50_ms or 0.0)
    assert best.session is not None and best.p50_ms is not None  # eligible trials ran
    section = VariantSection(
        id=best.variant.id, runtime=best.runtime, provider=best.provider, p50_ms=best.p50_ms,
        runs=rounds, reason=_clip(_why(best, eligible)),
        candidates=_listed(trials, best))
    return section, manifest.for_variant(best.variant), best.session


def _candidates(variant: Variant, options: RuntimeOptions) -> list[_Trial]:
    """The (runtime, providers) candidates of one variant on this device."""
    try:
        backend = backend_for(variant.format.value)
    except RuntimeBackendError as exc:
        return [_Trial(variant, variant.format.value, [],
                       dropped=f"no runtime here: {exc.message}")]
    info = backend.info()
    if not info.providers:
        return [_Trial(variant, backend.KEY, [])]
    if options.providers:
        # The configuration names the providers: measure that choice only.
        return [_Trial(variant, backend.KEY, list(options.providers))]
    return [_Trial(variant, backend.KEY, [p] if p == _CPU else [p, _CPU])
            for p in info.providers if p not in _REMOTE_PROVIDERS]


def _load_and_check(pkg: Package, trial: _Trial, options: RuntimeOptions,
                    golden: _Golden) -> None:
    """Load the trial's session and check it on its variant's golden samples; set
    ``dropped`` when it fails.

    Raises:
        ArtifactError: the variant's members are unreadable or altered.
    """
    variant = trial.variant
    golden_in, golden_out = golden
    if not golden_in:
        trial.dropped = "the package holds no golden samples for it"
        return
    try:
        backend = backend_for(variant.format.value)
        session = backend.load(pkg.read_member(variant.model_file), variant.inputs,
                               variant.outputs, RuntimeOptions(threads=options.threads,
                                                               providers=trial.providers))
        if trial.providers and session.providers[:1] != trial.providers[:1]:
            trial.dropped = (f"{trial.providers[0]} did not take the model (the session runs"
                             f" on {', '.join(session.providers) or 'nothing'})")
            return
        outputs = session.run(golden_in)
    except RuntimeBackendError as exc:
        trial.dropped = f"does not run here: {exc.message}"
        return
    except ArtifactError:
        raise
    except EdgekitError as exc:  # an input the model refuses (InputError)
        trial.dropped = f"fails on the golden inputs: {exc.message}"
        return
    excess = golden_excess(outputs, golden_out, float(variant.golden.get("atol", 1e-4)),
                           float(variant.golden.get("rtol", 1e-3)))
    if excess > 0:
        trial.dropped = (f"golden parity failed here: outputs off by up to {excess:.3g} beyond"
                         " the variant's tolerance")
        return
    trial.session = session


def _time(trials: list[_Trial], golden: dict[str, _Golden], runs: int) -> int:
    """Batch-1 timings of every loaded trial, taken in turns (see the module docstring);
    returns the rounds taken: ``runs``, or fewer (at least ``_MIN_RUNS``) for slow models."""
    live: list[tuple[_Trial, Session, dict[str, np.ndarray], list[float]]] = [
        (t, t.session, {k: v[:1] for k, v in golden[t.variant.id][0].items()}, [])
        for t in trials if t.session is not None]
    for _, session, one, _ in live:
        for _ in range(_WARMUP):
            session.run(one)
    start = time.perf_counter()
    rounds = 0
    while rounds < runs and (rounds < _MIN_RUNS or time.perf_counter() - start < _TIME_BUDGET_S):
        for _, session, one, samples in live:
            t0 = time.perf_counter()
            session.run(one)
            samples.append((time.perf_counter() - t0) * 1000.0)
        rounds += 1
    for trial, _, _, samples in live:
        trial.samples = samples
    return rounds


def _evidence_problem(variant: Variant, budget: float | None) -> str | None:
    """Why the converter's signed evidence rules the variant out, or None."""
    parity = variant.metrics.get("parity") or {}
    if parity.get("passed") is False:
        failures = "; ".join(str(f) for f in parity.get("failures") or []) or "failed"
        return f"failed the converter's parity check ({failures})"
    drop = variant.accuracy_drop
    if budget is not None and drop is not None and drop > budget:
        return (f"accuracy drop {drop * 100:.2f} points is over the package's budget of"
                f" {budget * 100:.2f}")
    return None


def _why(best: _Trial, eligible: list[_Trial]) -> str:
    others = sorted((t for t in eligible if t is not best), key=lambda t: t.p50_ms or 0.0)
    text = f"fastest eligible: {best.p50_ms:.4g} ms median at batch 1"
    if others:
        text += f"; next {others[0].label} {others[0].p50_ms:.4g} ms"
    return text


def _listed(trials: list[_Trial], best: _Trial) -> list[VariantCandidate]:
    """The candidates for the status, fastest first, at most as many as the status holds
    (measured ones before those dropped unmeasured)."""
    ordered = sorted(trials, key=lambda t: (t.p50_ms is None, t.p50_ms or 0.0))
    return [_candidate(t, best) for t in ordered[:_MAX_LISTED]]


def _candidate(trial: _Trial, best: _Trial) -> VariantCandidate:
    if trial is best:
        reason = "chosen"
    elif trial.dropped is not None:
        reason = trial.dropped
    else:
        reason = f"slower ({trial.p50_ms:.4g} ms against {best.p50_ms:.4g} ms)"
    return VariantCandidate(variant=trial.variant.id, runtime=trial.runtime,
                            provider=trial.provider, p50_ms=trial.p50_ms,
                            eligible=trial.dropped is None, reason=_clip(reason))


def _clip(text: str) -> str:
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."
