"""The optimize decision and how it is shown: choice with its reason, table, plot.

A row is a plain dict (it goes into the chosen artifact's manifest as JSON):

``name, target, quantize, per_channel, calibration_method, nodes_in_float, status
("ok" / "failed"), error, metric, drop, meets_budget, latency_p50_ms, latency_p95_ms,
latency_ratio (to the source model), size_bytes, convert_s, warnings``.
"""

from __future__ import annotations

import os
from typing import Any

from edgekit.fsutil import atomic_write

__all__ = ["TIE_TOLERANCE", "change_text", "choose", "draw_plot", "format_table",
           "nodes_text", "write_plot"]

# Latencies within this fraction of the fastest are a tie (timing noise on a shared CPU):
# among tied candidates the smaller one wins, which usually means the int8 one.
TIE_TOLERANCE = 0.05


def nodes_text(nodes: list[str], limit: int = 4) -> str:
    """A short list of node names: all of them when few, else the first ones and a count."""
    if len(nodes) <= limit:
        return ", ".join(nodes)
    return f"{len(nodes)} nodes: {', '.join(nodes[:limit])}, ... (+{len(nodes) - limit} more)"


def change_text(drop: float) -> str:
    """A metric change in words: ``drop 0.0030``, ``gain 0.0044`` or ``no change``."""
    if drop > 0:
        return f"drop {drop:.4f}"
    if drop < 0:
        return f"gain {-drop:.4f}"
    return "no change"


def _rank(rows: list[dict[str, Any]], objective: str) -> list[dict[str, Any]]:
    """Best first. For latency, candidates within :data:`TIE_TOLERANCE` of the fastest
    count as tied and the smallest of them leads (then the rest by latency)."""
    if objective == "size":
        return sorted(rows, key=lambda r: (r["size_bytes"], r["latency_p50_ms"]))
    by_time = sorted(rows, key=lambda r: (r["latency_p50_ms"], r["size_bytes"]))
    if not by_time:
        return by_time
    limit = by_time[0]["latency_p50_ms"] * (1.0 + TIE_TOLERANCE)
    tied = sorted((r for r in by_time if r["latency_p50_ms"] <= limit),
                  key=lambda r: (r["size_bytes"], r["latency_p50_ms"]))
    return tied + [r for r in by_time if r["latency_p50_ms"] > limit]


def _describe(row: dict[str, Any], metric: str) -> str:
    return (f"{metric} {row['metric']:.4f} ({change_text(row['drop'])}), "
            f"p50 {row['latency_p50_ms']:.3f} ms, {row['size_bytes'] / 1024:.1f} KiB")


def choose(rows: list[dict[str, Any]], *, metric: str, max_drop: float, objective: str,
           fallback: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str]:
    """The best row within the budget for the objective, and a sentence that says why."""
    ok = [r for r in rows if r["status"] == "ok"]
    within = _rank([r for r in ok if r["meets_budget"]], objective)
    missed = [r for r in ok if not r["meets_budget"]]
    failed = [r for r in rows if r["status"] != "ok"]
    tail = []
    if missed:
        worst = max(missed, key=lambda r: r["drop"])
        tail.append(f"{len(missed)} missed the budget (worst: {worst['name']},"
                    f" {change_text(worst['drop'])})")
    if failed:
        tail.append(f"{len(failed)} failed to convert ({', '.join(r['name'] for r in failed)})")
    if fallback is not None:
        kept = fallback.get("kept_in_float") or []
        if kept:
            tail.append(f"no int8 recipe met the budget, so {fallback['base']} was retried with"
                        f" {len(kept)} sensitive node(s) kept in float: {nodes_text(kept)}")
        else:
            tail.append(f"no int8 recipe met the budget and keeping nodes in float did not"
                        f" help ({fallback.get('outcome', '')})")
    if not within:
        return None, (f"no candidate keeps the {metric} drop within {max_drop:g}"
                      + ("; " + "; ".join(tail) if tail else ""))
    best = within[0]
    goal = "smallest" if objective == "size" else "fastest"
    if objective == "latency" and best["latency_p50_ms"] > within_fastest(within):
        goal = (f"smallest of those tied for fastest (p50 within"
                f" {TIE_TOLERANCE:.0%})")
    reason = (f"{best['name']} is the {goal} of the {len(within)} candidate(s) within the"
              f" budget ({metric} drop <= {max_drop:g}): {_describe(best, metric)}")
    if best.get("latency_ratio"):
        reason += f", {best['latency_ratio']:.2f}x the source model's latency"
    if len(within) > 1:
        reason += f"; runner-up {within[1]['name']}: {_describe(within[1], metric)}"
    if tail:
        reason += "; " + "; ".join(tail)
    return best, reason


def within_fastest(rows: list[dict[str, Any]]) -> float:
    """The lowest p50 latency of the rows."""
    return min(r["latency_p50_ms"] for r in rows)


def format_table(rows: list[dict[str, Any]], *, metric: str, source: dict[str, Any],
                 chosen: str | None) -> str:
    """The candidate table as text: one line per candidate, the source model first."""
    head = ("candidate", metric, "change", "budget", "p50 ms", "p95 ms", "vs source",
            "size KiB", "note")
    lines: list[tuple[str, ...]] = [head]
    lines.append((f"source ({source['framework']})", f"{source['metric']:.4f}", "-", "-",
                  _ms(source.get("latency_p50_ms")), _ms(source.get("latency_p95_ms")),
                  "1.00x", "-", ""))
    for r in rows:
        mark = "* " if r["name"] == chosen else ""
        if r["status"] != "ok":
            lines.append((mark + r["name"], "-", "-", "-", "-", "-", "-", "-",
                          f"failed: {r['error']}"))
            continue
        note = ""
        if r["nodes_in_float"]:
            note = "float: " + nodes_text(r["nodes_in_float"])
        ratio = f"{r['latency_ratio']:.2f}x" if r.get("latency_ratio") else "-"
        lines.append((mark + r["name"], f"{r['metric']:.4f}", change_text(r["drop"]),
                      "ok" if r["meets_budget"] else "MISS", _ms(r.get("latency_p50_ms")),
                      _ms(r.get("latency_p95_ms")), ratio, f"{r['size_bytes'] / 1024:.1f}",
                      note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    out = []
    for line in lines:
        cells = [line[0].ljust(widths[0])]
        cells += [line[i].rjust(widths[i]) for i in range(1, len(head) - 1)]
        out.append("  ".join(cells + [line[-1]]).rstrip())
    return "\n".join(out)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def spread_labels(fig: Any, labels: list[Any], *, direction: str = "up",
                  limit: int = 60) -> None:
    """Move annotation labels (``ax.annotate`` with ``textcoords="offset points"``) apart
    until no two overlap: each, in order, steps ``up`` or ``right`` past the ones placed
    before it. Candidates and rollout markers often sit on top of each other."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for label in labels:
        for _ in range(limit):
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            dx, dy = label.xyann
            pixels_per_point = fig.dpi / 72.0
            if direction == "right":
                label.xyann = (dx + box.width / pixels_per_point + 1, dy)
            else:
                label.xyann = (dx, dy + box.height / pixels_per_point + 1)
        placed.append(label.get_window_extent(renderer))


def write_plot(path: str | os.PathLike[str], rows: list[dict[str, Any]], *, metric: str,
               threshold: float, source: dict[str, Any], chosen: str | None,
               title: str) -> None:
    """Metric against latency, one point per candidate, the budget as a dashed line.

    Raises:
        OutputWriteError: the PNG cannot be written.
    """
    from matplotlib import pyplot as plt

    fig = draw_plot(rows, metric=metric, threshold=threshold, source=source, chosen=chosen,
                    title=title)
    try:
        with atomic_write(path) as handle:
            fig.savefig(handle, format="png")
    finally:
        plt.close(fig)


def draw_plot(rows: list[dict[str, Any]], *, metric: str, threshold: float,
              source: dict[str, Any], chosen: str | None, title: str) -> Any:
    """The figure of :func:`write_plot` (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    # Candidates often crowd together; numbers on the points and a key beside the axes
    # keep every name readable.
    fig, (ax, key) = plt.subplots(1, 2, figsize=(12, 6), dpi=110,
                                  gridspec_kw={"width_ratios": [3, 1.4]})
    ok = [r for r in rows if r["status"] == "ok" and r.get("latency_p50_ms") is not None]
    lines = []
    labels = []
    for i, r in enumerate(ok, 1):
        color = "tab:green" if r["meets_budget"] else "tab:red"
        chosen_here = r["name"] == chosen
        ax.scatter(r["latency_p50_ms"], r["metric"], c=color,
                   marker="*" if chosen_here else "o", s=220 if chosen_here else 45,
                   zorder=3)
        labels.append(ax.annotate(str(i), (r["latency_p50_ms"], r["metric"]), fontsize=7,
                                  xytext=(4, 2), textcoords="offset points"))
        lines.append(f"{i:>2} {'*' if chosen_here else ' '} {r['name']}"
                     f"  {r['metric']:.4f}  {r['latency_p50_ms']:.3f} ms")
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    lines += [f"   failed: {name}" for name in failed]
    if source.get("latency_p50_ms") is not None:
        ax.scatter(source["latency_p50_ms"], source["metric"], c="black", marker="x", s=60,
                   zorder=3, label=f"source ({source['framework']})")
    latencies = [r["latency_p50_ms"] for r in ok] + [source.get("latency_p50_ms") or 0]
    positive = [v for v in latencies if v and v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_xscale("log")
    ax.axhline(threshold, color="tab:blue", linestyle="--", linewidth=1,
               label=f"budget: {metric} >= {threshold:.4f}")
    ax.set_xlabel("latency p50, batch 1 (ms)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    key.axis("off")
    key.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace",
             fontsize=7, transform=key.transAxes)
    fig.tight_layout()
    spread_labels(fig, labels)
    return fig
