"""Random per-sample gates (stochastic depth, drop path) drawn as their own global step, so the multiply that
applies them runs in the bands.

torchvision's ``stochastic_depth(x, p, "row", training=True)`` and timm's ``drop_path`` (``x.new_empty(shape)
.bernoulli_(keep)``) draw one number per sample for the whole image. As written they read ``x`` itself, so the
draw would be a global step on the full activation and cut the row-local region around it. Rewritten here,
the draw reads only ``x``'s shape, dtype and device (constants per plan) and consumes the random stream in
the same order as the plain module, so training stays exact; bands then multiply by the drawn gate, which is
computed once and reused when a band is recomputed in backward.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, fx

__all__ = ["draw_gates_globally", "stochastic_depth_gate"]

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


def _is_torchvision_stochastic_depth(node: fx.Node) -> bool:
    target = node.target
    return (node.op == "call_function" and getattr(target, "__name__", "") == "stochastic_depth"
            and getattr(target, "__module__", "").startswith("torchvision"))


def draw_gates_globally(gm: fx.GraphModule) -> None:
    """Rewrite ``gm``'s graph in place (valid for every input shape: the shapes are read at run time)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_method" and node.target in _NEW and node.args and set(node.kwargs) <= {"dtype", "device"}:
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
