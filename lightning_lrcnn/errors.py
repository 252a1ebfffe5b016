"""The one error vocabulary of lightning_lrcnn."""

from __future__ import annotations

import torch

__all__ = ["RowCentricError", "TraceError", "PlanError", "refuse_double_backward"]


class RowCentricError(Exception):
    """Base class of every error this package raises on purpose."""


class TraceError(RowCentricError, TypeError):
    """The module cannot be traced with torch.fx; the message names the remedy (``leaf_modules``...)."""

    submodule = ""  # the qualified name of the innermost submodule that failed ("" for the module itself)


class PlanError(RowCentricError, ValueError):
    """The module or input cannot be planned row-centric; the message names the node or argument."""


def refuse_double_backward() -> None:
    """Called first in the backward of this package's autograd functions: under ``create_graph=True`` (a
    gradient penalty, second-order methods) the engine runs them with grad mode on, and their gradients would
    not be differentiable."""
    if torch.is_grad_enabled():
        raise RowCentricError(
            "row-centric backward is first-order only: backward(create_graph=True) / autograd.grad(..., "
            "create_graph=True) through a converted module is not supported. Compute that loss with the plain "
            "module (lightning_lrcnn.restore(module)) or without create_graph")
