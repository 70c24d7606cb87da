"""The demo's report: ``summary.json`` and ``report.html`` with plots and the event log."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from converters.compress.report import spread_labels
from edgekit.host.demo.traffic import Record

__all__ = ["accuracy_by_phase", "accuracy_figure", "write_report"]


def accuracy_by_phase(records: list[Record], phases: list[str]) -> dict[str, float | None]:
    """Fleet accuracy over each phase's answers (None for a phase with no answers)."""
    out: dict[str, float | None] = {}
    for name in phases:
        hits = [r.correct for r in records if r.phase == name]
        out[name] = float(np.mean(hits)) if hits else None
    return out


def _rolling(records: list[Record], window_s: float, t0: float
             ) -> tuple[np.ndarray, np.ndarray]:
    if not records:
        return np.array([]), np.array([])
    t = np.array([r.t - t0 for r in records])
    c = np.array([1.0 if r.correct else 0.0 for r in records])
    grid = np.arange(max(window_s, t.min()), t.max() + 1e-9, 1.0)
    acc = np.array([c[(t > g - window_s) & (t <= g)].mean() if np.any((t > g - window_s) & (t <= g))
                    else np.nan for g in grid])
    return grid, acc


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def accuracy_figure(records: list[Record], markers: list[tuple[float, str]],
                    t0: float) -> Any:
    """Rolling accuracy per device with the phase and rollout markers (caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for dev in sorted({r.device for r in records}):
        grid, acc = _rolling([r for r in records if r.device == dev], 10.0, t0)
        ax.plot(grid, acc, label=dev, linewidth=1.2)
    ax.set_ylim(0, 1.02)
    texts = []
    for t, label in markers:
        ax.axvline(t - t0, color="grey", linestyle="--", linewidth=0.8)
        texts.append(ax.annotate(label, (t - t0, 0.02), xycoords=("data", "axes fraction"),
                                 xytext=(-2, 0), textcoords="offset points", rotation=90,
                                 fontsize=7, va="bottom", ha="right"))
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("accuracy (10 s window)")
    ax.set_title("Accuracy per device, with phase and rollout markers")
    ax.legend(loc="center right", fontsize=8)
    # Markers a few seconds apart (deploy, first device updated, ...) would print on top
    # of each other: step each label to the right of the one before.
    spread_labels(fig, texts, direction="right")
    return fig


def write_report(out: Path, summary: dict[str, Any], records: list[Record],
                 events: list[dict[str, Any]], markers: list[tuple[float, str]],
                 t0: float) -> Path:
    """Write summary.json and report.html into ``out``; return the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    devices = sorted({r.device for r in records})

    fig = accuracy_figure(records, markers, t0)
    acc_png = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 3))
    for dev in devices:
        rs = [r for r in records if r.device == dev]
        ax.plot([r.t - t0 for r in rs], [r.latency_ms for r in rs], ".", markersize=2, label=dev)
    ax.set_yscale("log")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("HTTP round trip (ms)")
    ax.set_title("Prediction latency seen by the application")
    ax.legend(loc="upper right", fontsize=8)
    lat_png = _png(fig)
    plt.close(fig)

    rows = "\n".join(
        f"<tr><td>{html.escape(str(e.get('ts', '')))}</td><td>{html.escape(str(e.get('device') or ''))}"
        f"</td><td>{html.escape(str(e.get('kind', '')))}</td>"
        f"<td>{html.escape(str(e.get('message', '')))}</td></tr>"
        for e in events
    )
    phases = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{'-' if v is None else f'{v:.3f}'}</td></tr>"
        for k, v in summary.get("fleet_accuracy", {}).items()
    )
    timings = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td></tr>"
        for k, v in summary.get("phase_seconds", {}).items()
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgekit demo report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}</style>
</head><body>
<h1>edgekit demo</h1>
<p>{html.escape(str(summary.get('devices')))} devices; model {html.escape(str(summary.get('initial_version')))}
 replaced by {html.escape(str(summary.get('final_version')))}.</p>
<h2>Fleet accuracy by phase</h2><table><tr><th>phase</th><th>accuracy</th></tr>{phases}</table>
<h2>Time per phase</h2><table><tr><th>phase</th><th>duration</th></tr>{timings}</table>
<h2>Accuracy per device</h2><img alt="accuracy per device" src="data:image/png;base64,{acc_png}">
<h2>Latency</h2><img alt="latency" src="data:image/png;base64,{lat_png}">
<h2>Event log</h2><table><tr><th>time</th><th>device</th><th>kind</th><th>message</th></tr>
{rows}</table>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
