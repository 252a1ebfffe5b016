"""The one error vocabulary of lightning_lrcnn."""

from __future__ import annotations

__all__ = ["RowCentricError", "TraceError", "PlanError"]


class RowCentricError(Exception):
    """Base class of every error this package raises on purpose."""


class TraceError(RowCentricError, TypeError):
    """The module cannot be traced with torch.fx; the message names the remedy (``leaf_modules``...)."""


class PlanError(RowCentricError, ValueError):
    """The module or input cannot be planned row-centric; the message names the node or argument."""
