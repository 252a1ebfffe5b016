"""The live-tensor tracker counts what it should, and row-centric execution really lowers the peak."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import RecordOps, assert_equivalent
from torch import nn

from lightning_lrcnn import to_row_centric
from lightning_lrcnn.memory import LiveTensorTracker, measure


def test_tracker_counts_allocations_and_frees() -> None:
    with LiveTensorTracker() as tracker:
        a = torch.empty(1000, dtype=torch.float32)
        view = a[10:]
        assert tracker.live_bytes == 4000
        del a
        assert tracker.live_bytes == 4000  # the view keeps the storage alive
        del view
        assert tracker.live_bytes == 0
        b = torch.ones(250, dtype=torch.float64)
        b.add_(1)  # in place: no new storage
        assert tracker.live_bytes == 2000
    assert tracker.peak_bytes == 4000


def test_tracker_ignores_storages_made_before_it() -> None:
    weight = torch.randn(100, 100)
    with LiveTensorTracker() as tracker:
        weight.detach()
        weight.t()
    assert tracker.peak_bytes == 0


def test_tracker_sees_tensors_saved_for_backward() -> None:
    x = torch.randn(1000, requires_grad=True)
    with LiveTensorTracker() as tracker:
        y = torch.sigmoid(x * 2)  # sigmoid saves its output, mul's output dies
        z = y.sum()
        del y
        assert tracker.live_bytes >= 4000
        z.backward()
        del z
    assert tracker.live_bytes == 4000  # only x.grad survives


def _step(model: torch.nn.Module, x: torch.Tensor):  # noqa: ANN202
    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    return run


@pytest.mark.parametrize("mode", ["2ps", "overl"])
def test_vgg16_peak_at_most_half_of_plain(mode: str) -> None:
    torch.manual_seed(0)
    plain = torchvision.models.vgg16().features
    x = torch.randn(2, 3, 224, 224)
    baseline = measure(_step(plain, x)).peak_bytes
    converted = to_row_centric(copy.deepcopy(plain), mode=mode, rows=8)
    _step(converted, x)()  # plan once (cached per shape)
    peak = measure(_step(converted, x)).peak_bytes
    assert peak <= 0.5 * baseline, f"{mode}: {peak / 2**20:.1f} MiB vs plain {baseline / 2**20:.1f} MiB"


def test_shape_only_tensors_are_not_counted() -> None:
    """Planning inside a measured step runs fake tensors: they allocate nothing and must not count."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with LiveTensorTracker() as tracker:
        with FakeTensorMode():
            x = torch.empty(1024, 1024)
            y = x * 2
        z = torch.empty(256, 256, device="meta") + 1
        real = torch.ones(16, 16)
    assert y.shape == x.shape and z.shape == (256, 256)
    assert tracker.peak_bytes == real.untyped_storage().nbytes()


def test_segment_input_gradient_is_summed_band_by_band() -> None:
    """Each band adds its rows' gradient into one input-sized sum as soon as its own backward is done: the
    backward holds that sum and one band's rows, not every band's rows until the last band (2.2x the input)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.AvgPool2d(4))
    model = to_row_centric(net, mode="overl", rows=32)
    x = torch.randn(1, 16, 512, 64, requires_grad=True)

    def step() -> None:
        x.grad = None
        (model(x) * 2).sum().backward()

    step()
    peak = measure(step).peak_bytes
    assert peak <= 1.5 * x.numel() * x.element_size(), f"{peak / (x.numel() * x.element_size()):.2f}x the input"


@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("height", [64, 67])
def test_border_bands_pad_without_a_saved_copy(mode: str, height: int) -> None:
    """A band at the top or bottom of the image pads with the op's own (symmetric) padding and drops the extra
    rows, instead of padding a copy of the band that the op's backward would save beside it."""
    net = nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3, 1, padding=1),
                        nn.Conv2d(8, 8, 3, padding=2, dilation=2)).double()
    converted = assert_equivalent(lambda: copy.deepcopy(net), (2, 3, height, 40), mode=mode, rows=4, train=True)
    with RecordOps() as ops:
        converted(torch.randn(2, 3, height, 40, dtype=torch.float64)).sum().backward()
    names = [name for name, _, _ in ops.calls]
    assert names.count("convolution.default") > 2 * 3, "the convolutions did not run in bands"
    assert not [n for n in names if "pad" in n], sorted({n for n in names if "pad" in n})
