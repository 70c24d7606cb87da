"""The maintenance policy: notice a quality drop in the field and update the model.

Each ``policy.interval_s`` the policy reads the metrics that arrived since its last window
and, for each fleet it holds the ``policy:<fleet>`` lease of, computes the window's figures
for the model most of the fleet's online devices run:

- labelled quality: accuracy and macro F1 of the devices' feedback windows, weighted by
  their label counts (a window counts only with ``min_labels`` labels, some of them new);
- estimated accuracy (``metric = "estimated_accuracy"``): the devices' label-free estimates
  (edgekit.calibration), weighted by their prediction counts (a
  window counts only with ``min_estimated`` estimated predictions);
- label-free signals: the mean confidence and the prediction distribution of the window's
  predictions, compared with a reference (``extra.baseline`` in the model's manifest, else
  the first window the model served). They raise warnings, never an update.

A window *breaches* when the metric is under ``threshold`` or more than ``relative_drop``
below the baseline in the model's manifest. ``consecutive`` breached windows in a row fire
the policy (one noisy window does nothing). Firing starts a job in a worker thread: export
the recent labelled samples, hold part of them out, score the current model and the newer
registered versions on the held-out part, and, if none is better by ``margin``, run the
retrain command on the rest, convert its model with the current package's recipe and score
that. A candidate better by the margin is rolled out through the rollout engine; every
decision is an event with its numbers and reason.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import EdgekitError
from edgekit.host.controller._candidates import (
    Score,
    next_version,
    registered_candidates,
    retrain,
    score_package,
    split_holdout,
)
from edgekit.host.controller._pick import pick_best, run_trials, trial_devices
from edgekit.host.controller._window import Window, distribution_shift
from edgekit.host.controller.config import PolicySection
from edgekit.host.controller.rollout import RolloutEngine
from edgekit.host.db import MetricRecord, Store, utcnow
from edgekit.host.registry import Registry, evaluation_summary

__all__ = ["MaintenancePolicy", "Window", "distribution_shift"]

log = logging.getLogger("edgekit.controller.policy")

_REFERENCE_MIN_PREDICTIONS = 50


@dataclass
class _FleetState:
    cursor: int = 0
    feedback: dict[str, int] = field(default_factory=dict)  # device -> feedback_total seen
    model_sha: str | None = None
    breaches: int = 0
    reference: tuple[dict[str, float], float | None] | None = None
    warnings: set[str] = field(default_factory=set)
    cooldown_until: float = 0.0
    next_at: float = 0.0


class MaintenancePolicy:
    """Watches the fleets' field quality and acts on it; see the module docstring."""

    def __init__(self, store: Store, registry: Registry, engine: RolloutEngine,
                 settings: PolicySection, *, controller_id: str, fleets: list[str],
                 workdir: Path, lease_s: float = 30.0,
                 signing_key: Ed25519PrivateKey | None = None) -> None:
        self.store = store
        self.registry = registry
        self.engine = engine
        self.settings = settings
        self.controller_id = controller_id
        self.fleets = fleets
        self.workdir = workdir
        self.lease_s = max(lease_s, 3 * settings.interval_s)
        self.signing_key = signing_key
        self._states: dict[str, _FleetState] = {}
        self._job: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """Whether a maintenance job runs now."""
        return self._job is not None and self._job.is_alive()

    def wait_idle(self, timeout: float | None = None) -> None:
        if self._job is not None:
            self._job.join(timeout)

    def tick(self, now: float | None = None) -> list[Window]:
        """Evaluate every fleet whose window is due; return the windows that counted."""
        now = time.monotonic() if now is None else now
        fleets = self.store.list_fleets() if "+" in self.fleets else self.fleets
        counted = []
        for fleet in fleets:
            state = self._states.setdefault(fleet, _FleetState(next_at=now))
            if now < state.next_at:
                continue
            state.next_at = now + self.settings.interval_s
            if not self.store.acquire_lease(f"policy:{fleet}", self.controller_id,
                                            self.lease_s):
                self._states[fleet] = _FleetState(next_at=state.next_at)
                continue
            try:
                window = self.evaluate(fleet)
            except EdgekitError as exc:
                log.error("policy window of %s failed: %s", fleet, exc.message)
                continue
            if window is not None:
                counted.append(window)
        return counted

    def release(self) -> None:
        """Drop the policy leases (another controller takes the fleets over at once)."""
        for fleet in list(self._states):
            self.store.release_lease(f"policy:{fleet}", self.controller_id)

    # ---------------------------------------------------------------- windows

    def evaluate(self, fleet: str) -> Window | None:
        """Close the fleet's window: warn, count a breach, or fire. Returns the window when
        it had enough labels to count, else None."""
        state = self._states.setdefault(fleet, _FleetState())
        records = self.store.metrics_history(fleet, after_id=state.cursor)
        if records:
            state.cursor = records[-1].id
        if self.busy or self.store.list_rollouts(fleet=fleet, active=True):
            return None  # the fleet is changing models; its figures mean nothing now
        window = self._window(fleet, state, records)
        if window is None:
            return None
        self._label_free(fleet, state, window)
        s = self.settings
        if not window.enough(s):
            return None
        value = window.metric(s.metric)
        baseline = self._baseline(window)
        limits = []
        if s.threshold > 0:
            limits.append(("threshold", s.threshold))
        if s.relative_drop > 0 and baseline is not None:
            limits.append(("relative_drop", baseline * (1 - s.relative_drop)))
        broken = [(name, limit) for name, limit in limits
                  if value is not None and value < limit]
        numbers = {**window.to_dict(), "metric": s.metric, "value": value,
                   "baseline": baseline, "limits": dict(limits)}
        if not broken:
            if state.breaches:
                self._event(fleet, "policy.recovered",
                            f"{window.model}: {s.metric} {value:.4f} is within the limits"
                            f" again after {state.breaches} breached window(s)",
                            data=numbers)
            state.breaches = 0
            return window
        state.breaches += 1
        name, limit = broken[0]
        self._event(fleet, "policy.breach",
                    f"{window.model}: {s.metric} {value:.4f} < {limit:.4f} ({name}), window"
                    f" {state.breaches} of {s.consecutive} over {window.labels} labels"
                    f" ({window.estimated} predictions estimated)",
                    level="warning", reason=name,
                    data={**numbers, "breaches": state.breaches, "consecutive": s.consecutive})
        if state.breaches >= s.consecutive and time.monotonic() >= state.cooldown_until:
            self._fire(fleet, state, window, numbers)
        return window

    def _window(self, fleet: str, state: _FleetState,
                records: list[MetricRecord]) -> Window | None:
        online = self.store.list_devices(fleet, online=True)
        models = Counter((d.model_name, d.model_version, d.model_sha256) for d in online
                         if d.model_sha256)
        if not models:
            return None
        (name, version, sha), _ = models.most_common(1)[0]
        if sha != state.model_sha:
            state.model_sha, state.breaches = sha, 0
            state.reference, state.warnings = None, set()
        latest: dict[str, dict[str, Any]] = {}
        histogram: Counter[str] = Counter()
        confidence_sum, predicted = 0.0, 0
        estimated_sum, estimated = 0.0, 0
        for record in records:
            model = record.payload.get("model")
            if not isinstance(model, dict) or model.get("sha256") != sha:
                continue
            latest[record.device] = record.payload
            section = record.payload.get("predictions")
            if isinstance(section, dict):
                count = section.get("count")
                hist = section.get("histogram")
                conf = section.get("mean_confidence")
                if isinstance(hist, dict):
                    histogram.update({str(k): int(v) for k, v in hist.items()
                                      if isinstance(v, int)})
                if isinstance(count, int) and count > 0 and isinstance(conf, int | float):
                    confidence_sum += float(conf) * count
                    predicted += count
            estimate = record.payload.get("estimate")
            if isinstance(estimate, dict) and isinstance(estimate.get("count"), int) and \
                    isinstance(estimate.get("accuracy"), int | float):
                estimated_sum += float(estimate["accuracy"]) * estimate["count"]
                estimated += estimate["count"]
        labels = new = 0
        acc_sum = f1_sum = 0.0
        for device, payload in latest.items():
            quality = payload.get("quality")
            if not isinstance(quality, dict):
                continue
            n = quality.get("labels")
            acc, f1 = quality.get("accuracy"), quality.get("f1_macro")
            total = quality.get("feedback_total")
            if isinstance(total, int):
                new += max(0, total - state.feedback.get(device, 0))
                state.feedback[device] = total
            if isinstance(n, int) and n > 0 and isinstance(acc, int | float) and \
                    isinstance(f1, int | float):
                labels += n
                acc_sum += n * float(acc)
                f1_sum += n * float(f1)
        hist_total = sum(histogram.values())
        return Window(
            fleet=fleet, model=f"{name}:{version}", sha256=sha, devices=len(latest),
            labels=labels, new_labels=new,
            accuracy=acc_sum / labels if labels else None,
            f1=f1_sum / labels if labels else None,
            predictions=predicted, confidence=confidence_sum / predicted if predicted else None,
            distribution={k: v / hist_total for k, v in sorted(histogram.items())}
            if hist_total else {},
            estimated_accuracy=estimated_sum / estimated if estimated else None,
            estimated=estimated)

    def _baseline(self, window: Window) -> float | None:
        name, _, version = window.model.partition(":")
        record = self.store.get_model(name, version)
        if record is None:
            return None
        # An estimate is compared with the labelled accuracy it estimates (on the evaluation
        # data, the calibrated estimate is that accuracy).
        metric = "f1" if self.settings.metric == "f1" else "accuracy"
        return evaluation_summary(record.evaluation).get(metric)

    def _label_free(self, fleet: str, state: _FleetState, window: Window) -> None:
        s = self.settings
        if window.predictions < _REFERENCE_MIN_PREDICTIONS:
            return
        if state.reference is None:
            state.reference = self._manifest_reference(window) or (
                window.distribution, window.confidence)
            self._event(fleet, "policy.reference",
                        f"{window.model}: label-free reference set from"
                        f" {window.predictions} predictions",
                        data={"distribution": state.reference[0],
                              "confidence": state.reference[1]})
            return
        ref_dist, ref_conf = state.reference
        found: dict[str, tuple[str, dict[str, Any]]] = {}
        if s.confidence_drop > 0 and ref_conf is not None and window.confidence is not None \
                and ref_conf - window.confidence > s.confidence_drop:
            found["confidence_falling"] = (
                f"mean confidence {window.confidence:.3f}, reference {ref_conf:.3f}",
                {"confidence": window.confidence, "reference": ref_conf})
        if s.max_shift > 0 and ref_dist and window.distribution:
            shift = distribution_shift(window.distribution, ref_dist, s.shift_measure)
            if shift > s.max_shift:
                found["prediction_shift"] = (
                    f"prediction distribution moved by {shift:.3f} ({s.shift_measure})",
                    {"shift": shift, "measure": s.shift_measure,
                     "distribution": window.distribution, "reference": ref_dist})
        for reason, (text, data) in found.items():
            if reason not in state.warnings:
                self._event(fleet, "policy.warning", f"{window.model}: {text}",
                            level="warning", reason=reason,
                            data={**data, "predictions": window.predictions})
        for reason in state.warnings - set(found):
            self._event(fleet, "policy.warning_cleared", f"{window.model}: {reason} cleared",
                        reason=reason)
        state.warnings = set(found)

    def _manifest_reference(self, window: Window) -> tuple[dict[str, float],
                                                           float | None] | None:
        name, _, version = window.model.partition(":")
        record = self.store.get_model(name, version)
        baseline = ((record.manifest.get("extra") or {}).get("baseline")
                    if record is not None else None)
        if not isinstance(baseline, dict):
            return None
        dist = baseline.get("prediction_distribution")
        conf = baseline.get("mean_confidence")
        if not isinstance(dist, dict):
            return None
        return ({str(k): float(v) for k, v in dist.items()},
                float(conf) if isinstance(conf, int | float) else None)

    # ---------------------------------------------------------------- acting

    def _fire(self, fleet: str, state: _FleetState, window: Window,
              numbers: dict[str, Any]) -> None:
        s = self.settings
        self._event(fleet, "policy.fired",
                    f"{window.model}: {state.breaches} breached windows in a row; looking for"
                    " a better model", level="warning", reason="quality_drop", data=numbers)
        state.breaches = 0
        state.cooldown_until = time.monotonic() + s.cooldown_s
        self._job = threading.Thread(target=self._run_job, args=(fleet, window),
                                     name=f"edgekit-policy-{fleet}", daemon=True)
        self._job.start()

    def _run_job(self, fleet: str, window: Window) -> None:
        try:
            self.act(fleet, window)
        except Exception as exc:  # the job must end with a decision event, whatever failed
            log.exception("maintenance job of %s failed", fleet)
            message = exc.message if isinstance(exc, EdgekitError) else repr(exc)
            self._decide(fleet, "none", "job_failed", f"the maintenance job failed: {message}",
                         {})

    def act(self, fleet: str, window: Window) -> int | None:
        """Find a better model for the fleet and roll it out; return the rollout id, or None
        when nothing was rolled out (the decision event says why). Runs synchronously."""
        s = self.settings
        name, _, version = window.model.partition(":")
        current = self.store.get_model(name, version)
        if current is None:
            return self._decide(fleet, "none", "current_unregistered",
                                f"{window.model} is not in the registry, so candidates cannot"
                                " be compared with it", {})
        since = utcnow() - dt.timedelta(seconds=s.samples_window_s)
        try:
            data = self.store.export_samples(since, fleet=fleet)
        except EdgekitError as exc:
            return self._decide(fleet, "none", "no_data", exc.message, {})
        if len(data) < s.min_samples:
            return self._decide(fleet, "none", "not_enough_samples",
                                f"{len(data)} labelled samples in the last"
                                f" {s.samples_window_s:g} s, {s.min_samples} needed",
                                {"samples": len(data)})
        train, holdout = split_holdout(data, s.holdout_fraction)
        current_path = self.registry.artifact_path(name, version)
        base = score_package(current_path, holdout, current.ref)
        numbers: dict[str, Any] = {"current": base.to_dict(), "samples": len(data),
                                   "held_out": len(holdout), "margin": s.margin,
                                   "metric": s.metric}
        best: tuple[Score, str] | None = None
        pool: list[tuple[Score, str]] = []  # every candidate, with where it came from
        if s.strategy != "retrain":
            scores = [score_package(self.registry.path_of(m), holdout, m.ref)
                      for m in registered_candidates(self.registry, current)]
            numbers["registered"] = [sc.to_dict() for sc in scores]
            self._event(fleet, "policy.candidates",
                        f"{len(scores)} registered candidate(s) scored on {len(holdout)}"
                        f" held-out samples; {current.ref}: {s.metric}"
                        f" {base.metric(s.metric):.4f}", data=numbers)
            pool += [(sc, "registered") for sc in scores]
            if scores:
                top = max(scores, key=lambda sc: sc.metric(s.metric))
                best = (top, "registered")
        beats = best is not None and \
            best[0].metric(s.metric) >= base.metric(s.metric) + s.margin
        if not beats and s.retrain_command and s.strategy != "registry":
            found = self._retrain(fleet, current, current_path, train, holdout, numbers)
            if found is not None:
                best = (found, "retrained")
                pool.append(best)
                beats = found.metric(s.metric) >= base.metric(s.metric) + s.margin
        if best is None:
            return self._decide(fleet, "none", "no_candidate",
                                f"no registered version of {name} newer than {version}"
                                " fits, and no retraining is configured", numbers)
        if s.pick == "shadow":
            return self._shadow_pick(fleet, window, pool, numbers)
        top, origin = best
        numbers["candidate"] = {**top.to_dict(), "origin": origin}
        gain = top.metric(s.metric) - base.metric(s.metric)
        summary = (f"{top.ref} {s.metric} {top.metric(s.metric):.4f} vs {current.ref}"
                   f" {base.metric(s.metric):.4f} on {len(holdout)} held-out samples"
                   f" (gain {gain:+.4f}, margin {s.margin:g})")
        if not beats:
            return self._decide(fleet, "none", "not_better", f"not better enough: {summary}",
                                numbers)
        return self._roll_out(fleet, top.ref, summary, f"{origin}_better", numbers)

    def _shadow_pick(self, fleet: str, window: Window, pool: list[tuple[Score, str]],
                     numbers: dict[str, Any]) -> int | None:
        """Shadow the best ``policy.shadow_candidates`` of ``pool`` (offline order) on the
        canary's devices and roll out the one with the best shadow evidence (:mod:`._pick`);
        its rollout skips the shadow stage it just passed on those devices."""
        s, r = self.settings, self.engine.settings
        ranked = sorted(pool, key=lambda p: -p[0].metric(s.metric))[:s.shadow_candidates]
        devices = trial_devices(self.store, fleet, window.sha256, r.canary, r.wave_factor)
        if not devices:
            return self._decide(fleet, "none", "no_shadow_devices", "no online device serves"
                                f" {window.model} to shadow the candidates on", numbers)
        self._event(fleet, "policy.shadow", f"shadowing {len(ranked)} candidate(s) in turn on"
                    f" {', '.join(devices)}", data={"devices": devices,
                                                    "candidates": [sc.ref for sc, _ in ranked]})
        evidence = run_trials(self.engine, fleet, [sc.ref for sc, _ in ranked], devices)
        numbers["shadow"] = [e.to_dict() for e in evidence]
        winner = pick_best(evidence)
        if winner is None:
            why = "; ".join(f"{e.model}: {', '.join(e.problems)}" for e in evidence)
            return self._decide(fleet, "none", "shadow_failed",
                                f"no candidate passed the shadow gate ({why})", numbers)
        score, origin = next(p for p in ranked if p[0].ref == winner.model)
        numbers["candidate"] = {**score.to_dict(), "origin": origin, "shadow": winner.to_dict()}
        summary = (f"{winner.model}: {winner.summary()} in shadow on {len(devices)} device(s),"
                   f" the best of {len(evidence)} candidate(s)")
        return self._roll_out(fleet, winner.model, summary, f"{origin}_shadow_best", numbers,
                              overrides={"shadow_enabled": False})

    def _roll_out(self, fleet: str, ref: str, summary: str, reason: str,
                  numbers: dict[str, Any],
                  overrides: dict[str, Any] | None = None) -> int | None:
        name, _, version = ref.partition(":")
        try:
            rollout = self.engine.create(fleet, name, version, source="policy", note=summary,
                                         overrides=overrides)
        except EdgekitError as exc:
            return self._decide(fleet, "none", "rollout_refused",
                                f"{summary}; the rollout was refused: {exc.message}", numbers)
        numbers["rollout"] = rollout.id
        return self._decide(fleet, "rollout", reason, f"rolling out {summary}", numbers,
                            rollout_id=rollout.id)

    def _retrain(self, fleet: str, current: Any, current_path: Path, train: Any,
                 holdout: Any, numbers: dict[str, Any]) -> Score | None:
        s = self.settings
        version = next_version(self.registry, current.name)
        stamp = utcnow().strftime("%Y%m%dT%H%M%S")
        job_dir = self.workdir / "policy" / f"{fleet}-{stamp}-{version}"
        self._event(fleet, "policy.retrain",
                    f"retraining {current.name} on {len(train)} field samples as {version}",
                    data={"samples": len(train), "version": version, "workdir": str(job_dir)})
        try:
            result = retrain(s.retrain_command, current=current, current_path=current_path,
                             train=train, holdout=holdout, workdir=job_dir,
                             output_name=s.retrain_output, version=version,
                             timeout_s=s.retrain_timeout_s, sign_key=self.signing_key)
            pushed = self.registry.push(result.package, parent=current.ref,
                                        data=f"field samples of fleet {fleet}, {len(train)}"
                                             f" samples (held out: {len(holdout)})")
            score = score_package(pushed.path, holdout, pushed.record.ref)
        except EdgekitError as exc:
            numbers["retrain_error"] = exc.message
            self._event(fleet, "policy.retrain_failed", f"retraining failed: {exc.message}",
                        level="error", reason="retrain_failed", data={"workdir": str(job_dir)})
            return None
        numbers["retrained"] = {**score.to_dict(), "converted": result.converted}
        return score

    def _decide(self, fleet: str, action: str, reason: str, message: str,
                numbers: dict[str, Any], rollout_id: int | None = None) -> int | None:
        """Record the decision; return the rollout it started, if any."""
        self._event(fleet, "policy.decision", message, reason=reason,
                    level="info" if action == "rollout" else "warning",
                    data={**numbers, "action": action}, rollout_id=rollout_id)
        return rollout_id

    def _event(self, fleet: str, kind: str, message: str, *, level: str = "info",
               reason: str | None = None, data: dict[str, Any] | None = None,
               rollout_id: int | None = None) -> None:
        log.log(logging.WARNING if level != "info" else logging.INFO, "%s: %s", fleet, message)
        self.store.record_event(fleet, kind, message, level=level, reason=reason, data=data,
                                rollout_id=rollout_id)
