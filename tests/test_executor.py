"""Executor behaviour beyond equivalence: progress lines inside a long step, values handed on in pieces."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import assert_equivalent

import lightning_lrcnn.plan
from lightning_lrcnn import to_row_centric
from lightning_lrcnn.convert import plan_for
from lightning_lrcnn.estimate import estimate
from lightning_lrcnn.executor import Progress
from lightning_lrcnn.memory import measure
from lightning_lrcnn.plan import describe, handed_in_pieces


def _step() -> None:
    model = to_row_centric(torchvision.models.vgg11().features, mode="overl", rows=4)
    model(torch.randn(1, 3, 128, 128)).sum().backward()


def test_a_long_step_says_where_it_is(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(Progress, "AFTER", 0.0)  # as if every step were long
    monkeypatch.setattr(Progress, "EVERY", 0.0)
    with caplog.at_level("INFO", logger="lightning_lrcnn.executor"):
        _step()
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_lrcnn.executor"]
    assert any(line.startswith("row-centric step, forward: segment 1/") and ", band 1/" in line for line in lines)
    assert any(line.startswith("row-centric step, backward: segment") for line in lines)
    assert all("s elapsed" in line for line in lines)


def test_a_short_step_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="lightning_lrcnn.executor"):
        _step()
    assert not [r for r in caplog.records if r.name == "lightning_lrcnn.executor"]


@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("net", ["resnet18", "vgg11"])
def test_values_handed_on_in_pieces_train_exactly(net: str, mode: str) -> None:
    """Segment outputs read in rows by the next segments only stay in the pieces their bands made (see NOTE
    [ Values handed on in pieces ]): float64 equivalence with the plain model, bands asserted, pieces present."""
    def make() -> torch.nn.Module:
        model = getattr(torchvision.models, net)(weights=None)
        return model.features if net == "vgg11" else model

    shape = (2, 3, 256, 192)
    converted = assert_equivalent(make, shape, mode=mode, rows=8, train=True, batchnorm="freeze", tallest=True)
    plan = plan_for(converted, torch.randn(shape, dtype=torch.float64))
    assert handed_in_pieces(plan), describe(plan)


def test_values_in_pieces_lower_the_measured_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured (live tensor bytes): with values handed on in pieces the step's peak is lower than with every
    segment output joined into one tensor (VGG-11 features at 384x256, 2PS: 58.1 against 64.9 MiB), and the
    estimate, which plans with it, is within 10% of the measurement."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 384, 256)
    plain = torchvision.models.vgg11().features
    peaks, estimates = {}, {}
    for pieces in (True, False):
        if not pieces:
            monkeypatch.setattr("lightning_lrcnn.plan.handed_in_pieces", lambda plan, cuts=None: frozenset())
            monkeypatch.setattr("lightning_lrcnn.executor.handed_in_pieces", lambda plan, cuts=None: frozenset())
            monkeypatch.setattr("lightning_lrcnn.estimate.handed_in_pieces", lambda plan, cuts=None: frozenset())
        model = to_row_centric(copy.deepcopy(plain), mode="2ps", rows=8)
        plan = plan_for(model, x)
        assert bool(lightning_lrcnn.plan.handed_in_pieces(plan)) == pieces, describe(plan)
        peaks[pieces] = measure(lambda m=model: m(x).square().mean().backward()).peak_bytes
        estimates[pieces] = estimate(plan).peak_bytes
    assert peaks[True] < 0.95 * peaks[False], peaks
    assert abs(estimates[True] / peaks[True] - 1) < 0.10, (estimates, peaks)
