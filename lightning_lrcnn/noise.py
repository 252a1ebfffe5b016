"""Random per-sample and per-channel gates (stochastic depth, drop path, channel dropout) drawn as their own
global step, so the multiply that applies them runs in the bands.

torchvision's ``stochastic_depth(x, p, "row", training=True)`` and timm's ``drop_path`` (``x.new_empty(shape)
.bernoulli_(keep)``) draw one number per sample for the whole image. As written they read ``x`` itself, so the
draw would be a global step on the full activation and cut the row-local region around it. Rewritten here,
the draw reads only ``x``'s shape, dtype and device (constants per plan) and consumes the random stream in
the same order as the plain module, so training stays exact; bands then multiply by the drawn gate, which is
computed once and reused when a band is recomputed in backward. Train-mode ``nn.Dropout2d`` /
``F.dropout2d`` (one draw per sample and channel) is rewritten the same way. Element-wise dropout draws one number
per element in an order bands cannot repeat: it stays global.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["channel_dropout_gate", "draw_gates_globally", "stochastic_depth_gate"]

_NEW = {"new_empty": torch.empty, "new_zeros": torch.zeros, "new_ones": torch.ones, "new_full": torch.full}


def stochastic_depth_gate(size: torch.Size, p: float, mode: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The gate torchvision's ``stochastic_depth`` multiplies by (same draws, same scaling)."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ("batch", "row"):
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    survival = 1.0 - p
    shape = [size[0]] + [1] * (len(size) - 1) if mode == "row" else [1] * len(size)
    noise = torch.empty(shape, dtype=dtype, device=device).bernoulli_(survival)
    return noise.div_(survival) if survival > 0.0 else noise


def channel_dropout_gate(size: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The gate train-mode ``F.dropout2d`` multiplies by: one Bernoulli draw per sample and channel, scaled by
    ``1 / (1 - p)``, drawn as PyTorch's feature dropout draws it (nothing is drawn when ``p == 1``)."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    shape = [size[0], size[1]] + [1] * (len(size) - 2)
    if p == 1.0:
        return torch.zeros([1] * len(size), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p).div_(1.0 - p)


def _channel_dropout(node: fx.Node, root: nn.Module) -> tuple[fx.Node, float] | None:
    """(input, p) of a train-mode, out-of-place ``nn.Dropout2d`` or ``F.dropout2d`` with ``0 < p``, else None."""
    if node.op == "call_module":
        m = root.get_submodule(str(node.target))
        if type(m) is not nn.Dropout2d or not m.training or m.inplace or m.p == 0 or len(node.args) != 1:
            return None
        x, p = node.args[0], float(m.p)
    elif node.op == "call_function" and node.target is F.dropout2d:
        names = ("input", "p", "training", "inplace")
        b: dict[str, Any] = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        x, p = b.get("input"), b.get("p", 0.5)
        if b.get("training", True) is not True or b.get("inplace", False) or not isinstance(p, (int, float)) or p == 0:
            return None
    else:
        return None
    return (x, float(p)) if isinstance(x, fx.Node) else None


def _is_torchvision_stochastic_depth(node: fx.Node) -> bool:
    target = node.target
    return (node.op == "call_function" and getattr(target, "__name__", "") == "stochastic_depth"
            and getattr(target, "__module__", "").startswith("torchvision"))


def draw_gates_globally(gm: fx.GraphModule) -> None:
    """Rewrite ``gm``'s graph in place (valid for every input shape: the shapes are read at run time; for the
    modules' ``training`` flags and dropout probabilities it was traced with)."""
    graph = gm.graph
    for node in list(graph.nodes):
        dropout = _channel_dropout(node, gm)
        if dropout is not None:
            x = dropout[0]
            with graph.inserting_before(node):
                size = graph.call_method("size", (x,))
                dtype, device = (graph.call_function(getattr, (x, k)) for k in ("dtype", "device"))
                gate = graph.call_function(channel_dropout_gate, (size, dropout[1], dtype, device))
                new = graph.call_function(operator.mul, (x, gate))
        elif node.op == "call_method" and node.target in _NEW and node.args and set(node.kwargs) <= {"dtype", "device"}:
            x = node.args[0]
            with graph.inserting_before(node):
                meta = {k: node.kwargs.get(k) or graph.call_function(getattr, (x, k)) for k in ("dtype", "device")}
                new = graph.call_function(_NEW[str(node.target)], tuple(node.args[1:]), meta)  # type: ignore[arg-type]
        elif _is_torchvision_stochastic_depth(node):
            names = ("input", "p", "mode", "training")
            b: dict[str, Any] = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
            x, p = b["input"], b.get("p")
            if b.get("training", True) is not True or not isinstance(p, float) or p == 0.0:
                continue
            with graph.inserting_before(node):
                size = graph.call_method("size", (x,))
                dtype, device = (graph.call_function(getattr, (x, k)) for k in ("dtype", "device"))
                gate = graph.call_function(stochastic_depth_gate, (size, p, b.get("mode", "row"), dtype, device))
                new = graph.call_function(operator.mul, (x, gate))
        else:
            continue
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    gm.recompile()
