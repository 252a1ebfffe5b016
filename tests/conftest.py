"""Shared helpers: float64 equivalence of a row-centric module against its plain twin."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_lrcnn import to_row_centric
from lightning_lrcnn.convert import plan_for


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


def assert_equivalent(
    make: Callable[[], nn.Module],
    shape: tuple[int, ...],
    *,
    mode: str,
    rows: int,
    train: bool = False,
    batchnorm: str = "exact",
    dtype: torch.dtype = torch.float64,
    prepare: Callable[[nn.Module, torch.Tensor], None] | None = None,
    bands: bool | None = None,
    tallest: bool = False,
    memory_budget: int | None = None,
    **tolerance: float,
) -> nn.Module:
    """Output, input gradient and every parameter gradient match the plain module (and every parameter got one).

    With ``bands`` (the default when ``rows > 1``) it also asserts that bands ran, where the plain model runs
    convolutions: some convolution ran on fewer rows than in the plain model; with ``tallest`` (real
    architectures), even the convolutions that read the most rows (a classifier's stem: the whole image) did.
    A plan that runs plain is exact too, and proves nothing about bands.
    """
    plain = make().to(dtype).train(train)
    converted = to_row_centric(copy.deepcopy(plain), mode=mode, rows=rows, batchnorm=batchnorm,
                               memory_budget=memory_budget)
    if batchnorm == "freeze":
        for m in plain.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    x = torch.randn(*shape, dtype=dtype)
    plan_for(converted, x)  # planning runs the module on fake full-size tensors: not what is recorded below
    if prepare is not None:  # e.g. change the converted module's plan for x before it runs
        prepare(converted, x)
    outs, grads = [], []
    heights = {plain: ConvHeights(plain), converted: ConvHeights(converted)}
    for model in (plain, converted):
        xi = x.clone().requires_grad_()
        with heights[model]:
            torch.manual_seed(1)
            y = model(xi)
            torch.manual_seed(2)
            ys = [t for t in torch.utils._pytree.tree_leaves(y) if isinstance(t, torch.Tensor)]  # dicts of maps too
            # by shape: the same numbers whatever the strides
            torch.autograd.backward(ys, [torch.randn(t.shape, dtype=t.dtype) for t in ys])
        outs.append(y)
        grads.append(xi.grad)
    seen = {**heights[plain].conv, **heights[plain].other}
    ran = {**heights[converted].conv, **heights[converted].other}
    if (rows > 1 or tallest if bands is None else bands) and seen:
        assert any(ran.get(k, 0) < h for k, h in seen.items()), f"no convolution, pooling or resize ran on bands: {ran}"
    if tallest:
        top = max(heights[converted].conv.values())
        assert top < max(heights[plain].conv.values()), (
            f"the tallest convolution did not run on bands: {top} rows, as in the plain model")
    torch.testing.assert_close(outs[1], outs[0], **tolerance)
    torch.testing.assert_close(grads[1], grads[0], **tolerance)
    named = dict(plain.named_parameters())
    for name, p in converted.named_parameters():
        ref = named[name]
        if ref.grad is None:
            assert p.grad is None, f"{name} got a gradient the plain model did not"
            continue
        assert p.grad is not None, f"parameter {name} received no gradient"
        torch.testing.assert_close(p.grad, ref.grad, msg=lambda m, n=name: f"{n}: {m}", **tolerance)
    for name, b in plain.named_buffers():
        torch.testing.assert_close(dict(converted.named_buffers())[name], b, msg=f"buffer {name}")
    return converted


_WINDOW_OPS = {"max_pool2d_with_indices", "avg_pool2d", "upsample_nearest2d", "upsample_bilinear2d",
               "_upsample_nearest_exact2d", "constant_pad_nd"}


class ConvHeights(TorchDispatchMode):
    """Records the largest input height (rows) of the real convolutions run inside the ``with`` block, per
    weight (the module's parameter name; the shape for a weight computed in forward), in ``conv``; and the
    largest output height of pooling, resizing and padding ops, per op, channels and width, in ``other``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {p.data_ptr(): name for name, p in model.named_parameters()}
        self.conv: dict[object, int] = {}
        self.other: dict[object, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        x = args[0] if args else None
        if type(x) is torch.Tensor and x.dim() == 4:
            if func is torch.ops.aten.convolution.default:
                key = self.names.get(args[1].data_ptr(), tuple(args[1].shape))
                self.conv[key] = max(self.conv.get(key, 0), x.shape[2])
            elif func.__name__.split(".")[0] in _WINDOW_OPS:  # output rows: a band's resize reads prepared rows
                y = out[0] if isinstance(out, tuple) else out
                key = (func.__name__, x.shape[1], y.shape[3])
                self.other[key] = max(self.other.get(key, 0), y.shape[2])
        return out


class NormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: an ``_assert`` on the input, ``F.batch_norm`` called as a function, then
    an activation (traced through, not a leaf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training or self.running_mean is None, 0.1 if self.momentum is None else self.momentum,
                         self.eps)
        return F.silu(x)


@pytest.fixture
def banded_anyway(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the planned bands even where they cannot save memory (tests of rules and geometry at sizes too small
    for that): no fallback to the plain model, no segment kept plain. Both are tested on their own."""
    monkeypatch.setattr("lightning_lrcnn.convert._never_worse", lambda plan, traced, goal=None: plan)
    monkeypatch.setattr("lightning_lrcnn.planner._keep_small_segments", lambda segments, param_grads: None)
    monkeypatch.setattr("lightning_lrcnn.planner._keep_where_peak_holds", lambda plan, goal=0: None)


class RecordOps(TorchDispatchMode):
    """Records every aten op run inside the ``with`` block: ``(name, dtype, shape)``, the last two of its
    output when that is a real tensor (not one of the planner's fakes), else None."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.dtype | None, tuple[int, ...] | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        real = type(out) is torch.Tensor
        self.calls.append((func.__name__, out.dtype if real else None, tuple(out.shape) if real else None))
        return out
