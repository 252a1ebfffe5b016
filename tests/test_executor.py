"""Executor behaviour beyond equivalence: progress lines inside a long step."""

from __future__ import annotations

import pytest
import torch
import torchvision

from lightning_lrcnn import to_row_centric
from lightning_lrcnn.executor import Progress


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
