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

__all__ = ["trace", "propagate_shapes", "fetch_attr", "quiet_fake_tensor_logs", "has_hooks", "LeafSpec"]

log = logging.getLogger(__name__)

LeafSpec = Sequence[type | str]


def has_hooks(m: nn.Module) -> bool:
    """Whether calling ``m`` runs hooks (its own forward/backward hooks, or global module hooks). Such a module
    is traced as a leaf and runs whole, so its hooks see what they see in the plain model: torch.nn.utils.prune
    and spectral_norm recompute the weight in a pre-hook, and a feature hook reads the whole output."""
    from torch.nn.modules import module as torch_module

    own = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
    shared = (getattr(torch_module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                             "_global_backward_hooks", "_global_backward_pre_hooks"))
    return any(own) or any(shared)


def _call_without_hooks(m: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """A fake or shape-only run of ``m``: its hooks would act on fake values (a prune pre-hook would set a fake
    weight on the real module) or run one extra time; its forward gives the shapes."""
    return m.forward(*args, **kwargs) if has_hooks(m) else m(*args, **kwargs)


class _Tracer(fx.Tracer):
    """fx tracer with user leaf modules (types or qualified names); remembers the innermost failing module."""

    def __init__(self, leaf_modules: LeafSpec, autowrap_functions: Sequence[Callable[..., Any]]) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        # buffers become graph values: ``self.num_batches_tracked.add_(1)`` in a BatchNorm subclass traced through
        # is then a graph node run at every call, not an update made once, at trace time, to the real buffer
        self.proxy_buffer_attributes = True
        self._leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self._leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaf_types) or module_qualified_name in self._leaf_names or has_hooks(m):
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


class _ShapeTracer(_Tracer):
    """A tracer that also runs every node on fake tensors of one input's shapes, so a forward whose Python
    control flow reads shapes (``if h % 32``, ``h, w = x.shape[-2:]``, ``len(...)``) takes the branch these
    shapes take. The graph holds for inputs of these shapes only; control flow on tensor data is still refused."""

    def __init__(self, leaf_modules: LeafSpec, autowrap_functions: Sequence[Callable[..., Any]],
                 inputs: Sequence[Any]) -> None:
        super().__init__(leaf_modules, autowrap_functions)
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.inputs = [self.mode.from_tensor(a) if isinstance(a, Tensor) else a for a in inputs]
        self.placed = 0
        self.evaluating = False  # running a node on fake tensors: its module calls and attributes are not nodes

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if self.evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        return attr_val if self.evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        self.evaluating = True
        try:
            node.meta["val"] = self._run(node)
        except _Unknown as exc:  # an input's value is unknown: keep the first failure
            node.meta["val_error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 -- an unknown value only matters if control flow asks for it
            node.meta["val_error"] = f"{node.name}: {type(exc).__name__}: {exc}"
        finally:
            self.evaluating = False
        return node

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _SizedProxy(node, self)

    def _run(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            self.placed += 1
            return self.inputs[self.placed - 1] if self.placed <= len(self.inputs) else node.args[0]
        if node.op == "get_attr":
            value = fetch_attr(self.root, str(node.target))
            return self.mode.from_tensor(value) if isinstance(value, Tensor) else value

        def load(n: fx.Node) -> Any:
            if "val" not in n.meta:
                raise _Unknown(n.meta.get("val_error", n.name))
            return n.meta["val"]

        args, kwargs = fx.node.map_arg(node.args, load), fx.node.map_arg(node.kwargs, load)
        with self.mode, torch.no_grad():  # values only: no autograd graph holding the parameters
            if node.op == "call_module":
                return _call_without_hooks(self.root.get_submodule(str(node.target)), args, kwargs)
            if node.op == "call_method":
                return getattr(args[0], str(node.target))(*args[1:], **kwargs)
            return node.target(*args, **kwargs)  # type: ignore[operator]

    def value(self, obj: fx.Proxy, use: str) -> Any:
        """What ``obj`` holds for these input shapes; refused where it is not known or is tensor data."""
        if "val" not in obj.node.meta:
            raise fx.proxy.TraceError(f"{use} needs the value of {obj.node.name}, which fake tensors could not "
                                      f"compute ({obj.node.meta.get('val_error', 'unknown')})")
        return obj.node.meta["val"]

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.value(obj, "control flow")
        if isinstance(value, Tensor):
            raise fx.proxy.TraceError(f"control flow depends on tensor data ({obj.node.name}), not only on shapes")
        return bool(value)

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        return iter([obj[i] for i in range(len(obj))])


class _Unknown(Exception):
    """A node's input has no fake value; the message is the first failure."""


class _SizedProxy(fx.Proxy):
    """A proxy whose ``len`` (``for i in range(len(features))``) and formatting come from its fake value."""

    def __len__(self) -> int:
        return len(self.tracer.value(self, "len()"))  # type: ignore[attr-defined]

    def __format__(self, spec: str) -> str:  # f"{h}x{w}" in a module's own error message
        value = self.node.meta.get("val")
        return format(value, spec) if isinstance(value, (int, float, bool, tuple, torch.Size)) else repr(self)


def trace(module: nn.Module, leaf_modules: LeafSpec = (), autowrap_functions: Sequence[Callable[..., Any]] = (),
          inputs: Sequence[Any] | None = None, none_inputs: Sequence[str] = ()) -> fx.GraphModule:
    """Trace ``module`` with torch.fx; the GraphModule shares the module's submodules and parameters.

    ``none_inputs`` are the forward's arguments that are None for this call: the graph is specialised to them
    (``if mask is not None`` takes the branch the call takes; a guard in the graph refuses another value).

    Where the forward's control flow reads shapes, and ``inputs`` are given, the module is traced again for
    their shapes (``gm.meta["shapes"]`` then says which; the graph holds for those only). A submodule that
    still cannot be traced (control flow on tensor data, ...) becomes a leaf that runs whole, as one global op,
    exactly as in the plain model: ``gm.meta["untraceable"]`` maps its name to the reason.

    Raises:
        TraceError: the module cannot be traced; the message names the failing submodule and the remedy.
    """
    try:
        with _state_kept(module):  # what a forward does to real tensors while traced is not a step
            return _trace(module, _Tracer(leaf_modules, autowrap_functions), none_inputs=none_inputs)
    except TraceError:
        if inputs is None:
            raise
    shapes = [tuple(a.shape) if isinstance(a, Tensor) else a for a in inputs]
    leaves, untraceable = list(leaf_modules), dict[str, TraceError]()
    while True:
        try:
            with _state_kept(module):
                gm = _trace(module, _ShapeTracer(leaves, autowrap_functions, inputs), f" for input shapes {shapes}",
                            none_inputs)
            break
        except TraceError as exc:
            name = exc.submodule
            if name in untraceable:  # it fails as a leaf too: its own error, from before it was one
                raise untraceable[name] from None
            if not name or len(untraceable) >= _MOST_UNTRACEABLE:
                raise
            untraceable[name] = exc
            leaves.append(name)
    reasons = {name: str(exc.__cause__) for name, exc in untraceable.items()}
    if untraceable:  # with those as leaves, the graph may hold for every shape
        try:
            with _state_kept(module):
                general = _trace(module, _Tracer(leaves, autowrap_functions), none_inputs=none_inputs)
            general.meta["untraceable"] = reasons
            return general
        except TraceError:
            pass
    gm.meta["shapes"] = shapes
    gm.meta["untraceable"] = reasons
    log.info("%s has shape-dependent control flow: traced for input shapes %s", type(module).__name__,
             gm.meta["shapes"])
    return gm


_MOST_UNTRACEABLE = 32  # submodules made leaves before the trace is given up


def _trace(module: nn.Module, tracer: _Tracer, shapes: str = "", none_inputs: Sequence[str] = ()) -> fx.GraphModule:
    modes = {m: m.training for m in module.modules()}
    try:
        graph = tracer.trace(module, concrete_args=dict.fromkeys(none_inputs) or None)
    except Exception as exc:
        where = f" in submodule {tracer.failed_in!r}" if tracer.failed_in else ""
        hint = repr(tracer.failed_in) if tracer.failed_in else "'name.of.submodule'"
        kind = "a module name or type"
        if tracer.failed_in:  # its type covers every block of that type, where a network repeats it
            cls = type(module.get_submodule(tracer.failed_in))
            kind = f"a module name, or its type {cls.__module__}.{cls.__qualname__} for every such module"
        error = TraceError(
            f"cannot trace {type(module).__name__} with torch.fx{shapes}{where}: {type(exc).__name__}: {exc}. "
            f"Remedy: pass leaf_modules=[{hint}] ({kind}; it then runs as one global op on the "
            "full tensor) or autowrap_functions=[fn] for a free function with data-dependent control flow.")
        error.submodule = tracer.failed_in or ""  # a submodule's name: resolved above
        raise error from exc
    finally:
        for m, training in modes.items():
            m.train(training)
    return fx.GraphModule(module, graph, class_name=type(module).__name__ + "Traced")


@contextlib.contextmanager
def _state_kept(module: nn.Module) -> Iterator[None]:
    """Fake runs with autocast off, then buffers and the CPU RNG as they were (train-mode BN, dropout)."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    rng = torch.get_rng_state()
    try:
        # NOTE: autocast off: its weight-cast cache would otherwise keep fake copies of real parameters
        with quiet_fake_tensor_logs(), contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(rng)


def propagate_shapes(gm: fx.GraphModule, args: Sequence[Any]) -> None:
    """Fill ``node.meta["val"]`` with fake (shape-only) values for ``args`` and, where fake tensors can run the
    module, ``node.meta["saved_output"]``/``["saved_internal"]`` with the bytes autograd saves for backward (see
    :class:`_SavedTensorProp`), leaving every buffer and RNG as is."""
    for node in gm.graph.nodes:  # figures of an earlier input shape must not outlive a failed propagation
        node.meta.pop("saved_output", None)
        node.meta.pop("saved_internal", None)
    with _state_kept(gm):
        try:
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode(allow_non_fake_inputs=True)
            fake = [mode.from_tensor(a) if isinstance(a, Tensor) else a for a in args]
            with torch.enable_grad():
                _SavedTensorProp(gm, mode).propagate(*fake)
        except Exception as exc:  # some ops have no fake kernel: fall back to one real no-grad run
            log.debug("fake shape propagation failed (%s); running the module once", exc)
            with torch.no_grad():
                _RealShapeProp(gm).run(*args)


class _SavedTensorProp(FakeTensorProp):
    """Fake propagation with autograd on, recording what each node's backward will hold.

    Once per storage, what autograd saves that a node allocated: ``saved_output``, its output's bytes when an op
    saves it (the node that last wrote a storage owns it, so an in-place ReLU owns the convolution output it
    overwrote), and ``saved_internal``, buffers the op saves for itself (max-pool indices, BN statistics).
    Parameters, buffers and graph inputs exist before the step and are not counted.
    """

    def __init__(self, gm: fx.GraphModule, mode: Any) -> None:
        super().__init__(gm, mode)
        self.owner: dict[int, fx.Node] = {}
        self.saved: dict[int, tuple[fx.Node, int]] = {}  # storage -> (node that saved it, bytes)
        self.current: fx.Node | None = None
        self.alive: list[Any] = []  # fake results held so no storage address is reused during the run

    def propagate(self, *args: Any) -> Any:
        # autograd saves the real parameters and buffers themselves (converted to fake only inside each op)
        self.before = {_storage(t) for t in [*args, *self.module.parameters(), *self.module.buffers()]
                       if isinstance(t, Tensor)}
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, _never_unpacked):
                super().propagate(*args)
            self._record()
        finally:
            # fake autograd graphs keep the pack hook, and through it this interpreter, alive from C++ where
            # Python's collector cannot see: drop everything it holds (it kept every converted model alive)
            self.__dict__.clear()

    def _record(self) -> None:
        before = self.before
        for node in self.module.graph.nodes:
            node.meta["saved_output"] = node.meta["saved_internal"] = 0
        for key, (node, nbytes) in self.saved.items():
            if key in before:
                continue
            if key in self.owner:
                self.owner[key].meta["saved_output"] += nbytes
            else:
                node.meta["saved_internal"] += nbytes
        for node in self.module.graph.nodes:  # values only: their autograd graph is not needed
            if "val" in node.meta:
                node.meta["val"] = fx.node.map_aggregate(
                    node.meta["val"], lambda v: v.detach() if isinstance(v, Tensor) else v)

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _call_without_hooks(self.fetch_attr(target), args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        leaves = torch.utils._pytree.tree_flatten(result)[0]
        if "val" not in n.meta and not any(isinstance(t, Tensor) for t in leaves):
            n.meta["val"] = result  # dtypes, devices, None (``torch._assert``): FakeTensorProp records none of them
        self.alive.append(result)
        for t in torch.utils._pytree.tree_flatten(result)[0]:
            if isinstance(t, Tensor) and n.op != "placeholder":
                self.owner[_storage(t)] = n
        return result

    def _pack(self, t: Tensor) -> None:
        if self.current is not None:
            self.saved.setdefault(_storage(t), (self.current, t.untyped_storage().nbytes()))
        self.alive.append(t)  # held here, not by autograd, so no storage address is reused during the run


def _never_unpacked(_: None) -> Tensor:
    raise RuntimeError("internal: the fake propagation's autograd graph is never run backward")


def _storage(t: Tensor) -> int:
    return int(t.untyped_storage()._cdata)


def fetch_attr(root: nn.Module, target: str) -> Any:
    """The attribute a ``get_attr`` node names (``"layer1.0.weight"``) on ``root``."""
    obj: Any = root
    for name in target.split("."):
        obj = getattr(obj, name)
    return obj


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
    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _call_without_hooks(self.fetch_attr(target), args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["val"] = fx.node.map_aggregate(
            result, lambda v: torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, Tensor) else v)
        return result
