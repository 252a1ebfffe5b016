"""Stochastic depth / drop path / channel dropout: the per-sample (per-channel) gate is drawn as its own global step,
the multiply is banded."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_equivalent
from torch import nn
from torchvision.ops import StochasticDepth

from lightning_lrcnn import to_row_centric
from lightning_lrcnn.convert import plan_for
from lightning_lrcnn.noise import channel_dropout_gate, stochastic_depth_gate

pytestmark = pytest.mark.usefixtures("banded_anyway")  # small sizes: see conftest


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """timm's drop_path: the gate is made with ``x.new_empty`` and written in place."""
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    gate = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    gate.div_(keep)
    return x * gate


class Residual(nn.Module):
    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.stem, self.conv = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.sd = StochasticDepth(0.4, "row")
        self.out = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.conv(x).relu()
        y = self.sd(y) if self.style == "torchvision" else drop_path(y, 0.4, self.training)
        return self.out(x + y)


@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("style", ["torchvision", "timm"])
def test_gates_match_and_the_multiply_is_banded(style: str, train: bool, mode: str) -> None:
    converted = assert_equivalent(lambda: Residual(style), (4, 3, 23, 15), mode=mode, rows=3, train=train)
    plan = plan_for(converted, torch.randn(4, 3, 23, 15, dtype=torch.float64))
    steps = [s.name for s in plan.steps if not hasattr(s, "bands")]
    banded = {n.name for s in plan.segments for n in s.nodes}
    assert "out" in banded and "conv" in banded
    if train:  # one global draw of a (N, 1, 1, 1) gate, nothing else global
        gates = [n for n in plan.graph.nodes if n.op == "call_function" and n.target in (
            stochastic_depth_gate, torch.empty)]
        assert len(gates) == 1 and tuple(gates[0].meta["val"].shape) == (4, 1, 1, 1)
        assert all(name not in banded for name in steps)


def test_gate_errors_like_torchvision() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        stochastic_depth_gate(torch.Size([2, 3, 4, 4]), 1.5, "row", torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="'batch' or 'row'"):
        stochastic_depth_gate(torch.Size([2, 3, 4, 4]), 0.5, "col", torch.float32, torch.device("cpu"))


class ChannelDropout(nn.Module):
    def __init__(self, style: str, p: float = 0.3) -> None:
        super().__init__()
        self.style = style
        self.stem, self.conv = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.drop = nn.Dropout2d(p, inplace=style == "inplace")
        self.out = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.stem(x))  # in place on a convolution's output: its backward does not read it
        y = F.dropout2d(y, 0.3, self.training) if self.style == "functional" else self.drop(y)
        return self.out(y.relu())


def _gates(plan: object) -> list[torch.fx.Node]:
    return [n for n in plan.graph.nodes if n.op == "call_function" and n.target is channel_dropout_gate]  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("style", ["module", "functional"])
def test_channel_dropout_gates_match_and_the_multiply_is_banded(style: str, train: bool, mode: str) -> None:
    converted = assert_equivalent(lambda: ChannelDropout(style), (3, 3, 23, 15), mode=mode, rows=3, train=train)
    plan = plan_for(converted, torch.randn(3, 3, 23, 15, dtype=torch.float64))
    banded = {n.name for s in plan.segments for n in s.nodes}
    assert {"conv", "out"} <= banded
    gates = _gates(plan)
    if train:  # one global draw of an (N, C, 1, 1) gate; the multiply runs in bands
        assert len(gates) == 1 and tuple(gates[0].meta["val"].shape) == (3, 4, 1, 1)
        assert next(iter(gates[0].users)).name in banded
    else:
        assert not gates


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_channel_dropout_in_place_or_certain_stays_exact(p: float) -> None:
    assert_equivalent(lambda: ChannelDropout("inplace", p), (2, 3, 16, 12), mode="2ps", rows=3, train=True)
    assert_equivalent(lambda: ChannelDropout("module", p), (2, 3, 16, 12), mode="overl", rows=3, train=True)


@pytest.mark.parametrize("net", ["dropout2d", "stochastic_depth"])
def test_a_drop_probability_schedule_retraces(net: str) -> None:
    """A probability changed between steps (from 0, where the drop is the identity) is honoured at once, also
    where tracing made it a constant of the graph (torchvision's StochasticDepth)."""
    plain = (ChannelDropout("module", 0.0) if net == "dropout2d" else Residual("torchvision")).double().train()
    drop = plain.drop if net == "dropout2d" else plain.sd
    drop.p = 0.0
    converted = to_row_centric(copy.deepcopy(plain), mode="overl", rows=3)
    x = torch.randn(2, 3, 16, 12, dtype=torch.float64)
    for p in (0.0, 0.6, 0.2):
        drop.p = p
        converted.get_submodule("drop" if net == "dropout2d" else "sd").p = p
        torch.manual_seed(7)
        want = plain(x)
        torch.manual_seed(7)
        got = converted(x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_channel_dropout_gate_errors_like_torch() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        channel_dropout_gate(torch.Size([2, 3, 4, 4]), 1.5, torch.float32, torch.device("cpu"))
