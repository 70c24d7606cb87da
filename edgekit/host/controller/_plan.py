"""Pieces of the rollout engine that need no MQTT: plans, wave sizes, field quality.

A rollout's plan (the ``plan`` JSON of its row) freezes the ``[rollout]`` settings it was
created with, so a controller restarted with another configuration carries on with the
rules the rollout started under.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

from edgekit.errors import ConfigError
from edgekit.host.controller.config import RolloutSection, load_config, parse_canary
from edgekit.host.db import DeviceRecord, MetricRecord, Store

__all__ = [
    "Figures",
    "QualityVerdict",
    "baseline_figures",
    "judge_quality",
    "latest_figures",
    "plan_settings",
    "recorded_baselines",
    "wave_sizes",
]

# How far back the previous model's field figures are looked up when a device is assigned.
_BASELINE_LOOKBACK = dt.timedelta(hours=6)


def plan_settings(base: RolloutSection, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The ``[rollout]`` settings of a new rollout: ``base`` with ``overrides`` applied.

    Raises:
        ConfigError: an override names an unknown key or has a bad value (named as
            ``rollout.<key>``).
    """
    settings = dataclasses.asdict(base)
    for key, value in (overrides or {}).items():
        if key not in settings:
            raise ConfigError(f"unknown rollout setting {key!r}",
                              hint=f"known: {', '.join(sorted(settings))}")
        settings[key] = value
    checked = load_config(overrides={f"rollout.{k}": v for k, v in settings.items()})
    return dataclasses.asdict(checked.rollout)


def wave_sizes(targets: int, canary: str, factor: float) -> list[int]:
    """Sizes of the waves for ``targets`` devices: the canary, then growing by ``factor``."""
    if targets <= 0:
        return []
    sizes = [parse_canary(canary, targets)]
    size = float(sizes[0])
    while sum(sizes) < targets:
        size *= factor
        sizes.append(min(max(1, math.ceil(size - 1e-9)), targets - sum(sizes)))
    return sizes


@dataclass(frozen=True)
class Figures:
    """A device's field quality with one model: the labels in its window and the scores."""

    labels: int
    accuracy: float | None
    f1: float | None

    def metric(self, name: str) -> float | None:
        return self.accuracy if name == "accuracy" else self.f1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _figures(record: MetricRecord) -> Figures | None:
    quality = record.payload.get("quality")
    if not isinstance(quality, dict):
        return None
    labels = quality.get("labels")
    if not isinstance(labels, int) or labels <= 0:
        return None
    acc, f1 = quality.get("accuracy"), quality.get("f1_macro")
    return Figures(labels, float(acc) if isinstance(acc, int | float) else None,
                   float(f1) if isinstance(f1, int | float) else None)


def _model_sha(record: MetricRecord) -> str | None:
    model = record.payload.get("model")
    return model.get("sha256") if isinstance(model, dict) else None


def latest_figures(store: Store, fleet: str, device: str, since: dt.datetime,
                   sha256: str) -> Figures | None:
    """The newest labelled figures a device reported with the model ``sha256`` since ``since``."""
    for record in reversed(store.metrics_history(fleet, device=device, since=since)):
        if _model_sha(record) == sha256:
            found = _figures(record)
            if found is not None:
                return found
    return None


def recorded_baselines(store: Store, rollout_id: int) -> dict[str, Figures]:
    """The previous model's figures of each device of a rollout, as recorded (in its
    ``rollout.wave`` events) when the device's wave began."""
    out: dict[str, Figures] = {}
    for event in store.list_events(rollout_id=rollout_id, kinds=["rollout.wave"],
                                   limit=100_000):
        for device, figures in ((event.data or {}).get("baseline") or {}).items():
            if isinstance(figures, dict):
                out[device] = Figures(int(figures["labels"]), figures.get("accuracy"),
                                      figures.get("f1"))
    return out


def baseline_figures(store: Store, device: DeviceRecord, now: dt.datetime) -> Figures | None:
    """What the device reported lately with the model it serves now (the previous model of a
    rollout that is about to update it)."""
    if device.model_sha256 is None:
        return None
    return latest_figures(store, device.fleet, device.device, now - _BASELINE_LOOKBACK,
                          device.model_sha256)


@dataclass(frozen=True)
class QualityVerdict:
    """The canary's quality check: ``decided`` once both models have enough labels."""

    decided: bool
    passed: bool
    metric: str
    new: float | None
    previous: float | None
    new_labels: int
    previous_labels: int
    devices: int
    note: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def judge_quality(pairs: list[tuple[Figures | None, Figures | None]], *, metric: str,
                  margin: float, min_labels: int) -> QualityVerdict:
    """Compare the new model (first of each pair) with the previous one on the same devices.

    The score of each model is the label-weighted mean of its devices' window scores. The
    check decides once both have ``min_labels`` labels: it fails when the new score is below
    the previous one by more than ``margin``.
    """
    both = [(new, old) for new, old in pairs if new is not None and old is not None
            and new.metric(metric) is not None and old.metric(metric) is not None]
    new_labels = sum(n.labels for n, _ in both)
    old_labels = sum(o.labels for _, o in both)
    no_baseline = not any(old is not None and old.metric(metric) is not None
                          for _, old in pairs)

    def weighted(items: list[Figures]) -> float | None:
        total = sum(f.labels for f in items)
        if not total:
            return None
        return sum(f.labels * float(f.metric(metric) or 0.0) for f in items) / total

    new_score = weighted([n for n, _ in both])
    old_score = weighted([o for _, o in both])
    def verdict(decided: bool, passed: bool, note: str) -> QualityVerdict:
        return QualityVerdict(decided=decided, passed=passed, metric=metric, new=new_score,
                              previous=old_score, new_labels=new_labels,
                              previous_labels=old_labels, devices=len(both), note=note)

    if no_baseline:
        return verdict(True, True, "no field figures of the previous model: nothing to compare")
    if new_labels < min_labels or old_labels < min_labels:
        return verdict(False, True, f"waiting for {min_labels} labels of each model")
    assert new_score is not None and old_score is not None
    return verdict(True, new_score >= old_score - margin,
                   f"{metric} {new_score:.4f} with the new model vs {old_score:.4f} with the"
                   f" previous one on the same {len(both)} device(s) (margin {margin:g})")
