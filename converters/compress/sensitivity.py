"""Keep just enough sensitive nodes in float to bring static int8 within the budget.

Method: start from the best static (QDQ) int8 candidate. For each node it quantized (or, in
a large graph, each run of consecutive nodes), convert with only that node quantized and
every other one in float, and score it on a small evaluation subset: the loss against the
source is that node's own damage, even when it only shows together with a neighbour (a
quantized output feeding a quantized input). Then keep the most damaging nodes in float,
taking the shortest prefix of that ranking that meets the budget on the full evaluation
data (found by doubling, then bisecting, so a graph with many nodes costs few conversions).
Every probe and step is recorded for the manifest.

:func:`keep_nodes_in_float` does the same inside one conversion, on the graph: its score is
the worst calibration sample's output cosine to the float model (a floor every sample must
reach, not an average), and each probe is one quantization of the graph, not a package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgekit.artifact import open_package

from .candidates import Recipe
from .report import change_text

__all__ = ["keep_nodes_in_float", "keep_sensitive_in_float"]

METHOD = ("quantize one node (or run of nodes) at a time, all others in float, on the first"
          " samples of the evaluation data; rank by the loss; keep the shortest top-ranked"
          " prefix in float that meets the budget on the full evaluation data")


GRAPH_METHOD = ("quantize every candidate node; when a calibration sample's output cosine to"
                " the float model is below the floor, quantize one node (or run of nodes) at"
                " a time with all others in float, rank them by how far the worst sample"
                " falls, and keep the shortest top-ranked prefix in float that brings every"
                " sample to the floor")


def keep_nodes_in_float(worst: Callable[[list[str]], tuple[bytes, float, float]],
                        candidates: list[str], *, min_cosine: float, samples: int,
                        max_probes: int = 48) -> tuple[bytes, dict[str, Any]]:
    """The quantized graph with the fewest top-ranked ``candidates`` kept in float for which
    the worst sample's cosine reaches ``min_cosine``.

    ``worst(kept)`` quantizes with ``kept`` in float and returns the model, the minimum and
    the mean per-sample cosine. When even every candidate in float misses the floor, the
    plain quantized graph is returned and the record says so (``met`` false).
    """
    record: dict[str, Any] = {"min_cosine": min_cosine, "samples": samples,
                              "method": GRAPH_METHOD, "probes": [], "steps": [],
                              "kept_in_float": []}
    plain, low, mean = worst([])
    record["plain"] = {"min_cosine": low, "mean_cosine": mean}
    if low >= min_cosine or not candidates:
        record.update(met=low >= min_cosine, final={"min_cosine": low, "mean_cosine": mean},
                      outcome="every sample meets the floor with all nodes in int8"
                      if low >= min_cosine else "no node can be kept in float")
        return plain, record
    groups = _chunks(candidates, max(1, min(max_probes, len(candidates))))
    costs = []
    for group in groups:
        _, g_low, g_mean = worst([n for n in candidates if n not in group])
        costs.append(1.0 - g_low)
        record["probes"].append({"int8_nodes": group, "min_cosine": g_low,
                                 "mean_cosine": g_mean})
    ranked = sorted(range(len(groups)), key=lambda i: costs[i], reverse=True)
    order = {n: i for i, n in enumerate(candidates)}
    tried: dict[int, tuple[bytes, float, float, list[str]]] = {}

    def passes(k: int) -> bool:
        if k not in tried:
            kept = sorted((n for i in ranked[:k] for n in groups[i]), key=order.__getitem__)
            model, k_low, k_mean = worst(kept)
            tried[k] = (model, k_low, k_mean, kept)
            record["steps"].append({"kept_in_float": kept, "min_cosine": k_low,
                                    "mean_cosine": k_mean})
        return tried[k][1] >= min_cosine

    shortest = _shortest_passing(passes, len(groups))
    if shortest is None:
        record.update(met=False, final=record["plain"],
                      outcome=f"even with all {len(candidates)} candidate nodes in float a"
                              " sample stays below the floor: the loss comes from elsewhere")
        return plain, record
    model, k_low, k_mean, kept = tried[shortest]
    record.update(met=True, kept_in_float=kept,
                  final={"min_cosine": k_low, "mean_cosine": k_mean},
                  outcome=f"{len(kept)} of {len(candidates)} nodes kept in float bring every"
                          " sample to the floor")
    return model, record


def _ordered_nodes(path: Any) -> list[str]:
    """The nodes the quantizer quantized, in graph order.

    In a QDQ graph those are the nodes that read a DequantizeLinear output: weight ops and
    activation-only ops alike (a MatMul of two activations, Softmax, Add). Nodes the
    converter reported as quantizable but that the graph no longer shows come last.
    """
    import onnx

    pkg = open_package(path)
    graph = onnx.load_from_string(pkg.model_bytes()).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    found = [n.name for n in graph.node
             if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and n.name
             and any(i in dequantized for i in n.input)]
    reported = pkg.manifest.recipe.get("quantizable_nodes") or {}
    extra = [n for group in reported.values() for n in group if n not in found]
    return list(dict.fromkeys(found + extra))


def _chunks(names: list[str], count: int) -> list[list[str]]:
    size, extra = divmod(len(names), count)
    out, start = [], 0
    for i in range(count):
        stop = start + size + (1 if i < extra else 0)
        out.append(names[start:stop])
        start = stop
    return [c for c in out if c]


def keep_sensitive_in_float(runner: Any, base_row: dict[str, Any], base: Recipe, *,
                            samples: int, max_probes: int,
                            progress: Callable[[str], None]
                            ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Probe the nodes of ``base``, then search the smallest set to keep in float.

    Returns the mixed-precision candidate's row (None when there is nothing to probe) and
    the record of what was measured.
    """
    metric = runner.metric
    record: dict[str, Any] = {"base": base.name, "base_metric": base_row["metric"],
                              "metric": metric, "method": METHOD, "probes": [], "steps": [],
                              "kept_in_float": []}
    names = _ordered_nodes(runner.packages[base.name])
    record["nodes"] = names
    if not names:
        record["outcome"] = "the quantizer reported no nodes that could stay in float"
        return None, record
    groups = _chunks(names, max(1, min(max_probes, len(names))))
    subset = min(samples, len(runner.eval_set))
    record["probe_samples"] = subset
    progress(f"no int8 candidate meets the budget: probing {len(names)} nodes of {base.name}"
             f" in {len(groups)} probe(s) on {subset} samples")
    losses = _probe(runner, base, names, groups, subset, record, progress)
    ranked = sorted(range(len(groups)), key=lambda i: losses[i], reverse=True)
    record["ranking"] = [groups[i] for i in ranked]
    order = {n: i for i, n in enumerate(names)}
    tried: dict[int, dict[str, Any]] = {}

    def attempt(k: int) -> dict[str, Any]:
        if k not in tried:
            kept = sorted((n for i in ranked[:k] for n in groups[i]), key=order.__getitem__)
            row = runner.run(base.with_float_nodes(kept, f"{base.label}+float({len(kept)})"))
            tried[k] = row
            record["steps"].append({"kept_in_float": kept, "metric": row["metric"],
                                    "drop": row["drop"], "meets_budget": row["meets_budget"],
                                    "status": row["status"]})
            progress(f"  {len(kept)} node(s) in float: "
                     + (f"{metric} {row['metric']:.4f} ({change_text(row['drop'])})"
                        if row["status"] == "ok" else f"failed ({row['error']})"))
        return tried[k]

    shortest = _shortest_passing(lambda k: bool(attempt(k)["meets_budget"]), len(groups))
    if shortest is None:
        record["outcome"] = (f"even with all {len(names)} nodes in float the budget is not"
                             " met: the loss comes from elsewhere (inputs, other operators)")
        final = tried[len(groups)]
    else:
        final = tried[shortest]
        record["kept_in_float"] = final["nodes_in_float"]
        record["outcome"] = (f"{len(final['nodes_in_float'])} of {len(names)} nodes kept in"
                             " float meet the budget")
    for row in tried.values():
        if row is not final:
            path = runner.packages.pop(row["name"], None)
            if path is not None:
                path.unlink(missing_ok=True)
    return final, record


def _probe(runner: Any, base: Recipe, names: list[str], groups: list[list[str]], subset: int,
           record: dict[str, Any], progress: Callable[[str], None]) -> list[float]:
    """The metric loss with only each group in int8 (infinite for a probe that failed);
    each probe is added to ``record``."""
    losses: list[float] = []
    for i, group in enumerate(groups, 1):
        others = [n for n in names if n not in group]
        row = runner.run(base.with_float_nodes(others, "probe"), subset=subset, keep=False)
        # A probe that fails to convert is treated as most sensitive: safe to keep in float.
        loss = row["drop"] if row["status"] == "ok" else float("inf")
        losses.append(loss)
        record["probes"].append({"int8_nodes": group, "metric": row["metric"],
                                 "loss": row["drop"], "status": row["status"],
                                 "error": row["error"]})
        shown = group[0] if len(group) == 1 else f"{group[0]} .. {group[-1]}"
        progress(f"  probe {i}/{len(groups)}: only {shown} in int8 -> "
                 + (f"{runner.metric} {row['metric']:.4f} (loss {row['drop']:+.4f})"
                    if row["status"] == "ok" else f"failed ({row['error']})"))
    return losses


def _shortest_passing(passes: Callable[[int], bool], count: int) -> int | None:
    """The smallest k in 1..count for which ``passes(k)`` (which grows with k), or None.

    Doubling finds a passing k; bisection then finds the smallest one.
    """
    lo, hi, k = 0, None, 1
    while hi is None:
        k = min(k, count)
        if passes(k):
            hi = k
        elif k == count:
            return None
        else:
            lo, k = k, k * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi
