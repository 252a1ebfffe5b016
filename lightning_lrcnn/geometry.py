"""Pure integer row-interval arithmetic for row-centric execution (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "RowInterval",
    "window_input_rows",
    "transposed_input_rows",
    "same_padding",
    "split_padding",
]


@dataclass(frozen=True)
class RowInterval:
    """Half-open interval ``[start, stop)`` of rows; empty when ``stop <= start``."""

    start: int
    stop: int

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    @property
    def empty(self) -> bool:
        """True when the interval holds no row."""
        return self.stop <= self.start

    def hull(self, other: RowInterval) -> RowInterval:
        """Smallest interval containing both (an empty side is ignored)."""
        if self.empty:
            return other
        if other.empty:
            return self
        return RowInterval(min(self.start, other.start), max(self.stop, other.stop))

    def clamp(self, height: int) -> RowInterval:
        """Intersection with ``[0, height)``; empty at the nearer edge where they do not meet (rows wholly in the
        padding of a convolution padded by more than its kernel reaches)."""
        start = min(max(0, self.start), height)
        return RowInterval(start, max(start, min(height, self.stop)))

    def contains(self, other: RowInterval) -> bool:
        """True when every row of ``other`` lies in this interval."""
        return other.empty or (self.start <= other.start and other.stop <= self.stop)


def window_input_rows(out: RowInterval, kernel: int, stride: int, pad_top: int, dilation: int = 1) -> RowInterval:
    """Input rows (unclamped, padding included) read by output rows ``out`` of a sliding window."""
    if out.empty:
        return RowInterval(0, 0)
    return RowInterval(out.start * stride - pad_top, (out.stop - 1) * stride - pad_top + dilation * (kernel - 1) + 1)


def transposed_input_rows(
    out: RowInterval, kernel: int, stride: int, pad_top: int, dilation: int, in_height: int
) -> RowInterval:
    """Input rows of a transposed convolution that write output rows ``out`` (clamped, at least one row)."""
    lo = -((-(out.start + pad_top - dilation * (kernel - 1))) // stride)  # ceil division
    hi = (out.stop - 1 + pad_top) // stride + 1
    lo, hi = max(0, lo), min(in_height, hi)
    if hi <= lo:  # no input row writes there (stride gaps, output_padding): any single row will do
        lo = min(max(lo, 0), in_height - 1)
        hi = lo + 1
    return RowInterval(lo, hi)


def same_padding(kernel: int, dilation: int) -> tuple[int, int]:
    """Padding before/after of ``padding="same"`` (the odd row goes after, as in PyTorch)."""
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2


def split_padding(needed: RowInterval, height: int) -> tuple[RowInterval, int, int]:
    """Split unclamped ``needed`` rows into the rows inside ``[0, height)`` and the padding rows above/below."""
    inside = needed.clamp(height)
    rows = len(needed)  # a window wholly in the padding has no more padding rows than rows
    top = min(rows, max(0, -needed.start))
    return inside, top, min(rows - top, max(0, needed.stop - height))
