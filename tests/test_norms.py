"""GroupNorm / InstanceNorm split into image statistics (global) and a row-local normalisation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_equivalent
from torch import nn

from lightning_lrcnn import to_row_centric
from lightning_lrcnn.convert import plan_for
from lightning_lrcnn.memory import measure
from lightning_lrcnn.norms import normalize

NORMS = {
    "group": lambda c: nn.GroupNorm(2, c),
    "instance_affine": lambda c: nn.InstanceNorm2d(c, affine=True),
    "instance": lambda c: nn.InstanceNorm2d(c),
    "instance_running": lambda c: nn.InstanceNorm2d(c, affine=True, track_running_stats=True),  # stays global
}


class NormUNet(nn.Module):
    """nnU-Net style: conv, norm, leaky ReLU (in place), a skip connection and a transposed conv."""

    def __init__(self, norm: str, functional: bool = False) -> None:
        super().__init__()
        make, self.functional = NORMS[norm], functional

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), make(o), nn.LeakyReLU(0.01, inplace=True),
                                 nn.Conv2d(o, o, 3, padding=1), make(o), nn.LeakyReLU(0.01, inplace=True))

        self.enc, self.mid = block(3, 4), block(4, 8)
        self.up, self.dec, self.out = nn.ConvTranspose2d(8, 4, 2, stride=2), block(8, 4), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.enc(x)
        b = self.mid(F.max_pool2d(a, 2))
        y = self.out(self.dec(torch.cat([self.up(b), a], 1)))
        return F.group_norm(y, 1, eps=1e-3) if self.functional else y


@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_norm_unet_matches(norm: str, train: bool, mode: str) -> None:
    converted = assert_equivalent(lambda: NormUNet(norm), (2, 3, 20, 14), mode=mode, rows=4, train=train)
    plan = plan_for(converted, torch.randn(2, 3, 20, 14, dtype=torch.float64))
    split = any(n.target is normalize for s in plan.segments if s.recompute for n in s.nodes)
    assert split == (norm != "instance_running")  # running statistics: left as the global op it was


def test_functional_group_norm_is_split_too() -> None:
    converted = assert_equivalent(lambda: NormUNet("group", functional=True), (1, 3, 16, 12), mode="overl", rows=3)
    plan = plan_for(converted, torch.randn(1, 3, 16, 12, dtype=torch.float64))
    assert sum(n.target is normalize for n in plan.graph.nodes) == 7  # six modules and the functional call


def test_split_norms_save_memory() -> None:
    """Measured (live tensor bytes, deterministic): this InstanceNorm U-Net at 128² kept 86% of the plain peak
    with its norms as global ops; split, 60%."""
    torch.manual_seed(0)
    model, x = NormUNet("instance_affine").train(), torch.randn(1, 3, 128, 128)
    plain = measure(lambda: copy.deepcopy(model)(x).square().mean().backward()).peak_bytes
    converted = to_row_centric(copy.deepcopy(model), mode="overl", rows=8)
    converted(x)  # plan once
    banded = measure(lambda: converted(x).square().mean().backward()).peak_bytes
    assert banded < 0.7 * plain


def test_norms_under_autocast_match_within_bf16_tolerance() -> None:
    torch.manual_seed(0)
    model, x = NormUNet("group").train(), torch.randn(1, 3, 32, 24)
    converted = to_row_centric(copy.deepcopy(model), mode="overl", rows=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(x), converted(x)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=3e-2)
