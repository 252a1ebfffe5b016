"""Runs a plan: global nodes on full tensors, segments band by band (2PS or OverL) with recomputation.

# NOTE [ Bands, checkpoints and boundary rows ]
# Every band is one call of ``_BandRunner`` under non-reentrant ``torch.utils.checkpoint``: forward keeps
# nothing of the band but its inputs, backward recomputes the band (RNG and autocast state restored) and
# autograd routes the gradients between bands and into the parameters (each accumulated once, as DDP needs).
# In 2PS the rows a band hands to the next one are *clones*: a view would keep the whole band alive.
# Under ``torch.no_grad()`` bands run directly, so inference keeps only one band alive at a time.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils.checkpoint import checkpoint

from .errors import refuse_double_backward
from .geometry import RowInterval
from .norms import batch_statistics, image_statistics, update_running_statistics, var_mean
from .plan import Band, Cuts, Plan, Segment, Streamed, gradient_cuts, handed_in_pieces, last_cut_readers
from .rules import image_reduction, is_4d, recomputing, row_dim
from .trace import fetch_attr

__all__ = ["run_plan", "Progress"]

log = logging.getLogger(__name__)


def _rows(t: Tensor, have: RowInterval, want: RowInterval, dim: int) -> Tensor:
    """Rows ``want`` (along axis ``dim``) of ``t``, a tensor that holds rows ``have``."""
    if want == have:
        return t
    return t.narrow(dim, want.start - have.start, len(want))


def _views(parts: Sequence[tuple[Tensor, RowInterval]], want: RowInterval, dim: int) -> list[Tensor]:
    """Views on the rows of ``want`` that each of ``parts`` (``(tensor, rows it holds)``, in row order) holds:
    always views, even of all of a part (handing a whole piece to a band as itself measured a 1% higher peak,
    ResNet-50 1024² b2 OverL 16: 300.4 against 297.4 MiB)."""
    views = []
    for t, have in parts:
        lo, hi = max(want.start, have.start), min(want.stop, have.stop)
        if lo < hi:
            views.append(t.narrow(dim, lo - have.start, hi - lo))
    return views


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    """Autocast as it stands now, per device type (backward runs outside the forward's autocast)."""
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices]


@contextlib.contextmanager
def _autocast(state: list[tuple[str, bool, torch.dtype]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for device, enabled, dtype in state:
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


class _GradSum:
    """The gradient of one segment input, summed in place as the bands' backward passes hand in their rows."""

    def __init__(self, shape: torch.Size, dim: int) -> None:
        self.shape, self.dim, self.total = shape, dim, None  # type: tuple[torch.Size, int, Tensor | None]

    def add(self, rows: RowInterval, grad: Tensor) -> None:
        if self.total is None:
            self.total = grad.new_zeros(self.shape)
        self.total.narrow(self.dim, rows.start, len(rows)).add_(grad)


class _Collect(torch.autograd.Function):
    """Identity on a segment input whose backward, run after every band's, hands on the summed gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, total: _GradSum) -> Tensor:  # type: ignore[override]
        ctx.total = total
        ctx.set_materialize_grads(False)  # the bands' rows send no gradient this way: no zero-filled input
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, _: None) -> tuple[Tensor | None, None]:  # type: ignore[override]
        refuse_double_backward()
        total, ctx.total.total = ctx.total.total, None
        return total, None


class _Rows(torch.autograd.Function):
    """Rows of a segment input read by one band, as a view; backward adds the band's gradient into the sum.

    Slicing with autograd instead would expand each band's gradient to a zero-filled tensor of the whole input
    (three input-sized tensors per band in backward); handing all bands' row gradients on at once would keep
    them all alive until the last band. Here only the sum and one band's rows live.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, rows: RowInterval, total: _GradSum) -> Tensor:  # type: ignore[override]
        ctx.rows, ctx.total = rows, total
        return x.narrow(total.dim, rows.start, len(rows))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None]:  # type: ignore[override]
        refuse_double_backward()
        ctx.total.add(ctx.rows, grad)
        return None, None, None


class _RowCache:
    """A value's rows as recomputations in backward make them, for later ones to read (``Streamed.reuse``)."""

    def __init__(self, shape: torch.Size, dim: int) -> None:
        self.shape, self.dim = shape, dim
        self.rows: Tensor | None = None
        self.have = bytearray(shape[dim])

    def put(self, rows: RowInterval, x: Tensor) -> None:
        if self.rows is None:
            self.rows = x.new_empty(self.shape)
        self.rows.narrow(self.dim, rows.start, len(rows)).copy_(x)
        self.have[rows.start : rows.stop] = b"\x01" * len(rows)

    def clear(self) -> None:
        """Forget every row (a later backward pass, under ``retain_graph=True``, puts them again)."""
        self.rows = None
        self.have = bytearray(self.shape[self.dim])

    def get(self, rows: RowInterval) -> Tensor | None:
        """Rows ``rows``, where every one of them was put."""
        if self.rows is None or not all(self.have[rows.start : rows.stop]):
            return None
        return self.rows.narrow(self.dim, rows.start, len(rows))


class _Pieces:
    """A segment output left as the pieces its bands made (see NOTE [ Values handed on in pieces ] in
    :mod:`lightning_lrcnn.plan`): ``parts`` are ``(tensor, rows it holds)``, in row order."""

    def __init__(self, parts: list[tuple[Tensor, RowInterval]], dim: int) -> None:
        self.parts, self.dim = parts, dim

    def rows(self, want: RowInterval) -> list[Tensor]:
        """Views of the pieces that hold rows ``want``, in row order (one empty view where ``want`` is empty)."""
        return _views(self.parts, want, self.dim) or [self.parts[0][0].narrow(self.dim, 0, 0)]


@dataclass
class _Cut:
    """The sum of a streamed statistics' input gradient that later recomputations add into (see NOTE [ Gradient
    cuts ] in :mod:`lightning_lrcnn.plan`), the statistics' token that orders their backward before the
    statistics' own, and the input itself where the plan keeps it (in forward, or as recomputed in backward)."""

    total: _GradSum
    token: Tensor
    kept: Tensor | None = None  # the input, whole, while later steps run forward (``Streamed.keep``)
    recomputed: _RowCache | None = None  # its rows as the first recomputation in backward made them

    def leaf(self) -> _Cut:
        """The same, with a detached token, for a backward pass run with ``torch.autograd.grad``."""
        return _Cut(self.total, self.token.detach().requires_grad_(), None, self.recomputed)


@dataclass
class _SegmentCuts:
    """What one segment (or prefix) does at the plan's cuts: the statistics' inputs whose gradient goes into
    their sums (``at``), the nodes computed without autograd (``frozen``: the prefixes of ``at``, by input in
    ``prefixes``), the values whose rows it puts into row caches in backward (``fill``), and in forward the kept
    inputs it reads instead of computing their prefixes (``kept``; in backward it reads the row caches of ``at``).
    ``hands_on``: its 2PS bands hand on rows of a prefix, which must then be computed."""

    at: dict[fx.Node, _Cut] = field(default_factory=dict)
    frozen: frozenset[fx.Node] = frozenset()
    prefixes: dict[fx.Node, frozenset[fx.Node]] = field(default_factory=dict)
    kept: dict[fx.Node, Tensor] = field(default_factory=dict)
    fill: dict[fx.Node, _RowCache] = field(default_factory=dict)
    hands_on: bool = False

    def leaves(self) -> _SegmentCuts:
        """For a backward pass run with ``torch.autograd.grad``: detached tokens, nothing kept from forward."""
        return _SegmentCuts({v: c.leaf() for v, c in self.at.items()}, self.frozen, self.prefixes, {}, self.fill,
                            self.hands_on)

    def readable(self, band: Band, backward: bool) -> dict[fx.Node, Tensor]:
        """The rows of cut inputs this band can read instead of computing them."""
        if self.hands_on:
            return {}
        if not backward:
            return {x: t.narrow(row_dim(x), band.rows[x].start, len(band.rows[x])) for x, t in self.kept.items()}
        got = {x: c.recomputed.get(band.rows[x]) for x, c in self.at.items() if c.recomputed is not None}
        return {x: t for x, t in got.items() if t is not None}

    def skipped(self, readable: dict[fx.Node, Tensor]) -> set[fx.Node]:
        """What the readable inputs are made of, and no other cut input needs."""
        computed = {v for x, p in self.prefixes.items() if x not in readable for v in p}
        return {v for x in readable for v in self.prefixes[x] if v is not x and v not in computed}


class _IntoCut(torch.autograd.Function):
    """Rows of a streamed statistics' input, computed without autograd; backward adds their gradient into the
    statistics' sum, and hands the token a zero so that the statistics' backward runs after this one."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, token: Tensor, rows: RowInterval, total: _GradSum) -> Tensor:  # type: ignore[override]
        ctx.rows, ctx.total = rows, total
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None, None]:  # type: ignore[override]
        refuse_double_backward()
        ctx.total.add(ctx.rows, grad)
        return None, grad.new_zeros(()), None, None


class _Anchors:
    """Per materialised value read in rows (by segments or streamed statistics): one :class:`_Collect` anchor and
    one gradient sum for all its readers, so its gradient exists once, from the backward of its last reader to
    that of its first, however many read it."""

    def __init__(self) -> None:
        self.made: dict[fx.Node, tuple[Tensor, _GradSum | None]] = {}

    def get(self, node: fx.Node, x: Tensor) -> tuple[Tensor, _GradSum | None]:
        if node not in self.made:
            if x.requires_grad and torch.is_grad_enabled():
                total = _GradSum(x.shape, row_dim(node))
                self.made[node] = (_Collect.apply(x, total), total)
            else:
                self.made[node] = (x, None)
        return self.made[node]

    def free(self, node: fx.Node) -> None:
        """``node`` is freed: no later reader gets its anchor."""
        self.made.pop(node, None)


def _band_inputs(segment: Segment, env: dict[fx.Node, Any], anchors: _Anchors) -> Iterator[list[list[Tensor]]]:
    """Per band, lazily, the rows ``band.inputs`` of the segment's outside row inputs (see :class:`_Rows`), each
    as one or more views, in row order (several where a value is handed on in pieces).

    Each band's rows are sliced just before the band runs: autograd runs the newest nodes first, so the
    band's :class:`_Rows` backward then runs right after the band's own, not after every band's.
    """

    def rows(node: fx.Node, r: RowInterval) -> list[Tensor]:
        x = env[node]
        if isinstance(x, _Pieces):
            return x.rows(r)
        x, total = anchors.get(node, x)
        return [x.narrow(row_dim(node), r.start, len(r)) if total is None else _Rows.apply(x, r, total)]

    for band in segment.bands:
        yield [rows(node, r) for node, r in band.inputs]


class Progress:
    """INFO log lines for a long step: which band of which segment runs, forward or backward (recomputation),
    and the time since the step began. Silent for the first ``AFTER`` seconds, then at most one line every
    ``EVERY`` seconds, so short steps say nothing."""

    AFTER = 10.0
    EVERY = 10.0

    def __init__(self, segments: int) -> None:
        self.segments = segments
        self.start = self.last = time.monotonic()

    def band(self, phase: str, segment: int, name: str, band: int, bands: int) -> None:
        now = time.monotonic()
        if now - self.start < self.AFTER or now - self.last < self.EVERY:
            return
        self.last = now
        log.info("row-centric step, %s: segment %d/%d (%s), band %d/%d, %.0f s elapsed", phase, segment + 1,
                 self.segments, name, band + 1, bands, now - self.start)


class _BandRunner:
    """Computes one band of a segment: ``(*carry_in, *input_rows) -> (*output_rows, *carry_out)``."""

    def __init__(self, segment: Segment, band: Band, env: dict[fx.Node, Any], static: dict[fx.Node, Any],
                 root: nn.Module, where: tuple[Progress, int, int]) -> None:
        self.segment, self.band, self.env, self.static, self.root = segment, band, env, static, root
        self.where = where  # (progress, segment index, band index)
        self.calls = 0
        self.cuts = _SegmentCuts()
        self.pieces: list[int] | None = None  # per row input, how many views it comes in (None: one each)

    def __call__(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        progress, index, band = self.where
        progress.band("forward" if self.calls == 0 else "backward", index, self.segment.name, band,
                      len(self.segment.bands))
        with recomputing(self.calls > 0):
            self.calls += 1
            return self._run(tensors)

    def _run(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        band, seg = self.band, self.segment
        # per node: pieces (tensor, rows it holds), oldest first: the incoming boundary rows, then new rows;
        # the segment's outside row inputs: the rows this band reads
        held: dict[fx.Node, list[tuple[Tensor, RowInterval]]] = {}
        for (node, rows), t in zip(band.carry_in, tensors, strict=False):
            held[node] = [(t, rows)]
        counts = self.pieces if self.pieces is not None else [1] * len(band.inputs)
        rest = iter(tensors[len(band.carry_in):])
        for (node, rows), count in zip(band.inputs, counts, strict=True):
            views = [next(rest) for _ in range(count)]
            # rows of a value in pieces: joined once here (its readers would each split at the seams)
            held[node] = [(views[0] if count == 1 else torch.cat(views, dim=row_dim(node)), rows)]
        assert next(rest, None) is None, "internal: more band inputs than the band reads"

        def value(v: fx.Node, want: RowInterval | None) -> Any:
            if v in self.static:
                return self.static[v]
            if want is not None and want.empty:  # rows made of padding only read no rows of ``v``
                return self._no_rows(v, held, tensors)
            if v not in held:  # outside the segment: a whole (broadcast) input, or a full tensor
                x = self.env[v]
                return x if want is None else _rows(x, RowInterval(0, x.shape[row_dim(v)]), want, row_dim(v))
            if want is None:  # an outside row input also read whole
                return self.env[v]
            dim = row_dim(v)
            for t, have in reversed(held[v]):
                if have.contains(want):
                    return _rows(t, have, want, dim)
            return torch.cat(_views(held[v], want, dim), dim=dim)

        def compute(node: fx.Node, out: RowInterval) -> Tensor:
            node_rule = seg.rules[node]
            need = node_rule.rule.needed(out)
            args = fx.node.map_arg(node.args, lambda v: value(v, need if v in node_rule.row_inputs else None))
            kwargs = fx.node.map_arg(node.kwargs, lambda v: value(v, need if v in node_rule.row_inputs else None))
            return node_rule.rule.run(args, kwargs, out)

        def fresh(t: Tensor) -> Tensor:
            return t.clone() if t._base is not None else t  # a view would keep the whole band alive

        outputs: list[Tensor] = []
        wanted = dict(band.outputs)
        handed = dict(band.carry_out)
        # a node with no new rows in this band passes (part of) its incoming boundary rows straight on
        carries = {node: fresh(value(node, rows)) for node, rows in band.carry_out if band.rows[node].empty}
        cuts = self.cuts
        backward = self.calls > 1  # a recomputation
        readable = cuts.readable(band, backward)
        skip = cuts.skipped(readable)
        for node in seg.nodes:
            out = band.rows[node]
            if out.empty or node in skip:
                continue
            if node in readable:
                result = readable[node]
            else:
                split = self._split(node, out, held)
                with torch.no_grad() if node in cuts.frozen else contextlib.nullcontext():
                    if out.start < split < out.stop:  # only the first rows read the boundary rows: join just those
                        result = torch.cat([compute(node, RowInterval(out.start, split)),
                                            compute(node, RowInterval(split, out.stop))], dim=row_dim(node))
                    else:
                        result = compute(node, out)
                if backward and node in cuts.fill:
                    cuts.fill[node].put(out, result)
            cut = cuts.at.get(node)
            if cut is not None and torch.is_grad_enabled():  # ``_cuts`` holds only tokens that require grad
                result = _IntoCut.apply(result, cut.token, out, cut.total)
            held.setdefault(node, []).append((result, out))
            if node in wanted:
                outputs.append(fresh(value(node, wanted[node])))
            if node in handed:
                carries[node] = fresh(value(node, handed[node]))
            for done in band.release.get(node, ()):
                held.pop(done, None)
        return (*outputs, *(carries[node] for node, _ in band.carry_out))

    def _no_rows(self, v: fx.Node, held: dict[fx.Node, list[tuple[Tensor, RowInterval]]],
                 tensors: Sequence[Tensor]) -> Tensor:
        """``v`` with zero rows (a band may compute padding rows of a node whose input it has no rows of)."""
        dim = row_dim(v)
        if v in held:
            return held[v][-1][0].narrow(dim, 0, 0)
        if v in self.env:
            return self.env[v].narrow(dim, 0, 0)
        meta = v.meta["val"]
        device = tensors[0].device if tensors else None
        return torch.zeros((*meta.shape[:dim], 0, *meta.shape[dim + 1 :]), dtype=meta.dtype, device=device)

    def _split(self, node: fx.Node, out: RowInterval, held: dict[fx.Node, list[tuple[Tensor, RowInterval]]]) -> int:
        """First output row from which every row input is read from its newest piece alone (no copy)."""
        node_rule = self.segment.rules[node]
        starts = [held[v][-1][1].start for v in node_rule.row_inputs if len(held.get(v, ())) > 1]
        if not starts:
            return out.start
        limit, lo, hi = max(starts), out.start, out.stop
        while lo < hi:
            mid = (lo + hi) // 2
            if node_rule.rule.needed(RowInterval(mid, out.stop)).start >= limit:
                hi = mid
            else:
                lo = mid + 1
        return lo


def _run_segment(segment: Segment, env: dict[fx.Node, Any], static: dict[fx.Node, Any], root: nn.Module,
                 progress: Progress, index: int, anchors: _Anchors, cuts: _SegmentCuts | None = None,
                 in_pieces: frozenset[fx.Node] = frozenset()) -> None:
    cuts = cuts or _SegmentCuts()
    inside = set(segment.nodes)
    # the values read from outside, captured now: recomputation in backward runs after env has moved on
    outside = {v: env[v] for node in segment.nodes for v in node.all_input_nodes if v not in inside and v in env}
    # values in pieces are read in rows only, handed to each band: the runners must not hold every piece
    whole = {v: t for v, t in outside.items() if not isinstance(t, _Pieces)}
    pieces: dict[fx.Node, list[tuple[Tensor, RowInterval]]] = {o: [] for o in segment.outputs}
    carries: tuple[Tensor, ...] = ()
    grad = torch.is_grad_enabled()
    for i, (band, inputs) in enumerate(zip(segment.bands, _band_inputs(segment, outside, anchors), strict=True)):
        runner = _BandRunner(segment, band, whole, static, root, (progress, index, i))
        runner.cuts = cuts
        runner.pieces = [len(views) for views in inputs]
        flat = [t for views in inputs for t in views]
        if grad and segment.recompute:
            result = checkpoint(runner, *carries, *flat, use_reentrant=False)
        else:
            result = runner(*carries, *flat)
        n_out = len(band.outputs)
        for (node, rows), t in zip(band.outputs, result[:n_out], strict=True):
            pieces[node].append((t, rows))
        carries = tuple(result[n_out:])
    cuts.kept.clear()  # the runners outlive forward (checkpoint recomputes with them): they must not keep it
    for node, parts in pieces.items():
        if node in in_pieces and len(parts) > 1:
            env[node] = _Pieces(parts, row_dim(node))
        else:
            env[node] = parts[0][0] if len(parts) == 1 else torch.cat([t for t, _ in parts], dim=row_dim(node))


class _StreamedStatistics(torch.autograd.Function):
    """Train-mode BatchNorm statistics of ``run.prefix``'s output, accumulated band by band (see
    :class:`~lightning_lrcnn.plan.Streamed`); ``tensors`` are what the prefix reads, so autograd hands their
    gradients back. Backward recomputes each band with autograd on and backpropagates that band's share of the
    statistics' gradient, one band at a time."""

    @staticmethod
    def forward(ctx: Any, run: _PrefixRun, *tensors: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        count, mean, var = run.statistics()
        run.update_running(count, mean, var)
        rstd = torch.rsqrt(var + run.eps)
        ctx.run, ctx.count = run, count
        ctx.save_for_backward(mean, rstd, *run.release())
        shape = (1, -1, 1, 1)
        return mean.reshape(shape), rstd.reshape(shape), mean.new_zeros(())  # the token of its cut

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor | None, grad_rstd: Tensor | None, _: Any) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        refuse_double_backward()
        mean, rstd, *released = ctx.saved_tensors
        shape = (1, -1, 1, 1)
        g_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean.reshape(-1)
        g_var = torch.zeros_like(rstd) if grad_rstd is None else grad_rstd.reshape(-1) * -0.5 * rstd**3
        slope, offset = (2 * g_var / ctx.count).reshape(shape), (g_mean / ctx.count).reshape(shape)

        def grad_of(x: Tensor) -> Tensor:  # d statistics / d x: (g_mean + 2 (x - mean) g_var) / count, in place
            return (x.detach() - mean.reshape(shape)).mul_(slope).add_(offset)

        return (None, *ctx.run.backward(grad_of, released))


class _PrefixRun:
    """What streamed statistics need of their prefix: its bands, what it reads, the BatchNorm's buffers, the
    cuts of earlier statistics it stops its backward at and its own (the sum later recomputations add into)."""

    def __init__(self, step: Streamed, env: dict[fx.Node, Any], static: dict[fx.Node, Any], root: nn.Module,
                 progress: Progress, index: int, anchors: _Anchors, cuts: _SegmentCuts | None = None) -> None:
        self.prefix, self.static, self.root, self.where = step.prefix, static, root, (progress, index)
        self.cuts = cuts or _SegmentCuts()
        x = step.prefix.outputs[0]
        self.into = _GradSum(x.meta["val"].shape, row_dim(x))  # its input's gradient from later recomputations
        self.kept: Tensor | None = None  # its input, whole, made by the statistics' pass (``step.keep``)
        self.keep = step.keep and torch.is_grad_enabled()  # its readers read it only where they stop at its cut
        self.autocast = _autocast_state()  # backward recomputes the prefix as forward ran it
        self.recomputed = _RowCache(x.meta["val"].shape, row_dim(x)) if step.reuse else None
        inside = set(self.prefix.nodes)
        self.outside = {v: env[v] for node in self.prefix.nodes for v in node.all_input_nodes
                        if v not in inside and v in env}
        self.tensor_nodes = [v for v, t in self.outside.items() if isinstance(t, Tensor)]
        # the gradients of the rows it reads go into the values' shared sums (read whole: through autograd)
        row_nodes = {v: None for band in self.prefix.bands for v, _ in band.inputs}
        got = {v: anchors.get(v, self.outside[v]) for v in row_nodes}
        self.anchors = [a for a, total in got.values() if total is not None]
        self.sums = {v: total for v, (_, total) in got.items() if total is not None}
        modules = [root.get_submodule(str(v.target)) for v in self.prefix.nodes if v.op == "call_module"]
        self.params = list({id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values())

        def load(v: Any) -> Any:
            return static[v] if v in static else env[v]

        if step.batch_norm:
            args: Any = fx.node.map_arg(step.stats.args[1:], load)
            self.running_mean, self.running_var, self.tracked, self.momentum, self.eps = args

    def inputs(self) -> list[Tensor]:
        """What autograd must route gradients to: the values read whole, the parameters, the row anchors."""
        return [*(self.outside[v] for v in self.tensor_nodes), *self.params, *self.anchors,
                *(c.token for c in self.cuts.at.values())]

    def band(self, i: int, env: dict[fx.Node, Any], grad: bool,
             cuts: _SegmentCuts | None = None) -> tuple[Tensor, list[Tensor]]:
        """Band ``i`` of the prefix output, and the input rows it read (leaves when ``grad``), stopping
        autograd at ``cuts`` (forward: reading their kept inputs)."""
        band = self.prefix.bands[i]
        rows = [env[v].narrow(row_dim(v), r.start, len(r)) for v, r in band.inputs]
        if grad:
            rows = [r.detach().requires_grad_(r.requires_grad) for r in rows]
        progress, index = self.where
        runner = _BandRunner(self.prefix, band, env, self.static, self.root, (progress, index, i))
        runner.calls = 1 if grad else 0  # shown as backward in the progress lines
        runner.cuts = cuts or self.cuts
        x = runner(*rows)[0]
        if not grad and self.keep:
            out = self.prefix.outputs[0]
            if self.kept is None:
                self.kept = x.new_empty(out.meta["val"].shape)
            have = dict(band.outputs)[out]
            self.kept.narrow(row_dim(out), have.start, len(have)).copy_(x)
        return x, rows

    def release(self) -> list[Tensor]:
        """The tensors the prefix reads, handed to autograd at the end of forward (``ctx.save_for_backward``):
        the run lives as long as the graph, and autograd frees what it saved after a backward pass, or keeps it
        for the next one under ``retain_graph=True``. The run holds none of them afterwards."""
        tensors = [self.outside[v] for v in self.tensor_nodes]
        self.outside = {v: t for v, t in self.outside.items() if not isinstance(t, Tensor)}
        self.anchors = []
        return tensors

    def statistics(self) -> tuple[int, Tensor, Tensor]:
        """Count, mean and biased variance per channel, merged band by band (Chan et al.'s pairwise update)."""
        count, mean, m2 = 0, None, None  # type: tuple[int, Any, Any]
        with torch.no_grad():
            for i in range(len(self.prefix.bands)):
                x, _ = self.band(i, self.outside, grad=False)
                n = x.numel() // x.shape[1]
                if n == 0:
                    continue
                var_b, mean_b = (t.double().reshape(-1) for t in var_mean(x, (0, 2, 3)))
                if mean is None:
                    count, mean, m2 = n, mean_b, var_b * n
                    continue
                delta = mean_b - mean
                mean = mean + delta * (n / (count + n))
                m2 = m2 + var_b * n + delta**2 * (count * n / (count + n))
                count += n
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        return count, mean.to(dtype), (m2 / count).to(dtype)

    def update_running(self, count: int, mean: Tensor, var: Tensor) -> None:
        """Running statistics as ``nn.BatchNorm2d`` moves them (see :func:`lightning_lrcnn.norms.batch_statistics`)."""
        update_running_statistics(self.running_mean, self.running_var, self.tracked, self.momentum, mean, var, count)

    def backward(self, grad_of: Any, released: Sequence[Tensor]) -> list[Tensor | None]:
        """Gradients of :meth:`inputs` for the statistics' gradient ``grad_of(x)`` of the prefix output ``x``
        (the rows' gradients are added to the values' shared sums; their anchors get None); ``released``: what
        :meth:`release` handed to autograd."""
        outside = {**self.outside, **dict(zip(self.tensor_nodes, released, strict=True))}
        with torch.enable_grad(), _autocast(self.autocast):
            leaves = {v: t.detach().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t
                      for v, t in outside.items()}
            if self.recomputed is not None:  # read by later statistics' backward only, which ran before this one
                self.recomputed.clear()
            cuts = self.cuts.leaves()
            tokens = [c.token for c in cuts.at.values()]
            whole: list[Any] = [None] * (len(self.tensor_nodes) + len(self.params))
            out = self.prefix.outputs[0]
            for i, band in enumerate(self.prefix.bands):
                x, rows = self.band(i, leaves, grad=True, cuts=cuts)
                wanted = [*rows, *(leaves[v] for v in self.tensor_nodes), *self.params]
                needs = [t for t in wanted if t.requires_grad]
                if not needs and not tokens:
                    continue
                g = grad_of(x)
                if self.into.total is not None:  # what later recomputations sent to these rows
                    r = dict(band.outputs)[out]
                    g = g + self.into.total.narrow(self.into.dim, r.start, len(r))
                got = iter(torch.autograd.grad(x, [*needs, *tokens], g, allow_unused=True))
                grads = [next(got) if t.requires_grad else None for t in wanted]
                row_grads, rest = grads[: len(rows)], grads[len(rows):]
                for (v, r), g in zip(band.inputs, row_grads, strict=True):
                    if g is not None and v in self.sums:
                        self.sums[v].add(r, g)
                for k, g in enumerate(rest):
                    if g is not None:
                        whole[k] = g if whole[k] is None else whole[k].add_(g)
                del x, rows, got, grads, row_grads, rest, g  # nothing of this band lives into the next
        self.into.total = None
        return [*whole, *(None for _ in self.sums), *(torch.zeros_like(c.token) for c in self.cuts.at.values())]


class _StreamedReduction(torch.autograd.Function):
    """The mean or L2 norm over the image axes of ``run.prefix``'s output (kept as size-1 axes), summed band by
    band in float64; backward hands each recomputed band its share of the gradient (the mean's: a view, nothing
    of the output's size is made; the norm's: the band times the gradient over the norm)."""

    @staticmethod
    def forward(ctx: Any, run: _PrefixRun, kind: str, axes: tuple[int, int],  # type: ignore[override]
                *tensors: Tensor) -> tuple[Tensor, Tensor]:
        total: Any = None
        count, dtype = 0, torch.float32
        with torch.no_grad():
            for i in range(len(run.prefix.bands)):
                x, _ = run.band(i, run.outside, grad=False)
                part = (x if kind == "mean" else x.square()).sum(axes, keepdim=True, dtype=torch.float64)
                total = part if total is None else total + part
                count, dtype = count + x.shape[axes[0]] * x.shape[axes[1]], x.dtype
        value = (total / count if kind == "mean" else total.sqrt()).to(dtype)
        ctx.run, ctx.count, ctx.kind = run, count, kind
        ctx.save_for_backward(value, *run.release())
        return value, value.new_zeros(())  # the token of its cut

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Any) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        refuse_double_backward()
        value, *released = ctx.saved_tensors
        if ctx.kind == "mean":
            share = grad / ctx.count
            return (None, None, None, *ctx.run.backward(lambda x: share.expand_as(x), released))
        scale = torch.where(value == 0, torch.zeros_like(grad), grad / value)  # as torch's norm backward at 0
        return (None, None, None, *ctx.run.backward(lambda x: x.detach() * scale, released))


def _run_streamed(step: Streamed, env: dict[fx.Node, Any], static: dict[fx.Node, Any], root: nn.Module,
                  progress: Progress, index: int, anchors: _Anchors, cuts: _SegmentCuts) -> _Cut:
    """Run ``step``; returns its cut (the sum and token later recomputations stop their backward at, and its
    input when kept)."""
    run = _PrefixRun(step, env, static, root, progress, index, anchors, cuts)
    if not step.batch_norm:
        reduction = image_reduction(step.stats, root)
        assert reduction is not None, step.stats.format_node()
        value, token = _StreamedReduction.apply(run, *reduction, *run.inputs())
        env[step.stats] = value.reshape(step.stats.meta["val"].shape)  # without keepdim: the axes dropped
    else:
        mean, rstd, token = _StreamedStatistics.apply(run, *run.inputs())
        env[step.outputs[0]], env[step.outputs[1]] = (mean, rstd) if step.outputs[0].args[1] == 0 else (rstd, mean)
    cuts.kept.clear()
    kept, run.kept = run.kept, None  # the run lives on in the graph: what it kept must not
    return _Cut(run.into, token, kept, run.recomputed)


def _cuts(segment: Segment, plan_cuts: dict[int, Cuts], made: dict[fx.Node, _Cut]) -> _SegmentCuts:
    """The cuts ``segment`` stops its backward at (``made``: by statistics' input): all of the plan's, or none
    where a statistics needs no gradient (or none is being recorded); the kept inputs it reads in forward; the
    row caches it fills."""
    cuts = plan_cuts.get(id(segment))
    if cuts is None or not torch.is_grad_enabled():
        return _SegmentCuts()
    prefixes = {s.prefix.outputs[0]: frozenset(s.prefix.nodes) & cuts.frozen for s in cuts.at}
    got = {x: made[x] for x in prefixes if x in made and made[x].token.requires_grad}
    if len(got) < len(prefixes):
        return _SegmentCuts()
    kept = {x: c.kept for x, c in got.items() if c.kept is not None}
    fill = {x: c.recomputed for x, c in made.items() if x in cuts.frozen and c.recomputed is not None}
    hands_on = any(v in cuts.frozen and v not in prefixes for band in segment.bands for v, _ in band.carry_out)
    return _SegmentCuts(got, cuts.frozen, prefixes, kept, fill, hands_on)


def _run_statistics(node: fx.Node, env: dict[fx.Node, Any], static: dict[fx.Node, Any], root: nn.Module,
                    anchors: _Anchors) -> Any:
    """Statistics kept global (BatchNorm's, or GroupNorm's and InstanceNorm's per image) of a value that bands
    also read: their backward adds into the value's one gradient sum, a slice of rows at a time, rather than
    making a second gradient of its size."""
    x = node.args[0]
    if not (isinstance(x, fx.Node) and is_4d(x.meta.get("val")) and row_dim(x) == 2 and not node.kwargs):
        return _run_node(node, env, static, root)
    anchored, total = anchors.get(x, env[x])
    args = fx.node.map_arg(node.args[1:], lambda v: static[v] if v in static else env[v])
    return node.target(anchored, *args, into=total)  # type: ignore[operator]


def _run_node(node: fx.Node, env: dict[fx.Node, Any], static: dict[fx.Node, Any], root: nn.Module) -> Any:
    def load(v: fx.Node) -> Any:
        return static[v] if v in static else env[v]

    args = fx.node.map_arg(node.args, load)
    kwargs = fx.node.map_arg(node.kwargs, load)
    if node.op == "call_module":
        return root.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    if node.op == "output":
        return _mutable(args[0])
    raise RuntimeError(f"internal: unexpected node {node.format_node()}")


def _mutable(value: Any) -> Any:
    """The graph's output with fx's immutable dicts and lists as plain ones (a traced GraphModule returns those):
    a caller may add to the result (torchvision's segmentation models return a dict of heads)."""
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    return value


def run_plan(plan: Plan, root: nn.Module, inputs: Sequence[Any]) -> Any:
    """Execute ``plan`` on ``inputs`` (one value per placeholder) with ``root``'s parameters and submodules."""
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in plan.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, inputs, strict=True):
        env[node] = value
    for node in plan.graph.nodes:
        if node.op == "get_attr":
            env[node] = fetch_attr(root, str(node.target))
    result = None
    banded = [s for s in plan.steps if isinstance(s, (Segment, Streamed))]
    progress = Progress(len(banded))
    index = {id(s): i for i, s in enumerate(banded)}
    anchors = _Anchors()
    plan_cuts = gradient_cuts(plan)
    in_pieces = handed_in_pieces(plan, plan_cuts)
    made: dict[fx.Node, _Cut] = {}  # by the streamed statistics' input
    last_reader = last_cut_readers(plan.steps, plan_cuts)
    kept_until: dict[int, list[fx.Node]] = {}  # step index -> statistics' inputs kept until after it
    for i, step in enumerate(plan.steps):
        if isinstance(step, Streamed) and step.keep:
            kept_until.setdefault(last_reader.get(id(step), i), []).append(step.prefix.outputs[0])
    for i, (step, frees) in enumerate(zip(plan.steps, plan.free_after, strict=True)):
        if isinstance(step, Segment):
            _run_segment(step, env, plan.static, root, progress, index[id(step)], anchors,
                         _cuts(step, plan_cuts, made), in_pieces)
        elif isinstance(step, Streamed):
            made[step.prefix.outputs[0]] = _run_streamed(step, env, plan.static, root, progress, index[id(step)],
                                                         anchors, _cuts(step.prefix, plan_cuts, made))
        elif step.op == "output":
            result = _run_node(step, env, plan.static, root)
        elif step.target in (batch_statistics, image_statistics):
            env[step] = _run_statistics(step, env, plan.static, root, anchors)
        else:
            env[step] = _run_node(step, env, plan.static, root)
        for n in frees:
            env.pop(n, None)
            anchors.free(n)
        for x in kept_until.get(i, ()):  # kept inputs die after their last reader's forward
            if x in made:
                made[x].kept = None
    return result
