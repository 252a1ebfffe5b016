"""Peak-memory measurement of a callable: CUDA allocator statistics on GPU, live tensor bytes on CPU.

The CPU tracker is a ``TorchDispatchMode`` that adds a storage's bytes when an op first returns it and
subtracts them when the storage is freed (weakref finalizer), so its figures are deterministic, unlike RSS.
Only storages created while it is active count: parameters and inputs made before are the baseline.
A ``memory_budget`` (bytes, or a fraction of the device's memory) is checked and resolved here too.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorTracker", "Measurement", "measure", "MIB", "DEFAULT_BUDGET_FRACTION", "check_budget",
           "resolve_budget", "device_memory"]

MIB = 2**20
DEFAULT_BUDGET_FRACTION = 0.8  # of the device's memory, where memory_budget is None


class LiveTensorTracker(TorchDispatchMode):
    """Tracks live bytes of the tensor storages created inside the ``with`` block and their peak.

    Example::

        with LiveTensorTracker() as tracker:
            loss = model(x).sum(); loss.backward()
        print(tracker.peak_bytes)
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # an output sharing an input's storage (view, in-place op, detach) allocated nothing
        shared = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            key = _storage_key(t) if isinstance(t, Tensor) and not _is_shape_only(t) else None
            if key is not None and key not in shared:
                self._track(t)
        return out

    def _track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key, 0)


def _is_shape_only(t: Tensor) -> bool:
    """Meta and fake tensors (shape propagation while planning) allocate nothing."""
    from torch._subclasses.fake_tensor import FakeTensor

    return t.device.type == "meta" or isinstance(t, FakeTensor)


def _storage_key(t: Tensor) -> int | None:
    try:
        return int(t.untyped_storage()._cdata)
    except (RuntimeError, NotImplementedError):  # sparse, nested...: not counted
        return None


@dataclass(frozen=True)
class Measurement:
    """Peak memory (bytes above what was allocated before the call) and wall time of one call."""

    peak_bytes: int
    seconds: float
    device: str

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB


def measure(fn: Callable[[], Any], device: torch.device | str = "cpu") -> Measurement:
    """Run ``fn`` once and measure its peak memory on ``device`` and its wall time.

    On CUDA the allocator's peak is used (fast, exact for the caching allocator); on CPU the
    :class:`LiveTensorTracker` (slower per op, so time CPU runs separately with :func:`time_call`).
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return Measurement(torch.cuda.max_memory_allocated(device) - before, seconds, str(device))
    start = time.perf_counter()
    with LiveTensorTracker() as tracker:
        fn()
    seconds = time.perf_counter() - start
    return Measurement(tracker.peak_bytes, seconds, str(device))


def time_call(fn: Callable[[], Any], device: torch.device | str = "cpu", repeats: int = 1) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` (CUDA synchronised; the mean of the middle two when
    ``repeats`` is even)."""
    device = torch.device(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


__all__ += ["time_call"]


def resolve_budget(memory_budget: Any, device: torch.device) -> int:
    """Budget in bytes: an int of bytes, a float fraction in (0, 1] of the device's memory, or None (default).

    Raises:
        ValueError: the budget is not a positive number (or a fraction above 1).
    """
    if memory_budget is None:
        memory_budget = DEFAULT_BUDGET_FRACTION
    check_budget(memory_budget)
    if isinstance(memory_budget, float):
        return int(memory_budget * device_memory(device))
    return int(memory_budget)


def check_budget(memory_budget: Any) -> None:
    """Raises ValueError unless ``memory_budget`` is bytes (int > 0) or a fraction (float in (0, 1])."""
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
        raise ValueError(f"memory_budget must be bytes (int > 0), a fraction of device memory (0 < float <= 1) "
                         f"or None, got {memory_budget!r}")
    if not memory_budget > 0:
        raise ValueError(f"memory_budget must be > 0 (bytes, or a fraction of device memory), got {memory_budget!r}")
    if isinstance(memory_budget, float):
        if memory_budget > 1:
            raise ValueError(f"memory_budget as a float is a fraction of device memory in (0, 1], got {memory_budget}; "
                             "pass an int for bytes")


def device_memory(device: torch.device) -> int:
    """Total memory of a CUDA device; on CPU the physical memory free now (8 GiB where that is unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30
