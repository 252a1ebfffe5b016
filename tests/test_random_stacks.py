"""Randomized float64 equivalence: random stacks of row-local layers (convs of every padding, stride and
dilation, pools, pads, resizes, transposed convs), random odd image sizes, modes and band counts. Seeded, so a
failure names a seed to replay; stacks the plain model itself refuses are skipped."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_equivalent
from torch import nn

from lightning_lrcnn import to_row_centric
from lightning_lrcnn.convert import plan_for
from lightning_lrcnn.planner import _band

pytestmark = pytest.mark.usefixtures("banded_anyway")  # rules and geometry at small sizes: see conftest


def _every_segment_banded(rows: int) -> object:
    """The planner keeps small segments plain (banding them cannot pay off at these sizes): band every segment
    anyway, so the executor's geometry is what is tested."""

    def prepare(converted: nn.Module, x: torch.Tensor) -> None:
        for segment in plan_for(converted, x).segments:
            segment.recompute = True
            _band(segment, rows)

    return prepare


def _layer(c: int, rng: random.Random) -> tuple[nn.Module, int]:
    o = rng.choice([2, 3, 4])
    kind = rng.choice(["conv", "same", "asym", "dilated", "strided", "maxpool", "avgpool", "avgceil", "bilinear",
                       "nearest", "transposed", "reflect", "replicate", "act", "pad", "shuffle"])
    if kind == "conv":
        return nn.Conv2d(c, o, rng.choice([1, 3, 5]), padding=rng.choice([0, 1, 2])), o
    if kind == "same":
        return nn.Conv2d(c, o, rng.choice([2, 3, 4]), padding="same", dilation=rng.choice([1, 2])), o
    if kind == "asym":
        return nn.Conv2d(c, o, (rng.choice([1, 3, 7]), rng.choice([1, 3])), padding=(rng.choice([0, 1, 3]), 1)), o
    if kind == "dilated":
        return nn.Conv2d(c, o, 3, padding=rng.choice([1, 2, 3]), dilation=rng.choice([2, 3])), o
    if kind == "strided":
        return nn.Conv2d(c, o, rng.choice([2, 3, 4]), stride=rng.choice([2, 3]), padding=rng.choice([0, 1])), o
    if kind == "maxpool":
        return nn.MaxPool2d(rng.choice([2, 3]), stride=rng.choice([1, 2]), padding=rng.choice([0, 1]),
                            ceil_mode=rng.choice([False, True])), c
    if kind == "avgpool":
        return nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=rng.choice([True, False])), c
    if kind == "avgceil":
        return nn.AvgPool2d(2, ceil_mode=True), c
    if kind == "bilinear":
        return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=rng.choice([False, True])), c
    if kind == "nearest":
        return nn.Upsample(scale_factor=rng.choice([2, 3]), mode="nearest"), c
    if kind == "transposed":
        return nn.ConvTranspose2d(c, o, rng.choice([1, 2, 3, 4]), stride=rng.choice([1, 2, 3]),
                                  padding=rng.choice([0, 1])), o
    if kind == "reflect":
        return nn.Conv2d(c, o, 3, padding=1, padding_mode="reflect"), o
    if kind == "replicate":
        return nn.Conv2d(c, o, 3, padding=2, padding_mode="replicate"), o
    if kind == "act":
        return rng.choice([nn.ReLU(inplace=True), nn.GELU(), nn.SiLU(), nn.LeakyReLU(0.1, inplace=True)]), c
    if kind == "pad":
        return nn.ZeroPad2d((1, 0, 2, 1)), c
    return nn.Sequential(nn.Conv2d(c, 4, 1), nn.PixelShuffle(2)), 1


def _check(seed: int) -> None:
    rng = random.Random(seed)
    layers, c = [], 3
    for _ in range(rng.randint(2, 7)):
        layer, c = _layer(c, rng)
        layers.append(layer)
    shape = (1, 3, rng.randint(12, 41), rng.randint(5, 20))
    mode, rows = rng.choice(["2ps", "overl"]), rng.randint(1, 9)
    probe = nn.Sequential(*layers).double()
    try:
        probe(torch.randn(*shape, dtype=torch.float64, requires_grad=True)).sum().backward()
    except RuntimeError:
        pytest.skip("the plain model refuses this stack or size")
    finally:
        probe.zero_grad(set_to_none=True)
    assert_equivalent(lambda: nn.Sequential(*layers), shape, mode=mode, rows=rows, train=True,
                      prepare=_every_segment_banded(rows), bands=_windows_planned(layers, shape, mode, rows))


_WINDOWS = (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.AvgPool2d, nn.Upsample, nn.ZeroPad2d)


def _windows_planned(layers: list[nn.Module], shape: tuple[int, ...], mode: str, rows: int) -> bool:
    """Whether a convolution, pooling, resize or pad runs in some segment: only then can bands be seen (a stack
    whose one convolution is global, e.g. replicate padding wider than its kernel reaches, bands pointwise ops
    alone; it must still match the plain model)."""
    converted = to_row_centric(nn.Sequential(*copy.deepcopy(layers)).double(), mode=mode, rows=rows)
    plan = plan_for(converted, torch.randn(*shape, dtype=torch.float64))
    return rows > 1 and any(v.op == "call_module" and isinstance(converted.get_submodule(str(v.target)), _WINDOWS)
                            for s in plan.segments for v in s.nodes)


def test_bands_wholly_in_the_padding(banded_anyway: None) -> None:
    """A 1x1 convolution padded by 3 on a 3-row input: its outer output rows read no input row at all (slow
    seeds 788 and 1385 found it: the band sliced its input past the end)."""
    def stack() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 1, padding=(3, 1)), nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect"))

    for mode in ("overl", "2ps"):
        assert_equivalent(stack, (1, 3, 3, 6), mode=mode, rows=7, train=True, prepare=_every_segment_banded(7))


def _seeds(default: int, slow: int) -> list:
    """The first ``default`` seeds run by default, the rest up to ``slow`` with ``-m slow``."""
    return [*range(default), *(pytest.param(s, marks=pytest.mark.slow) for s in range(default, slow))]


@pytest.mark.parametrize("seed", _seeds(150, 2000))
def test_random_stack(seed: int) -> None:
    _check(seed)


class _Program(nn.Module):
    """A random graph: each step applies a layer to an earlier value, adds or concatenates two earlier values of
    the same size, or resizes one to another's size (``size=other.shape[-2:]``)."""

    def __init__(self, steps: list[tuple], layers: list[nn.Module]) -> None:
        super().__init__()
        self.steps, self.layers = steps, nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for op, i, j in self.steps:
            a = values[i]
            if op == "layer":
                values.append(self.layers[j](a))
            elif op == "add":
                values.append(a + values[j])
            elif op == "cat":
                values.append(torch.cat([a, values[j]], 1))
            else:
                values.append(F.interpolate(a, size=values[j].shape[-2:], mode=op))
        return values[-1]


def _program(seed: int) -> tuple[_Program, tuple[int, ...], str, int]:
    rng = random.Random(seed)
    shape = (1, 3, rng.randint(12, 41), rng.randint(8, 24))
    values = [torch.randn(*shape, dtype=torch.float64)]
    steps: list[tuple] = []
    layers: list[nn.Module] = []
    with torch.no_grad():
        for _ in range(rng.randint(3, 9)):
            i = rng.randrange(len(values))
            a = values[i]
            same = [j for j, v in enumerate(values) if j != i and v.shape[2:] == a.shape[2:]]
            kind = rng.choice(["layer", "layer", "layer", "join", "resize"])
            if kind == "join" and same:
                j = rng.choice(same)
                if values[j].shape[1] == a.shape[1] and rng.random() < 0.5:
                    steps.append(("add", i, j))
                    values.append(a + values[j])
                else:
                    steps.append(("cat", i, j))
                    values.append(torch.cat([a, values[j]], 1))
            elif kind == "resize" and len(values) > 1:
                j = rng.randrange(len(values))
                mode = rng.choice(["nearest", "bilinear"])
                steps.append((mode, i, j))
                values.append(F.interpolate(a, size=values[j].shape[-2:], mode=mode))
            else:
                layer, _ = _layer(a.shape[1], rng)
                layer = layer.double()
                if isinstance(layer, (nn.ReLU, nn.LeakyReLU)):
                    layer.inplace = False  # an earlier value may be read again
                try:
                    out = layer(a)
                except RuntimeError:
                    continue
                steps.append(("layer", i, len(layers)))
                layers.append(layer)
                values.append(out)
    return _Program(steps, layers), shape, rng.choice(["2ps", "overl"]), rng.randint(1, 9)


def _check_program(seed: int) -> None:
    program, shape, mode, rows = _program(seed)
    if not program.steps:
        pytest.skip("no step fitted the image")
    assert_equivalent(lambda: copy.deepcopy(program), shape, mode=mode, rows=rows, train=True,
                      prepare=_every_segment_banded(rows))


@pytest.mark.parametrize("seed", _seeds(100, 1500))
def test_random_graph(seed: int) -> None:
    _check_program(seed)
