"""In-place ops made explicit in the graph, so that bands can run every op out of place.

torch.fx records ``y = x.div_(2)`` or ``nn.ReLU(inplace=True)(x)`` as a node, but a later ``x`` in the code
still names the tensor *before* the write, while eager PyTorch reads the written one (timm's stochastic depth
scales its mask with ``random_tensor.div_(keep_prob)`` and then multiplies by ``random_tensor``). Bands run
ops out of place, so every reader of ``x`` after the write is pointed at the in-place node instead: the graph
then says what eager PyTorch computes. A write into a view whose base (or a view of the written tensor)
is read afterwards cannot be expressed this way and is refused.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .errors import PlanError

__all__ = ["make_writes_explicit", "written_input"]

_AUGMENTED = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.ipow,
              operator.imod, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift}
# functions whose ``inplace`` flag may be passed by position: its index
_INPLACE_POSITION = {F.relu: 1, F.relu6: 1, F.silu: 1, F.hardswish: 1, F.hardsigmoid: 1, F.mish: 1, F.selu: 1,
                     F.elu: 2, F.celu: 2, F.leaky_relu: 2, F.hardtanh: 3, F.threshold: 3, F.rrelu: 4,
                     F.dropout: 3, F.dropout1d: 3, F.dropout2d: 3, F.dropout3d: 3, F.alpha_dropout: 3,
                     F.feature_alpha_dropout: 3}
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "narrow", "transpose", "permute", "flatten", "unflatten",
                 "squeeze", "unsqueeze", "expand", "expand_as", "select", "t", "as_strided", "diagonal", "unfold",
                 "chunk", "split", "unbind", "movedim", "swapaxes", "detach",
                 # these return the tensor itself when nothing needs converting: treated as sharing memory
                 "contiguous", "to", "type", "type_as", "float", "double", "half", "bfloat16"}
_VIEW_FUNCTIONS = {operator.getitem, torch.narrow, torch.transpose, torch.permute, torch.flatten, torch.squeeze,
                   torch.unsqueeze, torch.select, torch.reshape, torch.chunk, torch.split, torch.unbind,
                   torch.movedim, torch.swapaxes, torch.t, torch.detach}


def _is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), Tensor)


def written_input(node: fx.Node, root: nn.Module) -> fx.Node | None:
    """The tensor input ``node`` writes into (``x.add_(1)``, ``x += y``, ``inplace=True``), or None."""
    target = node.target
    first = node.args[0] if node.args else None
    if node.op == "call_method":
        writes = str(target).endswith("_") and not str(target).endswith("__")
    elif node.op == "call_function":
        name = getattr(target, "__name__", "")
        pos = _INPLACE_POSITION.get(target)  # type: ignore[call-overload]
        writes = (target in _AUGMENTED or (name.endswith("_") and not name.endswith("__"))
                  or node.kwargs.get("inplace") is True or (pos is not None and len(node.args) > pos
                                                            and node.args[pos] is True))
        first = first if first is not None else node.kwargs.get("input")
    elif node.op == "call_module":
        writes = getattr(root.get_submodule(str(target)), "inplace", False) is True
    else:
        writes = False
    return first if writes and _is_tensor(first) and _is_tensor(node) else None


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target) in _VIEW_METHODS and _is_tensor(node.args[0])
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS and bool(node.args) and _is_tensor(
        node.args[0])


def make_writes_explicit(graph: fx.Graph, root: nn.Module) -> None:
    """Point every reader of a written tensor that runs after the write at the in-place node (shapes must be
    propagated: only tensors count; ``h += 1`` on an int is not a write).

    Raises:
        PlanError: a write into a view whose base is read afterwards, or into a tensor with a view read
            afterwards.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        written = written_input(node, root)
        if written is None:
            continue
        later = [u for u in written.users if order[u] > order[node]]
        for user in later:
            user.replace_input_with(written, node)
        aliases = _aliases(written)
        if any(order[u] > order[node] for a in aliases for u in a.users):
            raise PlanError(f"{node.format_node()} writes in place into {written.name}, which shares memory with "
                            f"{sorted(a.name for a in aliases)} read afterwards: not supported; write it out of "
                            "place, or pass the submodule in leaf_modules")


def _aliases(node: fx.Node) -> set[fx.Node]:
    """Tensors sharing memory with ``node`` through view ops (its bases and its views), itself excluded."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        linked = [u for u in n.users if _is_view(u)]
        if _is_view(n) and isinstance(n.args[0], fx.Node):
            linked.append(n.args[0])
        for m in linked:
            if m not in seen and m is not node:
                seen.add(m)
                todo.append(m)
    return seen
