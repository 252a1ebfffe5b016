"""``to_row_centric`` / ``restore``: swap a module's forward for the row-centric one, reversibly, in place."""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, fx, nn

from .estimate import breakdown, estimate, estimate_plain
from .executor import run_plan
from .memory import check_budget, resolve_budget
from .noise import draw_gates_globally
from .norms import split_image_norms
from .plan import Plan, describe
from .planner import MODES, build_plan, plain_graph_plan, plain_plan
from .rules import BATCHNORM_POLICIES
from .trace import LeafSpec, has_hooks, propagate_shapes, trace

__all__ = ["to_row_centric", "restore", "is_row_centric", "row_centric_config", "RowCentricConfig"]

log = logging.getLogger(__name__)
_ATTR = "_lrcnn_state"
_SAID_PLAIN: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class RowCentricConfig:
    """How a converted module runs (see :func:`to_row_centric`)."""

    mode: str
    rows: int
    batchnorm: str = "exact"
    leaf_modules: tuple[type | str, ...] = ()
    autowrap_functions: tuple[Callable[..., Any], ...] = ()
    memory_budget: int | float | None = None  # the estimated peak the planner may spend on time


@dataclass
class _State:
    config: RowCentricConfig
    # per (training, hooked, dropout probability) of each submodule, and the forward's arguments that are None
    traces: dict[tuple[tuple[tuple[bool, bool, float | None], ...], tuple[str, ...]],
                 tuple[fx.GraphModule, ...]] = field(default_factory=dict)
    plans: dict[tuple[Any, ...], Plan] = field(default_factory=dict)
    untraceable: set[str] = field(default_factory=set)  # submodules said to run whole, said once
    initialized: bool = False  # no lazy module left (see _initialize_lazy)

    def __reduce__(self) -> tuple[Any, ...]:
        """A copy (``copy.deepcopy``, an EMA model, ``torch.save``) keeps the configuration and traces afresh:
        traces and plans refer to this module's graph nodes and submodules, not the copy's."""
        return (_State, (self.config,))


class _Forward:
    """The converted module's ``forward``: an object rather than a bound method, so the module deep-copies and
    pickles with it (a copy runs its own parameters, row-centric)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def __signature__(self) -> inspect.Signature:  # what inspect.signature(module.forward) says of the plain one
        return inspect.signature(type(self.module).forward.__get__(self.module))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _row_centric_forward(self.module, *args, **kwargs)


def _check_config(mode: Any, rows: Any, batchnorm: Any) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be an integer >= 1 (the number of row bands), got {rows!r}")
    if batchnorm not in BATCHNORM_POLICIES:
        raise ValueError(f"batchnorm must be one of {BATCHNORM_POLICIES}, got {batchnorm!r}")


def to_row_centric(
    module: nn.Module,
    *,
    mode: str,
    rows: int | str,
    batchnorm: str = "exact",
    leaf_modules: LeafSpec = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    memory_budget: int | float | None = None,
    example_input: Tensor | None = None,
) -> nn.Module:
    """Convert ``module`` in place so its row-local parts run band by band (LR-CNN row-centric dataflow).

    The module computes the same function with the same gradients; parameters, buffers and ``state_dict()``
    are untouched (only ``forward`` is swapped), and :func:`restore` undoes the conversion. The module is
    traced with torch.fx on the first call; plans are built per input shape and cached.

    Args:
        module: any torch.fx-traceable module whose first input is an ``(N, C, H, W)`` image batch.
        mode: ``"2ps"`` (bands in order, boundary rows handed on), ``"overl"`` (overlapping halos) or
            ``"auto"`` (measure the plain model, 2PS and OverL on ``example_input``; keep the fastest that fits
            ``memory_budget``; the module stays plain if that is the plain model).
        rows: number of row bands of the largest row-local region (int >= 1), or ``"auto"`` (measured, like
            ``mode="auto"``). When the planner cuts a region into segments, each gets bands of about the same
            activation bytes, so a deep low-resolution segment has fewer (at most one per output row).
        batchnorm: ``"exact"`` (train-mode BN runs globally), ``"freeze"`` (running statistics, affine
            parameters still train) or ``"per_band"`` (per-band statistics: an approximation, warns once).
        leaf_modules: submodule types or qualified names not to trace into (they run as global ops).
        autowrap_functions: free functions to keep as single graph nodes when tracing.
        memory_budget: bytes (int) or a fraction of the device's memory (float in (0, 1]). For "auto": the
            measured peak a candidate must fit (None: 80% of the device's memory). With a fixed ``mode``/``rows``:
            the estimated peak the planner may use to run faster (fewer bands, segments kept whole) once its
            plan is under it (None: the smallest peak it finds).
        example_input: for "auto": a representative input batch, used for one probe step per candidate
            (the probe leaves gradients, buffers and RNG as they were).

    Returns:
        The same ``module`` object.

    Raises:
        ValueError: an argument is invalid (the message lists the allowed values).

    Example::

        model = to_row_centric(torchvision.models.resnet18(), mode="2ps", rows=8, batchnorm="freeze")
        model(torch.randn(2, 3, 1024, 1024)).sum().backward()
    """
    if mode == "auto" or rows == "auto":
        return _auto(module, mode, rows, batchnorm, tuple(leaf_modules), tuple(autowrap_functions), memory_budget,
                     example_input)
    _check_config(mode, rows, batchnorm)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if batchnorm == "per_band":
        warnings.warn("batchnorm='per_band' normalises each band with its own statistics: this approximates "
                      "train-mode BatchNorm and does not match the plain model", UserWarning, stacklevel=2)
    if memory_budget is not None:
        check_budget(memory_budget)
    config = RowCentricConfig(mode, int(rows), batchnorm, tuple(leaf_modules), tuple(autowrap_functions), memory_budget)
    if row_centric_config(module) == config:
        return module  # already converted this way: keep the traces and plans
    if is_row_centric(module):
        restore(module)
    module.__dict__[_ATTR] = _State(config)
    module.forward = _Forward(module)  # type: ignore[method-assign]
    return module


def _auto(module: nn.Module, mode: str, rows: Any, batchnorm: str, leaf_modules: tuple[Any, ...],
          autowrap_functions: tuple[Any, ...], memory_budget: Any, example_input: Tensor | None) -> nn.Module:
    from .auto import candidates_for, choose_plan, sum_outputs

    candidates = candidates_for(mode, rows)
    _check_config(candidates[-1].mode, candidates[-1].rows, batchnorm)
    if not isinstance(example_input, Tensor):
        raise ValueError("mode='auto' or rows='auto' needs example_input=<a representative (N, C, H, W) batch> "
                         "to measure the candidates on")

    def step() -> None:
        sum_outputs(module(example_input)).backward()

    choose_plan([module], step, memory_budget=memory_budget, candidates=candidates, batchnorm=batchnorm,
                device=example_input.device,
                convert_kwargs={"leaf_modules": leaf_modules, "autowrap_functions": autowrap_functions})
    return module


def restore(module: nn.Module) -> nn.Module:
    """Undo :func:`to_row_centric`: the module's own ``forward`` is used again. Returns the module."""
    module.__dict__.pop(_ATTR, None)
    module.__dict__.pop("forward", None)
    return module


def is_row_centric(module: nn.Module) -> bool:
    """True when ``module`` is currently converted."""
    return _ATTR in module.__dict__


def row_centric_config(module: nn.Module) -> RowCentricConfig | None:
    """The configuration of a converted module, or None."""
    state = module.__dict__.get(_ATTR)
    return state.config if state is not None else None


def cached_plans(module: nn.Module) -> list[Plan]:
    """The plans a converted module has built so far (one per input shape and train/eval state)."""
    state = module.__dict__.get(_ATTR)
    return list(state.plans.values()) if state is not None else []


def plan_for(module: nn.Module, *args: Any, **kwargs: Any) -> Plan:
    """The plan a converted ``module`` uses for these inputs (built and cached on first use)."""
    state: _State = module.__dict__[_ATTR]
    _initialize_lazy(module, state, args, kwargs)
    bound = _bind_inputs(module, args, kwargs)
    with _batchnorm_frozen(module, state.config.batchnorm == "freeze"):
        return _plan(module, state, bound)


def _initialize_lazy(module: nn.Module, state: _State, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Lazy modules (``nn.LazyConv2d``, ``nn.LazyLinear``...) take their shapes from their first input: run the
    plain forward once, without gradients and in eval mode (no statistics moved, no dropout drawn), so they have
    them before the module is traced and planned."""
    if state.initialized:
        return
    lazy = [name for name, t in (*module.named_parameters(), *module.named_buffers())
            if nn.parameter.is_lazy(t)]
    if not lazy:
        state.initialized = True
        return
    log.info("%s: initialising lazy %s with one plain forward without gradients", type(module).__name__,
             ", ".join(lazy))
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            type(module).forward(module, *args, **kwargs)
        state.initialized = True
    finally:
        for m, training in modes.items():
            m.training = training


def _bind_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The forward's arguments by name, in the signature's order, defaults applied (``self`` left out)."""
    forward = type(module).forward
    sig = inspect.signature(forward)
    try:
        bound = sig.bind(module, *args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{type(module).__name__}.forward: {exc}") from None
    bound.apply_defaults()
    arguments = dict(list(bound.arguments.items())[1:])
    first = next(iter(arguments.values()), None)
    if not isinstance(first, Tensor) or first.dim() != 4:
        got = f"a {first.dim()}-D tensor of shape {tuple(first.shape)}" if isinstance(first, Tensor) else repr(
            type(first).__name__)
        raise ValueError(f"input of a row-centric {type(module).__name__} must be a 4-D (N, C, H, W) tensor, got {got}")
    return arguments


def _drop_probability(m: nn.Module) -> float | None:
    """A dropout's ``p``, torchvision ``StochasticDepth``'s ``p`` or timm ``DropPath``'s ``drop_prob``."""
    for name in ("p", "drop_prob"):
        value = m.__dict__.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _plan(module: nn.Module, state: _State, arguments: dict[str, Any]) -> Plan:
    inputs = list(arguments.values())
    # a submodule's hooks make it a leaf that runs whole: a hook added or removed means another trace; so does a
    # drop probability changed (a schedule): the trace holds the probability it had as a constant
    flags = tuple((m.training, bool(name) and has_hooks(m), _drop_probability(m)) for name, m in module.named_modules())
    # arguments left None (``mask=None``) specialise the graph: ``if mask is not None`` is not traced on a proxy
    nones = tuple(name for name, v in arguments.items() if v is None)
    modes = (flags, nones)
    key = (modes, tuple((tuple(v.shape), v.dtype, v.device) if isinstance(v, Tensor) else repr(v) for v in inputs),
           torch.is_autocast_enabled())
    plan = state.plans.get(key)
    if plan is None:
        cfg = state.config
        graphs = state.traces.get(modes)
        if graphs is None:
            gm = trace(module, cfg.leaf_modules, cfg.autowrap_functions, inputs, nones)
            hooked = [name for name, m in module.named_modules() if name and has_hooks(m)]
            if hooked:
                log.warning("%s: submodules with hooks run whole, not in bands (their hooks see the whole tensors, "
                            "as in the plain model): %s", type(module).__name__, ", ".join(_outermost(hooked)))
            untraceable = {k: v for k, v in gm.meta.get("untraceable", {}).items() if k not in state.untraceable}
            if untraceable:
                state.untraceable.update(untraceable)
                by_reason: dict[str, list[str]] = {}
                for name, reason in untraceable.items():
                    by_reason.setdefault(reason, []).append(name)
                log.warning("%s: submodules torch.fx cannot trace run whole, not in bands (pass them in leaf_modules "
                            "to silence this): %s", type(module).__name__,
                            "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items()))
            draw_gates_globally(gm)
            split = split_image_norms(gm, cfg.batchnorm)
            graphs = (gm,) if split is None else (gm, split)
            if "shapes" not in gm.meta:  # a graph for these input shapes only is kept in their plan
                state.traces[modes] = graphs
        goal = None
        if cfg.memory_budget is not None:
            goal = resolve_budget(cfg.memory_budget, inputs[0].device)
        plans: list[Plan] = []
        plan = None
        for gm in graphs:  # as traced and, with GroupNorm / InstanceNorm, split: the lower estimated peak
            propagate_shapes(gm, inputs)
            if goal is not None and not plans:  # the plain model within the budget: nothing to plan
                plain = plain_graph_plan(gm, module)
                peak = estimate_plain(plain)
                if peak <= goal:
                    plan = replace(plain, plain_reason=_within_budget(peak, goal))
                    break
            plans.append(build_plan(gm, module, mode=cfg.mode, rows=cfg.rows, batchnorm=cfg.batchnorm, goal=goal))
        if plan is None:
            plan = _never_worse(min(plans, key=lambda p: estimate(p).peak_bytes), plans[0], goal)
        state.plans[key] = plan
        log.info("row-centric plan for %s %s:\n%s\n%s", type(module).__name__, tuple(inputs[0].shape),
                 describe(plan), breakdown(plan))
    return plan


def _outermost(names: list[str]) -> list[str]:
    """Qualified module names without those inside another listed one (``layer1`` covers ``layer1.0.conv1``)."""
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def _never_worse(plan: Plan, traced: Plan, goal: int | None = None) -> Plan:
    """``plan``, or the module run as usual when ``plan`` is not estimated below the plain model (``traced`` is
    the plan of the graph as traced, so its plain estimate is the plain model's) or the plain model is estimated
    under ``goal`` (the memory budget to spend)."""
    if not plan.segments:
        return plain_plan(traced, "no row-local region (no convolution, pooling or pointwise op on image rows)")
    planned, plain = estimate(plan).peak_bytes, estimate_plain(traced)
    if goal is not None and plain <= goal:
        return plain_plan(traced, _within_budget(plain, goal))
    if planned < plain:
        return plan
    return plain_plan(traced, f"the row-centric plan's estimated peak ({planned / 2**20:.1f} MiB) is not below the "
                              f"plain model's ({plain / 2**20:.1f} MiB)")


def _within_budget(plain: int, goal: int) -> str:
    return (f"the plain model's estimated peak ({plain / 2**20:.1f} MiB) is within memory_budget "
            f"({goal / 2**20:.1f} MiB)")


@contextlib.contextmanager
def _batchnorm_frozen(module: nn.Module, frozen: bool) -> Iterator[None]:
    """With ``batchnorm="freeze"`` every BatchNorm of ``module`` runs in eval mode (its running statistics) for
    the call: traced, shape-propagated and run, so a subclass traced through (timm's ``BatchNormAct2d``), a
    BatchNorm on a ``(N, C, 1, 1)`` squeeze-excitation gate at batch size 1 and a ``BatchNorm1d`` head are
    frozen too. Only the norms' own ``training`` flag changes, and it is restored."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training] \
        if frozen else []
    for m in norms:
        m.training = False
    try:
        yield
    finally:
        for m in norms:
            m.training = True


@torch.compiler.disable  # torch.compile runs it eagerly, a graph break (tracing the planner crashed the process)
def _row_centric_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: _State = self.__dict__[_ATTR]
    _initialize_lazy(self, state, args, kwargs)
    arguments = _bind_inputs(self, args, kwargs)
    inputs = list(arguments.values())
    with _batchnorm_frozen(self, state.config.batchnorm == "freeze"):
        plan = _plan(self, state, arguments)
        said = _SAID_PLAIN.setdefault(self, set())
        if plan.plain_reason and plan.plain_reason not in said:  # once per module and reason, across conversions
            said.add(plan.plain_reason)
            log.warning("%s runs as usual (not row-centric) for input %s: %s", type(self).__name__,
                        tuple(inputs[0].shape), plan.plain_reason)
        return run_plan(plan, self, inputs)
