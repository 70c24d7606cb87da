"""Choosing among candidate models by their shadow evidence (``policy.pick = "shadow"``).

The maintenance policy shadows each candidate in turn on the same devices, the canary's
(:func:`trial_devices`): a *shadow trial* is a rollout with ``trial`` in its plan that runs
only the shadow stage (:mod:`._shadow`), under the ``[rollout]`` shadow settings, and ends
(:func:`run_trials`). Each trial's reports are summed up (:func:`shadow_evidence`) and
:func:`pick_best` chooses:

1. only candidates whose trial passed the shadow gate count;
2. one with label accuracy (reports with ``shadow_min_labels`` labelled rows) ranks above
   one without;
3. then the higher candidate accuracy on the field's labels (weighted by labelled rows);
4. then the higher agreement with the serving model (weighted by compared requests);
5. then the order they were tried in (the better offline score first).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.host.controller._plan import wave_sizes
from edgekit.host.controller.rollout import RolloutEngine
from edgekit.host.db import RolloutState, Store

__all__ = ["Evidence", "pick_best", "run_trials", "shadow_evidence", "trial_devices"]

_ENDED = {RolloutState.SUCCEEDED, RolloutState.ABORTED, RolloutState.FAILED,
          RolloutState.CANCELLED}
_POLL_S = 0.5
_GRACE_S = 60.0  # past the shadow timeout, for the engine to notice and end the trial


@dataclass(frozen=True)
class Evidence:
    """What one candidate's shadow trial showed, over its devices."""

    model: str  # name:version
    rollout: int | None
    passed: bool
    accuracy: float | None = None  # the candidate's, on labelled rows
    serving_accuracy: float | None = None  # the serving model's, on the same rows
    labelled: int = 0
    agreement: float | None = None
    requests: int = 0
    problems: list[str] = field(default_factory=list)
    reports: dict[str, Any] = field(default_factory=dict)  # device -> edgekit.shadow/1

    def rank(self) -> tuple[bool, float, float]:
        return (self.accuracy is not None, self.accuracy if self.accuracy is not None else 0.0,
                self.agreement if self.agreement is not None else -1.0)

    def summary(self) -> str:
        acc = f"accuracy {self.accuracy:.4f} on {self.labelled} labels" \
            if self.accuracy is not None else "no labels"
        agree = f"agreement {self.agreement:.4f}" if self.agreement is not None else \
            "no agreement"
        return f"{acc}, {agree} over {self.requests} requests"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "rollout": self.rollout, "passed": self.passed,
                "accuracy": self.accuracy, "serving_accuracy": self.serving_accuracy,
                "labelled": self.labelled, "agreement": self.agreement,
                "requests": self.requests, "problems": self.problems, "reports": self.reports}


def shadow_evidence(store: Store, model: str, rollout_id: int, min_labels: int) -> Evidence:
    """The evidence of a finished trial, from its ``rollout.shadow`` or ``rollout.abort``
    event (the reports are the ones the engine checked)."""
    found = store.list_events(rollout_id=rollout_id, kinds=["rollout.shadow", "rollout.abort"],
                              limit=10)
    if not found:
        return Evidence(model, rollout_id, False, problems=["the trial ended without a shadow"
                                                            " stage"])
    event = found[0]
    data = event.data or {}
    reports: dict[str, Any] = data.get("reports") or {}
    passed = event.kind == "rollout.shadow" and event.reason == "passed"
    problems = [str(p) for p in data.get("problems") or []] or (
        [] if passed else [event.message])
    if not reports:
        passed, problems = False, problems or ["no device reported"]
    requests = sum(int(r.get("requests") or 0) for r in reports.values())
    agreed = sum(float(r["agreement"]) * int(r.get("requests") or 0)
                 for r in reports.values() if r.get("agreement") is not None)
    labelled = [r for r in reports.values() if int(r.get("labelled") or 0) >= min_labels
                and (r.get("candidate") or {}).get("accuracy") is not None
                and (r.get("serving") or {}).get("accuracy") is not None]
    rows = sum(int(r["labelled"]) for r in labelled)

    def weighted(which: str) -> float | None:
        return sum(float(r[which]["accuracy"]) * int(r["labelled"]) for r in labelled) / rows \
            if rows else None

    return Evidence(model, rollout_id, passed, accuracy=weighted("candidate"),
                    serving_accuracy=weighted("serving"), labelled=rows,
                    agreement=agreed / requests if requests else None, requests=requests,
                    problems=problems, reports=reports)


def pick_best(evidence: list[Evidence]) -> Evidence | None:
    """The winner by the rule of the module docstring; None when no trial passed."""
    best: Evidence | None = None
    for candidate in evidence:
        if candidate.passed and (best is None or candidate.rank() > best.rank()):
            best = candidate
    return best


def trial_devices(store: Store, fleet: str, sha256: str, canary: str,
                  wave_factor: float) -> list[str]:
    """The devices a rollout's canary would take among the fleet's online devices that
    serve the model ``sha256``: the same devices shadow every candidate."""
    serving = sorted(d.device for d in store.list_devices(fleet, online=True)
                     if d.model_sha256 == sha256)
    sizes = wave_sizes(len(serving), canary, wave_factor)
    return serving[:sizes[0]] if sizes else []


def run_trials(engine: RolloutEngine, fleet: str, models: list[str],
               devices: list[str]) -> list[Evidence]:
    """Shadow each of ``models`` (``name:version``) on ``devices``, one trial after the other,
    and return their evidence. A trial the engine refuses, or one that does not end within
    ``rollout.shadow_timeout_s`` (and a grace period), is evidence that did not pass."""
    settings = engine.settings
    out: list[Evidence] = []
    for model in models:
        name, _, version = model.partition(":")
        try:
            trial = engine.create(fleet, name, version, devices=devices, source="policy",
                                  note=f"shadow trial of {model}", trial=True,
                                  overrides={"shadow_enabled": True,
                                             "canary": str(len(devices))})
        except EdgekitError as exc:
            out.append(Evidence(model, None, False, problems=[f"the trial was refused:"
                                                              f" {exc.message}"]))
            continue
        deadline = time.monotonic() + settings.shadow_timeout_s + _GRACE_S
        while engine.store.get_rollout(trial.id).state not in _ENDED:
            if time.monotonic() > deadline:
                break
            time.sleep(_POLL_S)
        out.append(shadow_evidence(engine.store, model, trial.id, settings.shadow_min_labels))
    return out
