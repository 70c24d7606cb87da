"""Channel dependencies in an exported PyTorch graph, and their removal.

Structured pruning removes whole output channels of a Conv or Linear layer (the
*producer*). That is only exact when every use of the producer's output is understood: the
channels pass through per-channel operations (activations, pooling, BatchNorm, dropout),
maybe a flatten, and end in the input side of the next Conv or Linear layers (the
*consumers*), whose weights then lose the matching input columns. A producer whose output
reaches anything else (a residual add, a concatenation, the model output, a shared weight)
is left alone, and the plan says why.

The analysis runs on the unlifted module of a ``torch.export`` program (ATen operators with
``get_attr`` parameters), so it works the same for a ``.pt2`` file and for an ``nn.Module``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ChannelGroup", "apply_groups", "plan_groups"]


@dataclass
class ChannelGroup:
    """One producer layer and everything that must shrink with its output channels."""

    layer: str
    channels: int
    weight: str
    bias: str | None = None
    norm: list[str] = field(default_factory=list)  # BatchNorm weight, bias, mean, var
    norm_eps: float = 1e-5
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (weight, features/channel)
    reshapes: list[tuple[Any, int, int]] = field(default_factory=list)  # (node, position, per)
    keep: list[int] = field(default_factory=list)


def _ops() -> dict[str, set[Any]]:
    import torch

    aten = torch.ops.aten
    return {
        "producer": {aten.conv1d.default, aten.conv2d.default, aten.linear.default},
        "elementwise": {
            aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default,
            aten.sigmoid.default, aten.tanh.default, aten.hardtanh.default,
            aten.hardswish.default, aten.leaky_relu.default, aten.elu.default,
            aten.dropout.default, aten.clone.default, aten.contiguous.default,
            aten.alias.default,
        },
        "spatial": {
            aten.max_pool1d.default, aten.max_pool2d.default, aten.avg_pool1d.default,
            aten.avg_pool2d.default, aten.adaptive_avg_pool1d.default,
            aten.adaptive_avg_pool2d.default,
        },
        "norm": {aten.batch_norm.default},
        "flatten": {aten.flatten.using_ints},
        "reshape": {aten.view.default, aten.reshape.default},
    }


def _shape(node: Any) -> tuple[Any, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if val is not None and hasattr(val, "shape") else None


def _param(node: Any) -> str | None:
    """The parameter name behind a graph argument, if it is a ``get_attr`` used only here."""
    if getattr(node, "op", None) != "get_attr" or len(node.users) != 1:
        return None
    return str(node.target)


def _groups_arg(node: Any) -> int:
    args = list(node.args) + [None] * 7
    return int(args[6]) if args[6] is not None else 1


def plan_groups(gm: Any) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Find every prunable producer; also say why the others cannot be pruned.

    Returns the groups and a ``{layer: reason}`` map of the producers left alone.
    """
    ops = _ops()
    groups: list[ChannelGroup] = []
    skipped: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ops["producer"]:
            continue
        weight = _param(node.args[1])
        layer = str(getattr(node.args[1], "target", node.name)).rsplit(".", 1)[0]
        if weight is None:
            skipped[layer] = "its weight is shared or computed"
            continue
        is_linear = "linear" in str(node.target)
        if not is_linear and _groups_arg(node) != 1:
            skipped[layer] = "grouped convolution"
            continue
        bias_node = node.args[2] if len(node.args) > 2 else None
        bias = _param(bias_node) if bias_node is not None else None
        if bias_node is not None and bias is None:
            skipped[layer] = "its bias is shared or computed"
            continue
        shape = _shape(node)
        if shape is None:
            skipped[layer] = "no shape information"
            continue
        group = ChannelGroup(layer=layer, channels=int(shape[-1] if is_linear else shape[1]),
                             weight=weight, bias=bias)
        reason = _follow(node, group, dim=len(shape) - 1 if is_linear else 1, per=1, ops=ops)
        if reason:
            skipped[layer] = reason
        elif group.channels < 2:
            skipped[layer] = "a single channel"
        else:
            groups.append(group)
    return groups, skipped


def _follow(node: Any, group: ChannelGroup, *, dim: int, per: int,
            ops: dict[str, set[Any]]) -> str | None:
    """Walk the users of ``node``; fill ``group``; return why it cannot be pruned, or None."""
    shape = _shape(node)
    if not node.users:
        return "its output is unused"
    for user in node.users:
        if user.op == "output":
            return "it feeds the model output"
        if user.op != "call_function" or user.args[0] is not node:
            return f"its output feeds {user.name} in an unsupported position"
        target = user.target
        if target in ops["elementwise"]:
            reason = _follow(user, group, dim=dim, per=per, ops=ops)
        elif target in ops["spatial"] and dim == 1 and per == 1:
            reason = _follow(user, group, dim=dim, per=per, ops=ops)
        elif target in ops["norm"] and dim == 1 and per == 1:
            names = [_param(a) for a in user.args[1:5]]
            if any(n is None for n in names):
                return f"BatchNorm {user.name} has shared or missing parameters"
            group.norm = [n for n in names if n is not None]
            group.norm_eps = float(user.args[7])
            reason = _follow(user, group, dim=dim, per=per, ops=ops)
        elif target in ops["flatten"] or target in ops["reshape"]:
            reason = _flatten(node, user, group, dim=dim, per=per, ops=ops, shape=shape)
        elif target in ops["producer"]:
            reason = _consumer(user, group, dim=dim, per=per, ndim=len(shape or ()))
        else:
            reason = f"its output feeds {target} ({user.name})"
        if reason:
            return reason
    return None


def _flatten(node: Any, user: Any, group: ChannelGroup, *, dim: int, per: int,
             ops: dict[str, set[Any]], shape: tuple[Any, ...] | None) -> str | None:
    out = _shape(user)
    if shape is None or out is None or dim != 1 or len(out) != 2 or len(shape) < 2:
        return f"its output is reshaped by {user.name} in a way that mixes channels"
    spatial = math.prod(int(d) for d in shape[2:])
    if int(out[1]) != group.channels * per * spatial:
        return f"its output is reshaped by {user.name} in a way that mixes channels"
    if user.target in ops["reshape"]:
        dims = list(user.args[1])
        literal = [i for i, d in enumerate(dims) if d == int(out[1])]
        if len(literal) != 1 or literal[0] != 1:
            return f"reshape {user.name} has no literal feature size to adjust"
        group.reshapes.append((user, 1, per * spatial))
    return _follow(user, group, dim=1, per=per * spatial, ops=ops)


def _consumer(user: Any, group: ChannelGroup, *, dim: int, per: int, ndim: int) -> str | None:
    weight = _param(user.args[1])
    if weight is None:
        return f"the weight of {user.name} is shared or computed"
    if "linear" in str(user.target):
        if dim != ndim - 1:
            return f"{user.name} is a Linear over a non-channel axis"
    elif dim != 1 or per != 1 or _groups_arg(user) != 1:
        return f"{user.name} is a grouped or non-channel convolution"
    group.consumers.append((weight, per))
    return None


def channel_importance(gm: Any, group: ChannelGroup) -> Any:
    """L2 norm of each output filter, scaled by the following BatchNorm's gain if any."""
    import torch

    w = gm.get_parameter(group.weight).detach()
    score = w.reshape(w.shape[0], -1).norm(dim=1)
    if group.norm:
        gamma = _tensor(gm, group.norm[0]).detach()
        var = _tensor(gm, group.norm[3]).detach()
        score = score * gamma.abs() / torch.sqrt(var + group.norm_eps)
    return score


def _tensor(gm: Any, name: str) -> Any:
    prefix, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(prefix) if prefix else gm, attr)


def _replace(gm: Any, name: str, dim: int, index: Any) -> None:
    import torch

    prefix, _, attr = name.rpartition(".")
    owner = gm.get_submodule(prefix) if prefix else gm
    old = getattr(owner, attr)
    new = torch.index_select(old.detach(), dim, index).clone()
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, attr, torch.nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(attr, new)


def apply_groups(gm: Any, groups: list[ChannelGroup], sparsity: float) -> None:
    """Keep the strongest ``1 - sparsity`` of each group's channels; shrink every tensor."""
    import torch

    for group in groups:
        keep_n = max(1, int(round(group.channels * (1.0 - sparsity))))
        order = torch.argsort(channel_importance(gm, group), descending=True, stable=True)
        group.keep = sorted(int(i) for i in order[:keep_n])
    for group in groups:
        idx = torch.tensor(group.keep, dtype=torch.long)
        _replace(gm, group.weight, 0, idx)
        if group.bias:
            _replace(gm, group.bias, 0, idx)
        for name in group.norm:
            _replace(gm, name, 0, idx)
        for weight, per in group.consumers:
            cols = (idx[:, None] * per + torch.arange(per)[None, :]).reshape(-1)
            _replace(gm, weight, 1, cols)
        for node, position, per in group.reshapes:
            dims = list(node.args[1])
            dims[position] = len(group.keep) * per
            node.args = (node.args[0], dims, *node.args[2:])
    gm.recompile()
