"""Registry of row rules: which graph nodes are row-local, which input rows they need, how they run on a band.

A node with a rule is *row-local*: output rows ``[a, b)`` depend only on a contiguous band of its row
inputs. Nodes without a rule are *global* and run as usual on full tensors. Unknown ops never get a rule,
so an unsupported op costs memory, never correctness.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .geometry import RowInterval, same_padding, split_padding, transposed_input_rows, window_input_rows
from .norms import normalize
from .trace import has_hooks

__all__ = ["RowRule", "NodeRule", "rule_for", "is_4d", "row_dim", "moved_row_dim", "BATCHNORM_POLICIES",
           "recomputing", "concrete"]

BATCHNORM_POLICIES = ("exact", "freeze", "per_band")

_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("lrcnn_recomputing", default=False)


@contextlib.contextmanager
def recomputing(flag: bool) -> Iterator[None]:
    """Mark code as a backward-time recomputation (side effects such as BN statistics must not repeat)."""
    token = _RECOMPUTING.set(flag)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


Call = Callable[[tuple[Any, ...], dict[str, Any]], Tensor]


class RowRule:
    """Pointwise rule: output rows ``[a, b)`` need input rows ``[a, b)``; subclasses change the geometry."""

    def __init__(self, in_height: int, call: Call) -> None:
        self.in_height = in_height
        self.call = call

    def needed(self, out: RowInterval) -> RowInterval:
        """Input rows (clamped to the input) that output rows ``out`` read, for every row input."""
        return out.clamp(self.in_height)

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: RowInterval) -> Tensor:
        """Compute output rows ``out``; row inputs in ``args``/``kwargs`` hold exactly ``needed(out)``."""
        return self.call(args, kwargs)


class WindowRule(RowRule):
    """Sliding window (conv, pooling, pad): ``call(args, kwargs, pad_top, pad_bottom, out)`` pads the band itself."""

    def __init__(self, in_height: int, kernel: int, stride: int, pad_top: int, dilation: int, call: Any) -> None:
        super().__init__(in_height, call)
        self.kernel, self.stride, self.pad_top, self.dilation = kernel, stride, pad_top, dilation

    def _window(self, out: RowInterval) -> RowInterval:
        return window_input_rows(out, self.kernel, self.stride, self.pad_top, self.dilation)

    def needed(self, out: RowInterval) -> RowInterval:
        return self._window(out).clamp(self.in_height)

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: RowInterval) -> Tensor:
        _, top, bottom = split_padding(self._window(out), self.in_height)
        return self.call(args, kwargs, top, bottom, out)


class TransposedRule(RowRule):
    """Transposed convolution: ``call(args, kwargs)`` returns the bias-free output of the band, placed here."""

    def __init__(self, in_height: int, kernel: int, stride: int, pad_top: int, dilation: int, call: Any, bias: Any):
        super().__init__(in_height, call)
        self.kernel, self.stride, self.pad_top, self.dilation, self.bias = kernel, stride, pad_top, dilation, bias

    def needed(self, out: RowInterval) -> RowInterval:
        return transposed_input_rows(out, self.kernel, self.stride, self.pad_top, self.dilation, self.in_height)

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: RowInterval) -> Tensor:
        rows = self.needed(out)
        y = self.call(args, kwargs)
        first = rows.start * self.stride - self.pad_top  # full-output row of y's first row
        lo, hi = out.start - first, out.stop - first
        y = y[:, :, max(lo, 0) : max(min(hi, y.shape[2]), 0)]
        y = F.pad(y, (0, 0, max(-lo, 0), len(out) - y.shape[2] - max(-lo, 0)))
        bias = self.bias(args, kwargs)
        return y if bias is None else y + bias.reshape(1, -1, 1, 1)


class ResampleRule(RowRule):
    """Interpolation: a vertical gather/lerp from a probed row table, then the op along the width only."""

    def __init__(self, in_height: int, src: Tensor, linear: bool, call: Call) -> None:
        super().__init__(in_height, call)
        self.lo = src.floor().long().clamp(0, in_height - 1)
        self.hi = (self.lo + 1).clamp(max=in_height - 1) if linear else self.lo
        self.lam = (src - self.lo).clamp(0, 1) if linear else None

    def needed(self, out: RowInterval) -> RowInterval:
        return RowInterval(int(self.lo[out.start : out.stop].min()), int(self.hi[out.start : out.stop].max()) + 1)

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: RowInterval) -> Tensor:
        x = args[0]
        start = self.needed(out).start
        lo = (self.lo[out.start : out.stop] - start).to(x.device)
        y = x.index_select(2, lo)
        if self.lam is not None:
            hi = (self.hi[out.start : out.stop] - start).to(x.device)
            lam = self.lam[out.start : out.stop].to(device=x.device, dtype=x.dtype).reshape(1, 1, -1, 1)
            y = y * (1 - lam) + x.index_select(2, hi) * lam
        return self.call((y, *args[1:]), kwargs)


@dataclass(frozen=True)
class NodeRule:
    """A node's rule plus which of its input nodes are row-indexed (the others are used whole)."""

    rule: RowRule
    row_inputs: frozenset[fx.Node]


# --------------------------------------------------------------------------------------------- helpers


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def is_4d(value: Any) -> bool:
    """Whether ``value`` is a 4-D tensor (an image batch, or a node's ``meta["val"]``)."""
    return isinstance(value, Tensor) and value.dim() == 4


def row_dim(node: fx.Node) -> int:
    """The axis of a node's 4-D value that bands cut (2 unless a permute moved the image rows: channels-last
    blocks hold them in axis 1); set by the planner in ``node.meta["row_dim"]``."""
    return int(node.meta.get("row_dim", 2))


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return (int(value[0]), int(value[1])) if len(value) == 2 else (int(value[0]), int(value[0]))
    return int(value), int(value)


def _bind(names: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


def _bind_node(names: Sequence[str], node: fx.Node) -> dict[str, Any]:
    """A node's arguments by name at plan time; values computed from shapes (``F.pad(x, (h % 2, ...))``) by
    their value for the plan's input shapes, tensor-valued nodes as nodes."""
    def resolve(v: fx.Node) -> Any:
        value = v.meta.get("val")
        return v if isinstance(value, Tensor) or value is None else concrete(value)

    return {k: fx.node.map_arg(v, resolve) for k, v in _bind(names, node.args, node.kwargs).items()}


def concrete(value: Any) -> Any:
    """``value`` with symbolic ints made plain ints."""
    return fx.node.map_aggregate(value, lambda v: int(v) if isinstance(v, torch.SymInt) else v)


def _own_padding(top: int, bottom: int, stride: int, limit: int | None = None) -> tuple[int, int] | None:
    """Symmetric row padding an op can apply itself instead of a padded copy of a border band (a copy its
    backward would save beside the band): ``(pad, skip)``, ``skip`` the whole strides of extra output rows
    this puts on top. None when the op cannot pad so much (pooling: at most half its window)."""
    skip = -(-max(0, bottom - top) // stride)
    pad = top + skip * stride
    return None if limit is not None and pad > limit else (pad, skip)


def _crop(y: Tensor, skip: int, out: RowInterval) -> Tensor:
    """Output rows ``out`` of ``y``, computed with ``skip`` extra rows on top (and perhaps some below)."""
    return y if skip == 0 and y.shape[2] == len(out) else y[:, :, skip : skip + len(out)]


def _pad_band(x: Tensor, pads: tuple[int, int, int, int], mode: str, value: float = 0.0) -> Tensor:
    if not any(pads):
        return x
    if mode in ("zeros", "constant"):
        return F.pad(x, pads, value=value)
    return F.pad(x, pads, mode=mode)


# --------------------------------------------------------------------------------------------- conv and pooling


def _conv_rule(in_height: int, kernel: tuple[int, int], stride: Any, padding: Any, dilation: Any, mode: str,
               run_conv: Callable[[Tensor, Any, tuple[Any, ...], dict[str, Any]], Tensor]) -> RowRule | None:
    (kh, kw), (dh, dw) = kernel, _pair(dilation)
    sh, _ = _pair(stride)
    if isinstance(padding, str):
        (pt, pb), (pl, pr) = (same_padding(kh, dh), same_padding(kw, dw)) if padding == "same" else ((0, 0), (0, 0))
    else:
        (pt, pl) = _pair(padding)
        pb, pr = pt, pl
    if mode not in ("zeros", "reflect", "replicate"):
        return None  # circular padding wraps rows around the image: not row-local
    if mode != "zeros" and dh * (kh - 1) < 2 * max(pt, pb):
        return None  # the band at the border would not hold the rows that reflect/replicate copy

    def call(args: tuple[Any, ...], kwargs: dict[str, Any], top: int, bottom: int, out: RowInterval) -> Tensor:
        x = args[0]
        if mode == "zeros" and pl == pr and x.shape[2] > 0:  # the op's own padding: no padded copy to save
            pad, skip = _own_padding(top, bottom, sh)  # type: ignore[misc]  # no limit: never None
            return _crop(run_conv(x, (pad, pl), args, kwargs), skip, out)
        return run_conv(_pad_band(x, (pl, pr, top, bottom), mode), 0, args, kwargs)

    return WindowRule(in_height, kh, sh, pt, dh, call)


def _conv_module(m: nn.Conv2d, in_height: int) -> RowRule | None:
    def run_conv(x: Tensor, padding: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        return F.conv2d(x, m.weight, m.bias, m.stride, padding, m.dilation, m.groups)

    return _conv_rule(in_height, m.kernel_size, m.stride, m.padding, m.dilation, m.padding_mode, run_conv)


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _conv_function(node: fx.Node, in_height: int) -> RowRule | None:
    b = _bind_node(_CONV_ARGS, node)
    weight = _val(b["weight"])
    if not is_4d(weight):
        return None

    def run_conv(x: Tensor, padding: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        bb = _bind(_CONV_ARGS, args, kwargs)
        return F.conv2d(x, bb["weight"], bb.get("bias"), bb.get("stride", 1), padding, bb.get("dilation", 1),
                        bb.get("groups", 1))

    return _conv_rule(in_height, tuple(weight.shape[2:]), b.get("stride", 1), b.get("padding", 0),
                      b.get("dilation", 1), "zeros", run_conv)


_CONVT_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")


def _conv_transpose_rule(in_height: int, kernel: int, stride: Any, padding: Any, output_padding: Any,
                         groups: int, dilation: Any, weight: Call, bias: Call) -> RowRule:
    (sh, sw), (ph, pw), (_, opw), (dh, dw) = _pair(stride), _pair(padding), _pair(output_padding), _pair(dilation)

    def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        return F.conv_transpose2d(args[0], weight(args, kwargs), None, (sh, sw), (0, pw), (0, opw), groups, (dh, dw))

    return TransposedRule(in_height, kernel, sh, ph, dh, call, bias)


def _max_pool_rule(in_height: int, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool) -> RowRule:
    (kh, kw), (ph, pw), (dh, dw) = _pair(kernel), _pair(padding), _pair(dilation)
    sh, sw = _pair(stride if stride not in (None, [], ()) else kernel)

    def call(args: tuple[Any, ...], kwargs: dict[str, Any], top: int, bottom: int, out: RowInterval) -> Tensor:
        own = _own_padding(top, bottom, sh, kh // 2)
        if own is not None:  # the op's own padding: no padded copy to save
            return _crop(F.max_pool2d(args[0], (kh, kw), (sh, sw), (own[0], pw), (dh, dw), ceil_mode), own[1], out)
        x = _pad_band(args[0], (0, 0, top, bottom), "constant", -math.inf)
        return F.max_pool2d(x, (kh, kw), (sh, sw), (0, pw), (dh, dw), ceil_mode)

    return WindowRule(in_height, kh, sh, ph, dh, call)


def _avg_pool_rule(in_value: Tensor, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
                   count_include_pad: bool, divisor_override: int | None) -> RowRule:
    in_height, in_width = in_value.shape[2], in_value.shape[3]
    (kh, kw), (ph, pw) = _pair(kernel), _pair(padding)
    sh, sw = _pair(stride if stride not in (None, [], ()) else kernel)
    # NOTE: the band runs with no vertical padding, so PyTorch would count the divisor differently at the
    # border; sum the window instead and divide by the full image's divisor map, computed once here.
    ones = torch.ones(1, 1, in_height, in_width, dtype=torch.float64)
    counts = F.avg_pool2d(ones, (kh, kw), (sh, sw), (ph, pw), ceil_mode, True, 1)
    means = F.avg_pool2d(ones, (kh, kw), (sh, sw), (ph, pw), ceil_mode, count_include_pad, divisor_override)
    divisor = (counts / means).round()

    def call(args: tuple[Any, ...], kwargs: dict[str, Any], top: int, bottom: int, out: RowInterval) -> Tensor:
        own = _own_padding(top, bottom, sh, kh // 2)
        if own is not None:  # the op's own padding: no padded copy to save
            sums = _crop(F.avg_pool2d(args[0], (kh, kw), (sh, sw), (own[0], pw), ceil_mode, True, 1), own[1], out)
        else:
            x = _pad_band(args[0], (0, 0, top, bottom), "zeros")
            sums = F.avg_pool2d(x, (kh, kw), (sh, sw), (0, pw), ceil_mode, True, 1)
        return sums / divisor[:, :, out.start : out.stop].to(device=sums.device, dtype=sums.dtype)

    return WindowRule(in_height, kh, sh, ph, 1, call)


# --------------------------------------------------------------------------------------------- resampling


def _resample_rule(in_value: Tensor, out_value: Tensor, size: Any, scale_factor: Any, mode: str,
                   align_corners: bool | None, recompute_scale_factor: bool | None) -> RowRule | None:
    if mode not in ("nearest", "nearest-exact", "bilinear"):
        return None
    in_height, out_height, out_width = in_value.shape[2], out_value.shape[2], out_value.shape[3]
    linear = mode == "bilinear"
    extra: dict[str, Any] = {"align_corners": align_corners} if linear else {}
    if scale_factor is not None:
        sf_h, sf_w = (scale_factor, scale_factor) if not isinstance(scale_factor, (list, tuple)) else scale_factor
        vertical: dict[str, Any] = {"scale_factor": (float(sf_h), 1.0),
                                    "recompute_scale_factor": recompute_scale_factor}
    else:
        vertical = {"size": (out_height, 1)}
    # NOTE: probe PyTorch's own row mapping on a ramp so the band reads exactly the rows the full op reads.
    ramp = torch.arange(in_height, dtype=torch.float64).reshape(1, 1, in_height, 1)
    src = F.interpolate(ramp, mode=mode, **vertical, **extra).reshape(-1)
    if src.numel() != out_height:
        return None

    def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        y = args[0]
        if scale_factor is not None:
            horizontal: dict[str, Any] = {"scale_factor": (1.0, float(sf_w)),
                                          "recompute_scale_factor": recompute_scale_factor}
        else:
            horizontal = {"size": (y.shape[2], out_width)}
        return F.interpolate(y, mode=mode, **horizontal, **extra)

    return ResampleRule(in_height, src, linear, call)


# --------------------------------------------------------------------------------------------- pointwise tables


def _no_inplace(fn: Callable[..., Tensor], inplace_pos: int) -> Call:
    def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
        return fn(*args[:inplace_pos], **kwargs)

    return call


_ACTIVATION_FUNCTIONS: dict[Any, int] = {
    F.relu: 1, F.relu6: 1, F.silu: 1, F.hardswish: 1, F.hardsigmoid: 1, F.mish: 1, F.selu: 1, F.gelu: 99,
    F.elu: 2, F.celu: 2, F.leaky_relu: 2, F.hardtanh: 3, F.softplus: 99, F.sigmoid: 99, F.tanh: 99,
    torch.relu: 99, torch.sigmoid: 99, torch.tanh: 99, torch.abs: 99, torch.exp: 99, torch.neg: 99,
    torch.clamp: 99, torch.nn.functional.prelu: 99,
}
_INPLACE_TO_OUT = {torch.relu_: torch.relu, torch.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh}
_ELEMENTWISE_FUNCTIONS = {
    operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
    operator.truediv: operator.truediv, operator.iadd: operator.add, operator.isub: operator.sub,
    operator.imul: operator.mul, operator.itruediv: operator.truediv, operator.neg: operator.neg,
    torch.add: torch.add, torch.sub: torch.sub, torch.mul: torch.mul, torch.div: torch.div,
    torch.maximum: torch.maximum, torch.minimum: torch.minimum, torch.where: torch.where,
    operator.pow: operator.pow, operator.ipow: operator.pow, torch.pow: torch.pow, torch.true_divide: torch.div,
    torch.addcmul: torch.addcmul, torch.addcdiv: torch.addcdiv, torch.lerp: torch.lerp,  # ConvNeXt-V2's GRN
    torch.sqrt: torch.sqrt, torch.rsqrt: torch.rsqrt, torch.square: torch.square, torch.reciprocal: torch.reciprocal,
    torch.erf: torch.erf, torch.log: torch.log, torch.sign: torch.sign, torch.sin: torch.sin, torch.cos: torch.cos,
    torch.clamp_min: torch.clamp_min, torch.clamp_max: torch.clamp_max, torch.clip: torch.clip,
    normalize: normalize,  # GroupNorm / InstanceNorm after their statistics (see .norms)
}
_POINTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "add", "sub", "mul", "div", "neg", "clamp", "abs", "exp", "contiguous",
    "float", "double", "half", "bfloat16", "clone", "to", "type_as", "pow", "sqrt", "rsqrt", "square",
    "reciprocal", "erf", "log", "sign", "sin", "cos", "addcmul", "addcdiv", "lerp", "clamp_min", "clamp_max",
    "clip", "maximum", "minimum",
}


def _module_activation(m: nn.Module) -> Call | None:
    table: dict[type, Callable[[Tensor], Tensor]] = {
        nn.ReLU: F.relu, nn.ReLU6: F.relu6, nn.SiLU: F.silu, nn.Mish: F.mish, nn.Hardswish: F.hardswish,
        nn.Hardsigmoid: F.hardsigmoid, nn.Sigmoid: torch.sigmoid, nn.Tanh: torch.tanh, nn.SELU: F.selu,
        nn.Identity: lambda x: x,
    }
    fn = table.get(type(m))
    if fn is None:
        if isinstance(m, nn.LeakyReLU):
            fn = lambda x: F.leaky_relu(x, m.negative_slope)  # noqa: E731
        elif isinstance(m, nn.ELU):
            fn = lambda x: F.elu(x, m.alpha)  # noqa: E731
        elif isinstance(m, nn.CELU):
            fn = lambda x: F.celu(x, m.alpha)  # noqa: E731
        elif isinstance(m, nn.GELU):
            fn = lambda x: F.gelu(x, approximate=m.approximate)  # noqa: E731
        elif isinstance(m, nn.Hardtanh):
            fn = lambda x: F.hardtanh(x, m.min_val, m.max_val)  # noqa: E731
        elif isinstance(m, nn.Softplus):
            fn = lambda x: F.softplus(x, m.beta, m.threshold)  # noqa: E731
        elif isinstance(m, nn.PReLU):
            fn = m
        elif isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                            nn.FeatureAlphaDropout)) and (not m.training or m.p == 0):
            fn = lambda x: x  # noqa: E731  # the identity (train-mode dropout draws over the whole tensor: global)
        else:
            return None
    return lambda args, kwargs: fn(args[0])


def _batchnorm_rule(m: nn.modules.batchnorm._BatchNorm, in_height: int, policy: str) -> RowRule | None:
    if not m.track_running_stats or m.running_mean is None or m.running_var is None:
        return None  # always uses batch statistics: global
    if not m.training or policy == "freeze":
        return RowRule(in_height, lambda args, kwargs: F.batch_norm(
            args[0], m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps))
    if policy == "per_band":
        def per_band(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
            mean, var = m.running_mean, m.running_var
            if _RECOMPUTING.get():  # running statistics move once per band: a recompute updates throwaway copies
                mean, var = mean.clone(), var.clone()
            momentum = 0.1 if m.momentum is None else m.momentum
            return F.batch_norm(args[0], mean, var, m.weight, m.bias, True, momentum, m.eps)

        return RowRule(in_height, per_band)
    return None


# --------------------------------------------------------------------------------------------- dispatch


def _module_rule(m: nn.Module, node: fx.Node, in_value: Tensor, out_value: Tensor, policy: str,
                 dim: int) -> RowRule | None:
    in_height = in_value.shape[dim]
    if len(node.args) != 1 or node.kwargs:
        return None
    if type(m) is nn.LayerNorm and dim < in_value.dim() - len(m.normalized_shape):
        return RowRule(in_height, lambda args, kwargs: m(args[0]))  # over trailing axes the rows are not in
    if type(m) is nn.Linear and dim < in_value.dim() - 1:
        return RowRule(in_height, lambda args, kwargs: m(args[0]))
    if dim != 2:  # rows in another axis (channels-last): pointwise ops only
        call = _module_activation(m)
        return None if call is None else RowRule(in_height, call)
    if type(m) is nn.Conv2d:
        return _conv_module(m, in_height)
    if type(m) is nn.ConvTranspose2d and m.padding_mode == "zeros":
        return _conv_transpose_rule(in_height, m.kernel_size[0], m.stride, m.padding, m.output_padding, m.groups,
                                    m.dilation, lambda a, k: m.weight, lambda a, k: m.bias)
    if type(m) is nn.MaxPool2d and not m.return_indices:
        return _max_pool_rule(in_height, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    if type(m) is nn.AvgPool2d:
        return _avg_pool_rule(in_value, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                              m.divisor_override)
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.BatchNorm3d):
        return _batchnorm_rule(m, in_height, policy)
    if isinstance(m, nn.Upsample) and not getattr(m, "antialias", False):
        return _resample_rule(in_value, out_value, m.size, m.scale_factor, m.mode, m.align_corners,
                              m.recompute_scale_factor)
    if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
        left, right, top, bottom = m.padding
        return _pad_rule(in_height, (left, right, top, bottom), float(m.value))
    call = _module_activation(m)
    return None if call is None else RowRule(in_height, call)


def _pad_rule(in_height: int, pads: Sequence[int], value: float) -> RowRule | None:
    if len(pads) != 4:
        return None
    left, right, top, bottom = (int(p) for p in pads)

    def call(args: tuple[Any, ...], kwargs: dict[str, Any], pad_top: int, pad_bottom: int, out: RowInterval) -> Tensor:
        return F.pad(args[0], (left, right, pad_top, pad_bottom), value=value)

    return WindowRule(in_height, 1, 1, top, 1, call)


def _last_axes_function(node: fx.Node, in_value: Tensor, dim: int) -> RowRule | None:
    """``F.layer_norm`` / ``F.linear`` over trailing axes that do not hold the rows (channels-last blocks)."""
    in_height = in_value.shape[dim]
    if node.target is F.layer_norm:
        b = _bind_node(("input", "normalized_shape", "weight", "bias", "eps"), node)
        shape = b["normalized_shape"]
        axes = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
        return RowRule(in_height, lambda a, k: F.layer_norm(*a, **k)) if dim < in_value.dim() - axes else None
    return RowRule(in_height, lambda a, k: F.linear(*a, **k)) if dim < in_value.dim() - 1 else None


def _stochastic_depth_rule(node: fx.Node, in_height: int) -> RowRule | None:
    """torchvision's stochastic depth when it is the identity (eval mode or ``p == 0``); in training it draws
    one number per sample for the whole image, so it stays global."""
    b = _bind_node(("input", "p", "mode", "training"), node)
    return RowRule(in_height, lambda a, k: a[0]) if not b.get("training", True) or b.get("p") == 0 else None


def _axes_move_rule(node: fx.Node, in_height: int) -> RowRule | None:
    """``permute`` / ``transpose`` (method or function): rows map one to one, to another axis."""
    if node.op == "call_method":
        name = str(node.target)
        return RowRule(in_height, lambda a, k: getattr(a[0], name)(*a[1:], **k))
    fn = node.target
    return RowRule(in_height, lambda a, k: fn(*a, **k))  # type: ignore[operator]


def moved_row_dim(node: fx.Node, dim: int) -> int | None:
    """Where ``permute``/``transpose`` node puts input axis ``dim``; None when ``node`` is neither."""
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_method", "call_function") or name not in ("permute", "transpose", "swapaxes"):
        return None
    if node.op == "call_function" and node.target not in (torch.permute, torch.transpose, torch.swapaxes):
        return None
    args = [concrete(a) for a in node.args[1:]]
    if name == "permute":
        dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
        dims = [d % 4 for d in dims] if all(isinstance(d, int) for d in dims) else []
        return dims.index(dim) if sorted(dims) == [0, 1, 2, 3] else None
    if len(args) != 2 or not all(isinstance(d, int) for d in args):
        return None
    a, b = (d % 4 for d in args)
    return b if dim == a else a if dim == b else dim


def _function_rule(node: fx.Node, in_value: Tensor, out_value: Tensor, in_height: int | None = None) -> RowRule | None:
    fn, in_height = node.target, in_value.shape[2] if in_height is None else in_height
    if fn in (F.conv2d, torch.conv2d):
        return _conv_function(node, in_height)
    if fn in (F.conv_transpose2d, torch.conv_transpose2d):
        b = _bind_node(_CONVT_ARGS, node)
        weight = _val(b["weight"])
        if not is_4d(weight):
            return None
        return _conv_transpose_rule(
            in_height, weight.shape[2], b.get("stride", 1), b.get("padding", 0), b.get("output_padding", 0),
            b.get("groups", 1), b.get("dilation", 1), lambda a, k: _bind(_CONVT_ARGS, a, k)["weight"],
            lambda a, k: _bind(_CONVT_ARGS, a, k).get("bias"))
    if fn is F.max_pool2d:
        b = _bind_node(("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                       node)
        if b.get("return_indices"):
            return None
        return _max_pool_rule(in_height, b["kernel_size"], b.get("stride"), b.get("padding", 0),
                              b.get("dilation", 1), bool(b.get("ceil_mode", False)))
    if fn in (F.avg_pool2d, torch._C._nn.avg_pool2d):
        b = _bind_node(("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                        "divisor_override"), node)
        return _avg_pool_rule(in_value, b["kernel_size"], b.get("stride"), b.get("padding", 0),
                              bool(b.get("ceil_mode", False)), bool(b.get("count_include_pad", True)),
                              b.get("divisor_override"))
    if fn is F.interpolate:
        b = _bind_node(("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                        "antialias"), node)
        if b.get("antialias"):
            return None
        return _resample_rule(in_value, out_value, b.get("size"), b.get("scale_factor"), b.get("mode", "nearest"),
                              b.get("align_corners"), b.get("recompute_scale_factor"))
    if fn is F.pad:
        b = _bind_node(("input", "pad", "mode", "value"), node)
        if b.get("mode", "constant") != "constant" or not isinstance(b["pad"], (list, tuple)):
            return None
        return _pad_rule(in_height, b["pad"], float(b.get("value") or 0.0))
    if fn is F.batch_norm:
        b = _bind_node(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                       node)
        if b.get("training", False) or b["running_mean"] is None:
            return None
        return RowRule(in_height, lambda a, k: F.batch_norm(*a, **k))
    if fn in (F.dropout, F.dropout2d, F.alpha_dropout):
        b = _bind_node(("input", "p", "training", "inplace"), node)
        identity = not b.get("training", True) or b.get("p", 0.5) == 0
        return RowRule(in_height, lambda a, k: a[0]) if identity else None
    if fn is torch.cat:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return None if dim % 4 == row_dim(node) else RowRule(in_height, lambda a, k: torch.cat(*a, **k))
    if fn is operator.getitem:
        return _getitem_rule(node, in_height)
    if getattr(fn, "__name__", "") == "stochastic_depth" and getattr(fn, "__module__", "").startswith("torchvision"):
        return _stochastic_depth_rule(node, in_height)
    fn = _INPLACE_TO_OUT.get(fn, fn)  # type: ignore[arg-type]
    if fn in _ACTIVATION_FUNCTIONS:
        return RowRule(in_height, _no_inplace(fn, _ACTIVATION_FUNCTIONS[fn]))
    if fn in _ELEMENTWISE_FUNCTIONS:
        op = _ELEMENTWISE_FUNCTIONS[fn]
        return RowRule(in_height, lambda a, k: op(*a, **k))
    return None


def _getitem_rule(node: fx.Node, in_height: int) -> RowRule | None:
    index = node.args[1]
    if not isinstance(index, tuple):
        index = (index,)
    if any(not isinstance(i, slice) for i in index) or len(index) > 4:
        return None
    if len(index) > row_dim(node) and index[row_dim(node)] != slice(None):
        return None
    return RowRule(in_height, lambda a, k: a[0][a[1]])


def _method_rule(node: fx.Node, in_height: int) -> RowRule | None:
    name = str(node.target)
    name = name[:-1] if name.endswith("_") and not name.endswith("__") else name
    if name not in _POINTWISE_METHODS:
        return None
    return RowRule(in_height, lambda a, k: getattr(a[0], name)(*a[1:], **k))


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if isinstance(_val(n), Tensor)]


_WINDOW_FUNCTIONS = (F.conv2d, torch.conv2d, F.conv_transpose2d, torch.conv_transpose2d, F.max_pool2d, F.avg_pool2d,
                     torch._C._nn.avg_pool2d, F.interpolate, F.pad, F.batch_norm)


def image_reduction(node: fx.Node, root: nn.Module) -> tuple[str, tuple[int, int]] | None:
    """``("mean" | "norm", spatial axes)`` where ``node`` reduces a 4-D value over its two image axes (those
    of the rows and the columns: ``(2, 3)``, or ``(1, 2)`` in a channels-last block), else None: a
    squeeze-excitation squeeze (``x.mean((2, 3), keepdim=True)``, ECA's ``x.mean((2, 3))``,
    ``AdaptiveAvgPool2d(1)``) or ConvNeXt-V2's global response norm (``x.norm(p=2, dim=(1, 2), keepdim=True)``,
    ``torch.linalg.vector_norm``). Such a reduction can be accumulated band by band."""
    x: Any = node.args[0] if node.args else node.kwargs.get("input")
    value, source = node.meta.get("val"), _val(x) if isinstance(x, fx.Node) else None
    if not (isinstance(value, Tensor) and isinstance(source, Tensor) and source.dim() == 4 and row_dim(x) in (1, 2)
            and not node.kwargs.get("dtype")):
        return None
    axes = (1, 2) if row_dim(x) == 1 else (2, 3)
    kept = tuple(1 if a in axes else n for a, n in enumerate(source.shape))
    if tuple(value.shape) not in (kept, tuple(n for a, n in enumerate(source.shape) if a not in axes)):
        return None
    pooled = node.op == "call_module" and isinstance(root.get_submodule(str(node.target)), nn.AdaptiveAvgPool2d)
    if pooled or (node.op == "call_function" and node.target is F.adaptive_avg_pool2d):
        size = root.get_submodule(str(node.target)).output_size if pooled else (
            node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size"))
        return ("mean", axes) if axes == (2, 3) and size in (1, (1, 1), [1, 1]) else None
    method = node.op == "call_method"
    if (method and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean):
        kind, dims = "mean", node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    elif (method and node.target == "norm") or (node.op == "call_function" and node.target is torch.norm):
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", "fro")
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        kind = "norm" if p in (2, 2.0, "fro") else ""
    elif node.op == "call_function" and node.target is torch.linalg.vector_norm:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("ord", 2)
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        kind = "norm" if p in (2, 2.0) else ""
    else:
        return None
    dims = concrete(dims)  # the output's shape says keepdim
    if not kind or not isinstance(dims, (list, tuple)) or tuple(sorted(int(d) % 4 for d in dims)) != axes:
        return None
    return kind, axes


def rule_for(node: fx.Node, root: nn.Module, batchnorm: str) -> NodeRule | None:
    """The row rule of ``node`` (shapes in ``node.meta["val"]``, row axes in ``["row_dim"]``), or None when the
    node is global."""
    out_value = _val(node)
    if node.op not in ("call_module", "call_function", "call_method") or not is_4d(out_value):
        return None
    dim = row_dim(node)
    out_height = out_value.shape[dim]
    first = node.args[0] if node.args else node.kwargs.get("input")
    if node.op == "call_module" or node.target in (*_WINDOW_FUNCTIONS, F.layer_norm, F.linear):
        if not isinstance(first, fx.Node) or not is_4d(_val(first)) or row_dim(first) != dim:
            return None
        in_value = _val(first)
        if node.op == "call_module":
            module = root.get_submodule(str(node.target))
            if has_hooks(module):  # its hooks see the whole tensors, as in the plain model
                return None
            rule = _module_rule(module, node, in_value, out_value, batchnorm, dim)
        elif node.target in (F.layer_norm, F.linear):
            rule = _last_axes_function(node, in_value, dim)
        else:
            rule = _function_rule(node, in_value, out_value) if dim == 2 else None
        return None if rule is None else NodeRule(rule, frozenset([first]))
    moved = moved_row_dim(node, row_dim(first)) if isinstance(first, fx.Node) and is_4d(_val(first)) else None
    if moved is not None:
        if moved != dim:
            return None
        return NodeRule(_axes_move_rule(node, _val(first).shape[row_dim(first)]), frozenset([first]))
    # elementwise family: every 4-D input with the output's rows is row-indexed; the others must broadcast
    # along the rows (no axis aligned with the output's row axis, or one of size 1)
    rows = frozenset(n for n in _tensor_inputs(node)
                     if is_4d(_val(n)) and row_dim(n) == dim and _val(n).shape[dim] == out_height)
    if not rows:
        return None
    for n in _tensor_inputs(node):
        aligned = dim - (4 - _val(n).dim())
        if n not in rows and aligned >= 0 and _val(n).shape[aligned] != 1:
            return None
    if node.op == "call_method":
        rule = _method_rule(node, out_height)
    else:
        rule = _function_rule(node, next(iter(rows)).meta["val"], out_value, out_height)
    return None if rule is None else NodeRule(rule, rows)
