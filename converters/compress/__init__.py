"""Make models smaller and faster: accuracy-aware optimize, pruning, distillation.

- :func:`optimize`: convert every candidate recipe, measure each on the metric, latency and
  size, and keep the best one that meets an accuracy budget (keeping the most sensitive
  nodes in float when no int8 recipe meets it).
- :func:`prune`: magnitude pruning of PyTorch models, structured (channels really removed)
  or unstructured.
- :func:`distill`: knowledge distillation into a small PyTorch student.

Heavy frameworks are imported inside the functions that need them.
"""

from __future__ import annotations

from .candidates import Recipe, all_recipes, select_recipes
from .distill import DistillReport, distill, kd_loss
from .optimize import METRICS, OBJECTIVES, OptimizeResult, optimize
from .prune import PruneReport, prune, prune_module

__all__ = [
    "METRICS",
    "OBJECTIVES",
    "DistillReport",
    "OptimizeResult",
    "PruneReport",
    "Recipe",
    "all_recipes",
    "distill",
    "kd_loss",
    "optimize",
    "prune",
    "prune_module",
    "select_recipes",
]
