"""GroupNorm and InstanceNorm split into statistics over the whole image and a row-local normalisation.

Their statistics need every row, so as one op they are global: the full input, the full output and the
activation after it are all materialised and kept for backward, and every convolution between two such norms
becomes a region of its own (a U-Net with InstanceNorm saved nothing). Split in two, only the statistics step
is global (it reads the convolution output that is materialised anyway and keeps it for backward, like the
plain op); the normalisation, the activation and the next convolution then run band by band. Same formula
as PyTorch's kernels (biased variance, ``rsqrt(var + eps)``), autograd through both parts; under autocast
both run in float32, as autocast runs ``group_norm``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["split_image_norms", "image_statistics", "normalize"]


def _as_float32(x: Tensor) -> Tensor:
    low = x.dtype in (torch.float16, torch.bfloat16)
    return x.float() if low and torch.is_autocast_enabled(x.device.type) else x


def image_statistics(x: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """Per sample and group, the mean and ``1 / sqrt(var + eps)`` over channels of the group and all pixels,
    repeated per channel and shaped to broadcast over ``x``: ``(N, C, 1, ..., 1)``."""
    x = _as_float32(x)
    n, c = x.shape[:2]
    var, mean = torch.var_mean(x.reshape(n, groups, -1), dim=2, correction=0)
    shape = (n, c) + (1,) * (x.dim() - 2)
    per_channel = c // groups
    return (mean.repeat_interleave(per_channel, 1).reshape(shape),
            torch.rsqrt(var + eps).repeat_interleave(per_channel, 1).reshape(shape))


def normalize(x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``(x - mean) * rstd`` then the per-channel affine transform: elementwise, so row-local."""
    x = _as_float32(x)
    y = (x - mean) * rstd
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _image_norm(node: fx.Node, root: nn.Module) -> tuple[Any, int, float, Any, Any] | None:
    """``(input, groups, eps, weight, bias)`` of a norm over whole images, or None. ``weight``/``bias`` are
    qualified parameter names (or nodes / None for the functional form)."""
    if node.op == "call_module":
        m = root.get_submodule(str(node.target))
        if isinstance(m, nn.GroupNorm):
            groups = m.num_groups
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and not m.track_running_stats:
            groups = m.num_features
        else:
            return None
        name = str(node.target)
        return (node.args[0], groups, m.eps, f"{name}.weight" if m.weight is not None else None,
                f"{name}.bias" if m.bias is not None else None)
    if node.op == "call_function" and node.target is F.group_norm:
        bound = dict(zip(("input", "num_groups", "weight", "bias", "eps"), node.args)) | dict(node.kwargs)
        return (bound["input"], bound["num_groups"], bound.get("eps", 1e-5), bound.get("weight"),
                bound.get("bias"))
    return None


def split_image_norms(gm: fx.GraphModule) -> fx.GraphModule | None:
    """A copy of ``gm`` with every GroupNorm / InstanceNorm (without running statistics) replaced by
    :func:`image_statistics` (global) and :func:`normalize` (row-local), or None when it has none. The planner
    keeps whichever graph gives the lower estimated peak (a split costs where a norm's input is far smaller
    than what follows it: FPN's upsampling decoder)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    split = False
    for node in list(graph.nodes):
        spec = _image_norm(node, gm)
        if spec is None or not isinstance(spec[0], fx.Node):
            continue
        x, groups, eps, weight, bias = spec
        with graph.inserting_before(node):
            stats = graph.call_function(image_statistics, (x, groups, eps))
            mean = graph.call_function(operator.getitem, (stats, 0))
            rstd = graph.call_function(operator.getitem, (stats, 1))
            weight = graph.get_attr(weight) if isinstance(weight, str) else weight
            bias = graph.get_attr(bias) if isinstance(bias, str) else bias
            out = graph.call_function(normalize, (x, mean, rstd, weight, bias))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        split = True
    if not split:
        return None
    copy = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copy.meta.update(gm.meta)
    return copy
