"""torch.fx tracing of a module and shape propagation without running it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .errors import TraceError

__all__ = ["trace", "propagate_shapes", "quiet_fake_tensor_logs", "LeafSpec"]

log = logging.getLogger(__name__)

LeafSpec = Sequence[type | str]


class _Tracer(fx.Tracer):
    """fx tracer with user leaf modules (types or qualified names); remembers the innermost failing module."""

    def __init__(self, leaf_modules: LeafSpec, autowrap_functions: Sequence[Callable[..., Any]]) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self._leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self._leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaf_types) or module_qualified_name in self._leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m) or type(m).__name__
            raise


def trace(module: nn.Module, leaf_modules: LeafSpec = (),
          autowrap_functions: Sequence[Callable[..., Any]] = ()) -> fx.GraphModule:
    """Trace ``module`` with torch.fx; the GraphModule shares the module's submodules and parameters.

    Raises:
        TraceError: the module cannot be traced; the message names the failing submodule and the remedy.
    """
    tracer = _Tracer(leaf_modules, autowrap_functions)
    modes = {m: m.training for m in module.modules()}
    try:
        graph = tracer.trace(module)
    except Exception as exc:
        where = f" in submodule {tracer.failed_in!r}" if tracer.failed_in else ""
        hint = repr(tracer.failed_in) if tracer.failed_in else "'name.of.submodule'"
        raise TraceError(
            f"cannot trace {type(module).__name__} with torch.fx{where}: {type(exc).__name__}: {exc}. "
            f"Remedy: pass leaf_modules=[{hint}] (a module name or type; it then runs as one global op on the "
            "full tensor) or autowrap_functions=[fn] for a free function with data-dependent control flow."
        ) from exc
    finally:
        for m, training in modes.items():
            m.train(training)
    return fx.GraphModule(module, graph, class_name=type(module).__name__ + "Traced")


def propagate_shapes(gm: fx.GraphModule, args: Sequence[Any]) -> None:
    """Fill ``node.meta["val"]`` with fake (shape-only) values for ``args``, leaving every buffer and RNG as is."""
    buffers = [(b, b.detach().clone()) for b in gm.buffers()]
    rng = torch.get_rng_state()
    try:
        # NOTE: autocast off: its weight-cast cache would otherwise keep fake copies of real parameters
        with torch.no_grad(), quiet_fake_tensor_logs(), contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            try:
                from torch._subclasses.fake_tensor import FakeTensorMode

                mode = FakeTensorMode(allow_non_fake_inputs=True)
                fake = [mode.from_tensor(a) if isinstance(a, Tensor) else a for a in args]
                FakeTensorProp(gm, mode).propagate(*fake)
            except Exception as exc:  # some ops have no fake kernel: fall back to one real no-grad run
                log.debug("fake shape propagation failed (%s); running the module once", exc)
                _RealShapeProp(gm).run(*args)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(rng)


@contextlib.contextmanager
def quiet_fake_tensor_logs() -> Iterator[None]:
    """Fake-tensor failures are expected here (we fall back or report them): keep torch from logging tracebacks."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


class _RealShapeProp(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["val"] = fx.node.map_aggregate(
            result, lambda v: torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, Tensor) else v)
        return result
