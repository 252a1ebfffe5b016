"""Shared helpers: float64 equivalence of a row-centric module against its plain twin."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_lrcnn import to_row_centric


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
    **tolerance: float,
) -> nn.Module:
    """Output, input gradient and every parameter gradient match the plain module (and every parameter got one)."""
    plain = make().to(dtype).train(train)
    converted = to_row_centric(copy.deepcopy(plain), mode=mode, rows=rows, batchnorm=batchnorm)
    if batchnorm == "freeze":
        for m in plain.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    x = torch.randn(*shape, dtype=dtype)
    if prepare is not None:  # e.g. change the converted module's plan for x before it runs
        prepare(converted, x)
    outs, grads = [], []
    for model in (plain, converted):
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)
        y = model(xi)
        torch.manual_seed(2)
        y.backward(torch.randn(y.shape, dtype=y.dtype))  # by shape: the same numbers whatever the strides
        outs.append(y)
        grads.append(xi.grad)
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
