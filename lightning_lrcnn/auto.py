"""Automatic choice of mode and band count from measured memory and time.

Candidates (the plain "column" model, 2PS and OverL at several band counts) are pruned with the analytic
estimate (``lightning_lrcnn.estimate``: a candidate whose targets alone are estimated above the budget, by more
than the estimate's error, is not run), then measured on a real step (peak, and the median time of a few steps);
the fastest whose measured peak fits the budget wins. Each candidate's planner may spend 90% of the budget on
time (fewer bands, segments kept whole) where its smallest plan is well under it. On a GPU each mode stops at
the fewest bands that fit: a banded step there is bound by kernel launches, so more bands only cost time
(README, "On a GPU"). On a CPU every candidate is measured: smaller bands can run faster where the network is
memory-bound (timm MobileNetV3 at 1024², OverL 8 1.31x the plain step against OverL 2 1.51x and OverL 4 1.72x,
same process). Every piece of state a probe step touches (gradients, buffers such as BN statistics, RNG) is restored, so
choosing leaves the module exactly as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import memory as _memory
from .convert import cached_plans, plan_for, restore, row_centric_config, to_row_centric
from .errors import RowCentricError
from .estimate import estimate, estimate_plain
from .memory import DEFAULT_BUDGET_FRACTION, MIB, check_budget, measure, resolve_budget, time_call

__all__ = ["Candidate", "CandidateResult", "Choice", "NoPlanFitsError", "choose_plan", "resolve_budget",
           "check_budget", "candidates_for", "sum_outputs", "DEFAULT_CANDIDATES", "DEFAULT_BUDGET_FRACTION",
           "TIMED_STEPS"]

log = logging.getLogger(__name__)

NO_BUDGET = 2**62  # a memory_budget that filters nothing (a fixed plan is measured, not chosen)
# the estimate is within about 10% of measured peaks (tests/test_estimate.py): prune only beyond this margin
ESTIMATE_MARGIN = 1.25


@dataclass(frozen=True)
class Candidate:
    """One way to run: ``mode`` is "column" (the plain model), "2ps" or "overl"; ``rows`` the band count."""

    mode: str
    rows: int = 1

    def __str__(self) -> str:
        return "column" if self.mode == "column" else f"{self.mode}:{self.rows}"


# few bands are usually the fast end, many the small end (1024², frozen ResNet-50, docs/backbones.md: 2PS 4 at 1.29x
# the plain step and 0.242 of its peak, OverL 16 at 1.63x and 0.127)
DEFAULT_CANDIDATES = (Candidate("column"), Candidate("2ps", 2), Candidate("2ps", 4), Candidate("2ps", 8),
                      Candidate("2ps", 16), Candidate("2ps", 32), Candidate("overl", 2), Candidate("overl", 4),
                      Candidate("overl", 8), Candidate("overl", 16), Candidate("overl", 32), Candidate("overl", 48))
# of the budget, the estimated peak each candidate's planner may spend on time (fewer bands, segments kept whole):
# the rest absorbs the estimate's error and what runs outside the targets. Where no candidate planned so fits,
# they are measured again as planned for their smallest peak.
PLAN_GOAL_FRACTION = 0.9
# timed steps per measured candidate (the median is compared): one step's time varies by 10-20% on a busy machine
TIMED_STEPS = 3


@dataclass(frozen=True)
class CandidateResult:
    """What one candidate measured (or why it was skipped)."""

    candidate: Candidate
    peak_bytes: int | None
    seconds: float | None
    fits: bool
    note: str = ""
    estimate_bytes: int | None = None  # analytic estimate for the targets alone (None: no estimate)
    ran_plain: bool = False  # every target ran as usual (its plan would not have saved memory; see ``note``)

    def row(self) -> str:
        peak = "-" if self.peak_bytes is None else f"{self.peak_bytes / MIB:.1f} MiB"
        est = "-" if self.estimate_bytes is None else f"{self.estimate_bytes / MIB:.1f} MiB"
        secs = "-" if self.seconds is None else f"{self.seconds:.3f} s"
        return (f"{self.candidate!s:>10}  estimate {est:>12}  peak {peak:>12}  time {secs:>9}  "
                f"{'fits' if self.fits else 'no'} {self.note}")


@dataclass
class Choice:
    """The chosen candidate and every candidate measured, with the baseline (column) figures."""

    best: Candidate
    results: list[CandidateResult] = field(default_factory=list)
    budget_bytes: int = 0
    plan_budget: int | None = None  # the estimated peak each target's planner could spend on time (None: none)

    def result(self, candidate: Candidate) -> CandidateResult | None:
        return next((r for r in self.results if r.candidate == candidate), None)

    @property
    def baseline(self) -> CandidateResult | None:
        return self.result(Candidate("column"))

    def report(self) -> str:
        spent = "" if self.plan_budget is None else f" (plans spend up to {self.plan_budget / MIB:.1f} MiB per target)"
        budget = "no budget" if self.budget_bytes >= NO_BUDGET else f"budget {self.budget_bytes / MIB:.1f} MiB"
        best = self.result(self.best)
        plain = " (runs as usual)" if best is not None and best.ran_plain else ""
        lines = [f"{budget}; chosen {self.best}{plain}{spent}"]
        lines += [r.row() for r in self.results]
        return "\n".join(lines)


class NoPlanFitsError(RowCentricError, ValueError):
    """No candidate fits the memory budget."""


class _StateSnapshot:
    """Gradients, buffers and RNG states of modules, restored exactly after a probe step."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        params = {id(p): p for m in modules for p in m.parameters()}.values()
        buffers = {id(b): b for m in modules for b in m.buffers()}.values()
        self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in params]
        self.buffers = [(b, b.detach().clone()) for b in buffers]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        with torch.no_grad():
            for p, g in self.grads:
                p.grad = None if g is None else g.clone()  # a probe step accumulates into .grad in place
            for b, saved in self.buffers:
                b.copy_(saved)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def candidates_for(mode: str, rows: Any) -> tuple[Candidate, ...]:
    """Candidates for ``mode``/``rows`` where either may be "auto" (mode "auto" includes the plain model).

    Raises:
        ValueError: unknown mode or bad rows.
    """
    if mode not in ("auto", "2ps", "overl"):
        raise ValueError(f"mode must be one of ('auto', '2ps', 'overl'), got {mode!r}")
    if rows != "auto" and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(f"rows must be 'auto' or an integer >= 1, got {rows!r}")
    modes = ("2ps", "overl") if mode == "auto" else (mode,)
    picked = [c for c in DEFAULT_CANDIDATES if c.mode in modes and (rows == "auto" or c.rows == rows)]
    if rows != "auto" and not picked:
        picked = [Candidate(m, rows) for m in modes]
    return (Candidate("column"), *picked) if mode == "auto" else tuple(picked)


def sum_outputs(output: Any) -> torch.Tensor:
    """A scalar that depends on every floating-point tensor of a module's output (probe loss)."""
    total = torch.zeros(())
    for t in torch.utils._pytree.tree_flatten(output)[0]:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            total = total.to(t.device) + t.float().sum()
    return total


class _Captured(Exception):
    """Stops a step once every target's inputs are known (nothing computed, nothing allocated)."""


def _capture_inputs(targets: Sequence[nn.Module], step: Callable[[], Any]) -> list[tuple[tuple, dict]] | None:
    """The inputs each target receives in ``step``, got by stopping the step at the last target's call.

    None when some target is not called (or the step fails before), or runs under autocast (the estimate
    assumes the graph's own dtypes, so it would overstate a mixed-precision step): then nothing is estimated.
    """
    seen: dict[int, tuple[tuple, dict]] = {}
    mixed = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mixed.append(any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda")))
        seen.setdefault(id(module), (args, kwargs))
        if len(seen) == len(targets):
            raise _Captured

    handles = [t.register_forward_pre_hook(hook, with_kwargs=True) for t in targets]
    try:
        step()
    except _Captured:
        pass
    except Exception as exc:  # the measurement below will meet the same error and report it
        log.debug("lrcnn: could not capture target inputs for the estimate: %s", exc)
    finally:
        for h in handles:
            h.remove()
    if any(mixed):
        log.info("lrcnn: targets run under autocast: candidates are measured without estimate pruning")
        return None
    return [seen[id(t)] for t in targets] if len(seen) == len(targets) else None


def _estimate(targets: Sequence[nn.Module], inputs: list[tuple[tuple, dict]], candidate: Candidate,
              batchnorm: str, convert_kwargs: dict[str, Any]) -> int | None:
    """Summed analytic peak of the targets under ``candidate`` (the plain model's for "column")."""
    try:
        total = 0
        for t, (args, kwargs) in zip(targets, inputs, strict=True):
            mode = "2ps" if candidate.mode == "column" else candidate.mode
            to_row_centric(t, mode=mode, rows=candidate.rows, batchnorm=batchnorm, **convert_kwargs)
            plan = plan_for(t, *args, **kwargs)
            total += estimate_plain(plan) if candidate.mode == "column" else estimate(plan).peak_bytes
        return total
    except Exception as exc:  # an estimate is advice: measuring will report real errors
        log.debug("lrcnn: no estimate for %s: %s", candidate, exc)
        return None


def _plain_reasons(targets: Sequence[nn.Module]) -> list[str]:
    """Why targets ran as usual in the last step under the current conversion (one entry per such target)."""
    return [p.plain_reason for t in targets for p in cached_plans(t)[-1:] if p.plain_reason]


def _apply(targets: Sequence[nn.Module], candidate: Candidate, batchnorm: str, convert_kwargs: dict[str, Any]) -> None:
    for t in targets:
        if candidate.mode == "column":
            restore(t)
        else:
            to_row_centric(t, mode=candidate.mode, rows=candidate.rows, batchnorm=batchnorm, **convert_kwargs)


def _measure(candidate: Candidate, targets: Sequence[nn.Module], step: Callable[[], Any],
             inputs: list[tuple[tuple, dict]] | None, budget: int, memory: int, device: torch.device,
             snapshot: _StateSnapshot, batchnorm: str, convert_kwargs: dict[str, Any],
             plain: CandidateResult | None = None) -> CandidateResult:
    """One candidate: skipped when estimated far over the budget (or the device's memory), else its measured peak
    and the median time of ``TIMED_STEPS`` steps (the state restored after each measurement). A candidate whose
    plans all run as usual takes ``plain``'s figures (the plain model's, measured), where given."""
    est = None if inputs is None else _estimate(targets, inputs, candidate, batchnorm, convert_kwargs)
    reasons = _plain_reasons(targets) if est is not None and candidate.mode != "column" else []
    if plain is not None and plain.peak_bytes is not None and len(reasons) == len(targets) > 0:
        return CandidateResult(candidate, plain.peak_bytes, plain.seconds, plain.fits,
                               f"runs as usual: {'; '.join(sorted(set(reasons)))} (the plain model's figures)", est,
                               ran_plain=True)
    if est is not None and est > min(ESTIMATE_MARGIN * budget, memory):
        why = "estimate over budget" if est > ESTIMATE_MARGIN * budget else "estimate above the device's memory"
        return CandidateResult(candidate, None, None, False, f"skipped: {why}", est)
    _apply(targets, candidate, batchnorm, convert_kwargs)
    try:
        step()  # plan (cached per shape) and warm up, outside the measurement
        snapshot.restore()
        measured = measure(step, device)
        snapshot.restore()
        seconds = time_call(step, device, repeats=TIMED_STEPS)
        snapshot.restore()
    except torch.cuda.OutOfMemoryError:
        snapshot.restore()
        return CandidateResult(candidate, None, None, False, "out of memory", est)
    reasons = _plain_reasons(targets) if candidate.mode != "column" else []
    note = f"runs as usual: {'; '.join(sorted(set(reasons)))}" if reasons else ""
    return CandidateResult(candidate, measured.peak_bytes, seconds, measured.peak_bytes <= budget, note, est,
                           ran_plain=len(reasons) == len(targets))


def _measure_all(candidates: Sequence[Candidate], targets: Sequence[nn.Module], step: Callable[[], Any],
                 inputs: list[tuple[tuple, dict]] | None, budget: int, memory: int, device: torch.device,
                 snapshot: _StateSnapshot, batchnorm: str, convert_kwargs: dict[str, Any],
                 plain: CandidateResult | None = None) -> list[CandidateResult]:
    """Every candidate's result, in the order given (measured: the plain model first, then by mode and bands; on
    CUDA each mode stops at the fewest bands that fit). ``plain``: the plain model's result, if measured before."""
    by_candidate: dict[Candidate, CandidateResult] = {}
    fewest: dict[str, Candidate] = {}  # on CUDA, per banded mode, the fewest bands measured to fit
    for candidate in sorted(candidates, key=lambda c: (c.mode != "column", c.mode, c.rows)):
        if candidate.mode in fewest:
            by_candidate[candidate] = CandidateResult(candidate, None, None, False,
                                                      f"skipped: {fewest[candidate.mode]} fits with fewer bands")
            continue
        by_candidate[candidate] = result = _measure(candidate, targets, step, inputs, budget, memory, device,
                                                    snapshot, batchnorm, convert_kwargs, plain)
        plain = result if candidate.mode == "column" else plain
        log.info("lrcnn probe %s", result.row())
        if result.fits and candidate.mode != "column" and device.type == "cuda":
            fewest[candidate.mode] = candidate
    return [by_candidate[c] for c in candidates]


def choose_plan(
    targets: Sequence[nn.Module],
    step: Callable[[], Any],
    *,
    memory_budget: Any = None,
    candidates: Sequence[Candidate] = DEFAULT_CANDIDATES,
    batchnorm: str = "exact",
    device: torch.device | str = "cpu",
    state_modules: Sequence[nn.Module] = (),
    convert_kwargs: dict[str, Any] | None = None,
    spend_budget: bool = True,
) -> Choice:
    """Measure ``candidates`` on ``step`` (one forward + backward through ``targets``) and pick the fastest
    whose peak fits ``memory_budget``. Each candidate is planned to spend up to ``PLAN_GOAL_FRACTION`` of the budget
    (per target) on time; where none of them fits, they are measured again as planned for their smallest peaks.
    On CUDA each mode is measured from its fewest bands up and stops at the
    first that fits (its candidates with more bands are reported as skipped). ``targets`` are left converted to
    the choice (or plain for "column"); gradients, buffers and RNG of ``targets`` and ``state_modules`` are as
    before the call.

    Raises:
        ValueError: bad ``memory_budget``.
        NoPlanFitsError: nothing fits; the message gives the smallest peak and what to change.
    """
    device = torch.device(device)
    budget = resolve_budget(memory_budget, device)
    memory = _memory.device_memory(device)  # a candidate estimated above it never runs (a CPU would swap)
    convert_kwargs = dict(convert_kwargs or {})
    before = [row_centric_config(t) for t in targets]
    snapshot = _StateSnapshot([*targets, *state_modules])
    unique = list(dict.fromkeys(candidates))
    goal = max(1, int(PLAN_GOAL_FRACTION * budget / max(1, len(targets))))
    try:
        inputs = _capture_inputs(targets, step)
        snapshot.restore()
        measured: dict[Candidate, CandidateResult] = {}
        for kwargs in ([{**convert_kwargs, "memory_budget": goal}] if spend_budget else []) + [convert_kwargs]:
            again = [c for c in unique if c.mode != "column" or c not in measured]  # the plain model has no plan
            measured.update(zip(again, _measure_all(again, targets, step, inputs, budget, memory, device, snapshot,
                                                    batchnorm, kwargs, measured.get(Candidate("column"))),
                                strict=True))
            results = [measured[c] for c in unique]
            if any(r.fits for r in results):
                break
            if kwargs is not convert_kwargs:
                log.info("lrcnn: no candidate planned to spend %.1f MiB fits: measuring them at their smallest "
                         "peaks", goal / MIB)
    finally:
        snapshot.restore()
    fitting = [r for r in results if r.fits]
    if not fitting:
        for t, cfg in zip(targets, before, strict=True):  # leave the targets as they came
            if cfg is None:
                restore(t)
            else:
                to_row_centric(t, mode=cfg.mode, rows=cfg.rows, batchnorm=cfg.batchnorm,
                               leaf_modules=cfg.leaf_modules, autowrap_functions=cfg.autowrap_functions,
                               memory_budget=cfg.memory_budget)
        measured_peaks = [r for r in results if r.peak_bytes is not None]
        smallest = min(measured_peaks, key=lambda r: r.peak_bytes or 0) if measured_peaks else None
        estimated = [r for r in results if r.estimate_bytes is not None]
        least = min(estimated, key=lambda r: r.estimate_bytes or 0) if estimated else None
        if smallest and smallest.peak_bytes is not None:
            found = f"the smallest peak was {smallest.peak_bytes / MIB:.1f} MiB ({smallest.candidate})"
        elif least and least.estimate_bytes is not None:
            found = f"the smallest estimated peak was {least.estimate_bytes / MIB:.1f} MiB ({least.candidate})"
        else:
            found = "no candidate could be measured"
        raise NoPlanFitsError(
            f"no candidate fits memory_budget={budget / MIB:.1f} MiB: {found}. Remedy: raise memory_budget, lower "
            "the batch size or image size, add candidates with more rows, or use batchnorm='freeze'.")
    best = min(fitting, key=lambda r: r.seconds or 0.0)
    column = measured.get(Candidate("column"))
    if best.ran_plain and column is not None and column.fits:  # the same step as the plain model's: say so
        best = column
    _apply(targets, best.candidate, batchnorm, kwargs)
    choice = Choice(best.candidate, results, budget, kwargs.get("memory_budget"))
    log.info("lrcnn choice:\n%s", choice.report())
    return choice

