"""What the console's pages show, read from the fleet database as plain JSON-ready dicts.

Each function takes a :class:`~edgekit.host.db.Store` and returns what one page's script
renders; nothing here writes. Label-free signals are computed with the policy's own
functions against the reference the policy recorded (its ``policy.reference`` event).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

from edgekit.host.controller import model_before
from edgekit.host.controller.policy import distribution_shift
from edgekit.host.db import EventRecord, MetricRecord, ModelRecord, RolloutRecord, Store, utcnow

__all__ = ["device_view", "events_view", "fleet_view", "iso", "models_view", "rollouts_view"]

_SIGNAL_WINDOW_S = 60.0  # label-free signals over the last minute of each device's metrics
_POLICY_KINDS = ["policy.reference", "policy.warning", "policy.warning_cleared"]
# Markers: the outcomes of the device's updates and the turning points of its fleet's
# rollouts; every other step stays in the event list (a marker per step is unreadable).
_DEVICE_MARKER_KINDS = {"update.succeeded", "update.failed", "update.rolled_back",
                        "rollout.device_timeout", "rollout.rollback_failed"}
_FLEET_MARKER_KINDS = {"rollout.created", "rollout.abort", "rollout.succeeded",
                       "rollout.aborted", "policy.fired"}
_MAX_EVENTS = 500
_HISTORY_ROLLOUTS = 50  # the device's update history looks at the fleet's latest rollouts


def iso(value: dt.datetime) -> str:
    """ISO 8601 in UTC (the database keeps UTC; a naive value is UTC)."""
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).astimezone(dt.UTC).isoformat()


def _ts(value: dt.datetime | None) -> str | None:
    return iso(value) if value is not None else None


def _event(e: EventRecord) -> dict[str, Any]:
    return {"id": e.id, "ts": iso(e.ts), "fleet": e.fleet, "device": e.device, "kind": e.kind,
            "level": e.level, "reason": e.reason, "message": e.message,
            "rollout": e.rollout_id}


def _policy_state(store: Store) -> dict[str, dict[str, Any]]:
    """Per fleet: the policy's label-free reference and its warnings still standing."""
    state: dict[str, dict[str, Any]] = {}
    for e in store.list_events(kinds=_POLICY_KINDS, limit=1000, latest=True):
        fleet = state.setdefault(e.fleet, {"reference": None, "warnings": {}})
        if e.kind == "policy.reference":
            fleet["reference"] = (e.data or {}).get("distribution") or None
            fleet["warnings"] = {}
        elif e.kind == "policy.warning" and e.reason:
            fleet["warnings"][e.reason] = e.message
        elif e.kind == "policy.warning_cleared" and e.reason:
            fleet["warnings"].pop(e.reason, None)
    return state


def _signals(records: list[MetricRecord], reference: dict[str, float] | None) -> dict[str, Any]:
    """Mean confidence, prediction count and distribution shift (total variation against
    the policy's reference) of one device's recent metrics."""
    histogram: Counter[str] = Counter()
    conf_sum, count = 0.0, 0
    for record in records:
        section = record.payload.get("predictions")
        if not isinstance(section, dict):
            continue
        n, conf, hist = section.get("count"), section.get("mean_confidence"), \
            section.get("histogram")
        if isinstance(hist, dict):
            histogram.update({str(k): v for k, v in hist.items() if isinstance(v, int)})
        if isinstance(n, int) and n > 0 and isinstance(conf, int | float):
            conf_sum += float(conf) * n
            count += n
    total = sum(histogram.values())
    shift = None
    if reference and total:
        shift = distribution_shift({k: v / total for k, v in histogram.items()}, reference, "tv")
    return {"confidence": conf_sum / count if count else None, "predictions": count,
            "shift": shift}


def fleet_view(store: Store) -> dict[str, Any]:
    """Every device with its model, figures, label-free signals and last contact."""
    now = utcnow()
    recent: dict[tuple[str, str], list[MetricRecord]] = {}
    for record in store.metrics_history(since=now - dt.timedelta(seconds=_SIGNAL_WINDOW_S)):
        recent.setdefault((record.fleet, record.device), []).append(record)
    policy = _policy_state(store)
    devices = []
    for d in store.list_devices():
        m = d.metrics
        reference = (policy.get(d.fleet) or {}).get("reference")
        devices.append({
            "fleet": d.fleet, "device": d.device, "online": d.online,
            "model": d.model_name, "version": d.model_version, "agent": d.agent_version,
            "variant": _variant_id(d.status),
            "p50": m.latency_p50_ms, "p95": m.latency_p95_ms, "accuracy": m.accuracy,
            "f1": m.f1, "labels": m.label_count, "estimated": m.estimated_accuracy,
            **_signals(recent.get((d.fleet, d.device), []), reference),
            "last_seen": _ts(d.last_seen)})
    warnings = {f: sorted(s["warnings"].values()) for f, s in policy.items() if s["warnings"]}
    return {"now": iso(now), "devices": devices, "warnings": warnings}


def _variant_id(status: dict[str, Any] | None) -> str | None:
    """The variant a device serves, from its status (packages of variants only)."""
    variant = (status or {}).get("variant")
    return str(variant.get("id")) if isinstance(variant, dict) else None


def _section(payload: dict[str, Any], key: str) -> dict[str, Any]:
    found = payload.get(key)
    return found if isinstance(found, dict) else {}


def _series(records: list[MetricRecord]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {k: [] for k in ("t", "accuracy", "f1", "estimated", "p50",
                                                  "p95", "rps", "confidence")}
    # By the device's clock: a queue flushed after a reconnect arrives late, out of order.
    for r in sorted(records, key=lambda r: (r.ts, r.session, r.seq)):
        p = r.payload
        quality, latency, preds = (_section(p, k) for k in ("quality", "latency", "predictions"))
        out["t"].append(r.ts.timestamp())
        out["accuracy"].append(quality.get("accuracy") if quality.get("labels") else None)
        out["f1"].append(quality.get("f1_macro") if quality.get("labels") else None)
        out["estimated"].append(_section(p, "estimate").get("accuracy"))
        out["p50"].append(latency.get("p50_ms") if latency.get("count") else None)
        out["p95"].append(latency.get("p95_ms") if latency.get("count") else None)
        out["rps"].append(p.get("throughput_rps"))
        out["confidence"].append(preds.get("mean_confidence"))
    return out


def device_view(store: Store, fleet: str, device: str, *,
                window_s: float = 1800.0) -> dict[str, Any] | None:
    """One device: its record, metric series, markers, update history and events; None
    when the database does not know it."""
    record = store.get_device(fleet, device)
    if record is None:
        return None
    since = utcnow() - dt.timedelta(seconds=window_s)
    series = _series(store.metrics_history(fleet, device=device, since=since))
    events = store.list_events(fleet=fleet, since=since, limit=2000, latest=True)
    markers = [{"t": e.ts.timestamp(), "kind": e.kind, "level": e.level,
                "label": _marker_label(e), "rollout": e.rollout_id}
               for e in events
               if (e.device == device and e.kind in _DEVICE_MARKER_KINDS) or
               (e.device is None and e.kind in _FLEET_MARKER_KINDS)]
    history = []
    for rollout in reversed(store.list_rollouts(fleet=fleet)[-_HISTORY_ROLLOUTS:]):
        for target in store.list_rollout_targets(rollout.id):
            if target.device == device:
                history.append({"rollout": rollout.id, "model": rollout.model_name,
                                "version": rollout.model_version,
                                "from": target.previous_version, "wave": target.wave,
                                "state": target.state, "reason": target.reason,
                                "updated": iso(target.updated)})
    own = store.list_events(fleet=fleet, device=device, limit=200, latest=True)
    variant = (record.status or {}).get("variant")
    return {"device": {**record.to_dict(), "status": None,
                       "variant": variant if isinstance(variant, dict) else None},
            "series": series,
            "markers": markers, "history": history,
            "events": [_event(e) for e in reversed(own)]}


def _marker_label(e: EventRecord) -> str:
    short = e.kind.split(".", 1)[1].replace("_", " ")
    if e.rollout_id is not None and e.kind.startswith("rollout."):
        return f"r{e.rollout_id} {short}"
    if e.kind == "policy.fired":
        return "policy fired"
    model = (e.data or {}).get("model")
    version = model.get("version") if isinstance(model, dict) else None
    if e.kind == "update.succeeded" and isinstance(version, str):
        return f"on {version}"
    return f"{short} {version}" if isinstance(version, str) else short


def _rollout(store: Store, r: RolloutRecord) -> dict[str, Any]:
    targets = store.list_rollout_targets(r.id)
    events = store.list_events(rollout_id=r.id, limit=200, latest=True)
    verdicts = [{"ts": iso(e.ts), "passed": e.kind == "rollout.quality",
                 "message": e.message, "data": e.data}
                for e in events if e.kind == "rollout.quality" or
                (e.kind == "rollout.abort" and e.reason == "quality")]
    counts = Counter(t.state for t in targets)
    return {**r.to_dict(), "plan": {k: r.plan.get(k) for k in ("waves", "canary", "source",
                                                               "scope", "note")},
            "active": r.state in ("pending", "running", "aborting"),
            "counts": dict(counts), "total": len(targets),
            "targets": [{"device": t.device, "wave": t.wave, "state": t.state,
                         "reason": t.reason, "from": t.previous_version,
                         "updated": iso(t.updated)} for t in targets],
            "verdicts": verdicts,
            "events": [_event(e) for e in reversed(events[-20:])]}


def rollouts_view(store: Store, *, limit: int = 30) -> dict[str, Any]:
    """The latest rollouts, newest first, with their waves, targets and verdicts, and what
    the start form offers (fleets and registered versions)."""
    records = list(reversed(store.list_rollouts()[-limit:]))
    rollouts = [_rollout(store, r) for r in records]
    newest: set[str] = set()
    for record, r in zip(records, rollouts, strict=True):
        # A fleet's latest succeeded fleet-wide rollout can be rolled back, to the model the
        # controller deployed before it (the controller picks it again from the same records
        # when the request comes).
        back = None
        if record.state == "succeeded" and record.plan.get("scope") == "fleet" and \
                record.fleet not in newest:
            newest.add(record.fleet)
            back = model_before(store, record)
        r["rollback_to"] = {"name": back["name"], "version": back["version"]} if back else None
    return {"rollouts": rollouts,
            "fleets": store.list_fleets(),
            "models": [{"name": m.name, "version": m.version} for m in store.list_models()]}


def _model(m: ModelRecord) -> dict[str, Any]:
    ev = m.evaluation or {}
    acc = ev.get("accuracy") or {}
    lat = ev.get("latency") or {}
    parity = ev.get("parity") or {}
    return {
        "name": m.name, "version": m.version, "sha256": m.sha256, "size": m.size,
        "format": m.format, "task": m.task, "created": iso(m.created), "parent": m.parent,
        "channels": m.channels, "signed": m.signed, "verified": m.signature_verified,
        "signer": m.key_id, "recipe": m.recipe,
        "parity": {"passed": parity.get("passed"), "samples": parity.get("samples"),
                   "cosine": parity.get("mean_cosine"),
                   "top1": parity.get("top1_agreement"),
                   "failures": parity.get("failures") or []} if parity else None,
        "accuracy_source": (acc.get("source") or {}).get("accuracy"),
        "accuracy_artifact": (acc.get("artifact") or {}).get("accuracy"),
        "f1_artifact": (acc.get("artifact") or {}).get("f1"),
        "eval_samples": acc.get("samples"),
        "latency_p50": (lat.get("artifact") or {}).get("p50_ms"),
        "latency_p95": (lat.get("artifact") or {}).get("p95_ms"),
        "latency_source_p50": (lat.get("source") or {}).get("p50_ms"),
    }


def models_view(store: Store) -> dict[str, Any]:
    """Registered versions, newest first, with their manifest evidence."""
    return {"models": [_model(m) for m in reversed(store.list_models())]}


def events_view(store: Store, *, after: int = 0, kind: str | None = None,
                device: str | None = None, rollout: int | None = None,
                fleet: str | None = None, limit: int = 200) -> dict[str, Any]:
    """Events matching the filters; ``kind`` ending in ``.`` or ``*`` matches a prefix.
    Without ``after`` the newest ``limit``; with it, those after that id (the live tail)."""
    limit = max(1, min(limit, _MAX_EVENTS))
    prefix = kind.rstrip("*") if kind and (kind.endswith(".") or kind.endswith("*")) else None
    found = store.list_events(after_id=after, fleet=fleet or None, device=device or None,
                              rollout_id=rollout, kinds=None if prefix is not None or not kind
                              else [kind], limit=limit if prefix is None else _MAX_EVENTS * 4,
                              latest=after == 0)
    if prefix is not None:
        found = [e for e in found if e.kind.startswith(prefix)][-limit:]
    return {"events": [_event(e) for e in found],
            "cursor": max([after, *(e.id for e in found)])}
