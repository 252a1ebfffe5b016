"""In-place writes: the converted module computes what eager PyTorch computes, or refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_equivalent
from torch import nn

from lightning_lrcnn import PlanError, to_row_centric

pytestmark = pytest.mark.usefixtures("banded_anyway")  # rules and geometry at small sizes: see conftest


class Writes(nn.Module):
    """Reads tensors after in-place writes into them (in eager they read the written values)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        y = self.act(x)  # writes into x: the x below is relu(a(x))
        z = x + y
        keep = z.new_empty(z.shape[0], 1, 1, 1).bernoulli_(0.7)  # timm's stochastic depth
        keep.div_(0.7)
        z = z * keep
        w = self.b(z)
        w += z
        return F.relu(w, inplace=True) * 2 + w  # the w after the relu is relu(w)


@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_reads_after_in_place_writes(mode: str, train: bool) -> None:
    assert_equivalent(Writes, (2, 3, 16, 12), mode=mode, rows=4, train=train)


class WritesIntoView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        x[:, :2].relu_()  # writes into x through a view
        return self.b(x)


def test_a_write_into_a_view_read_afterwards_is_refused() -> None:
    model = to_row_centric(WritesIntoView(), mode="2ps", rows=2)
    with pytest.raises(PlanError, match=r"writes in place into getitem.*shares memory with \['a'\]"):
        model(torch.randn(1, 3, 8, 8))
