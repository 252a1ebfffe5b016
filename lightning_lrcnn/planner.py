"""Graph -> plan: static nodes, regions of row-local nodes, segments, band cuts and per-band row intervals.

Data flows trace -> plan -> execute. A plan (:mod:`lightning_lrcnn.plan`) is a list of steps: a global node
(runs as usual on full tensors) or a :class:`Segment` (runs band by band). Everything here is plain Python over
``node.meta["val"]`` shapes; where to cut a region into segments is decided with the analytic estimate.
"""

from __future__ import annotations

import contextvars
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .errors import PlanError
from .estimate import peak_bytes, segments_peak
from .estimate import segment_peaks as estimate_segment_peaks
from .geometry import RowInterval
from .mutation import make_writes_explicit, written_input
from .norms import batch_statistics
from .plan import (
    Band,
    Plan,
    Segment,
    Step,
    Streamed,
    frozen_nodes,
    gradient_cuts,
    row_bytes,
    step_outputs,
    step_reads,
    step_segment,
)
from .rules import NodeRule, concrete, image_reduction, is_4d, moved_row_dim, row_dim, rule_for
from .trace import fetch_attr

__all__ = ["MODES", "band_count", "build_plan", "plain_plan"]

MODES = ("2ps", "overl")
# OverL: split a segment while its halos recompute more than this fraction of its activations.
MAX_OVERLAP = 0.35
# recomputed tails (see _recompute_tails) may add at most this fraction to a training step's work (train-mode
# ResNet-50, 1024², OverL 16: 0.10 measured 0.260 of the plain peak at 1.98x its step, 0.15 0.240 at 2.21x)
MAX_TAIL_WORK = 0.15
# relieving the segment at the estimated peak (more bands or a cut): at most this many times, each lowering it this much
_MAX_REFINEMENTS = 16
_MIN_GAIN = 0.01
# a segment kept for backward may raise other steps' estimated peaks to at most this far below the plan's
_KEEP_MARGIN = 0.1

_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "get_device"}


# --------------------------------------------------------------------------------------------- classification


def _has_tensor(value: Any) -> bool:
    found = False

    def visit(v: Any) -> Any:
        nonlocal found
        found = found or isinstance(v, Tensor)
        return v

    fx.node.map_aggregate(value, visit)
    return found


def _static_nodes(graph: fx.Graph) -> dict[fx.Node, Any]:
    """Nodes whose value depends only on shapes (``x.shape[-2:]``, ``x.size(2)``...): constants per plan."""
    static: dict[fx.Node, Any] = {}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method") or "val" not in node.meta or _has_tensor(node.meta["val"]):
            continue
        shape_query = (node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRS) or (
            node.op == "call_method" and node.target in _SHAPE_METHODS)
        if shape_query or all(n in static for n in node.all_input_nodes):
            static[node] = concrete(node.meta["val"])
    return static


_BROADCASTING = {operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add, torch.sub,
                 torch.div}


def _drop_broadcast_expands(graph: fx.Graph) -> None:
    """``x * g.expand_as(x)`` -> ``x * g`` (timm's ECA gate): the expand reads ``x`` for its shape only, yet as
    a graph node it would be a global reader of ``x``, ending the region there and keeping the gate's mean from
    being streamed. Only where every reader is a broadcasting arithmetic op whose other operand and result
    have the expanded shape, so broadcasting makes the same values and gradients."""
    for node in list(graph.nodes):
        if node.op != "call_method" or node.target not in ("expand_as", "expand") or not node.args:
            continue
        source = node.args[0]
        if isinstance(source, fx.Node) and node.users and all(_broadcasts(u, node) for u in node.users):
            node.replace_all_uses_with(source)
            graph.erase_node(node)


def _broadcasts(user: fx.Node, expanded: fx.Node) -> bool:
    """Whether ``user`` is arithmetic on ``expanded`` and an operand of the same shape, with that shape."""
    if not (user.op == "call_function" and user.target in _BROADCASTING and len(user.args) == 2 and not user.kwargs):
        return False
    other = user.args[1] if user.args[0] is expanded else user.args[0]
    shapes = [v.meta.get("val") if isinstance(v, fx.Node) else None for v in (expanded, other, user)]
    return other is not expanded and all(isinstance(t, Tensor) for t in shapes) and (
        shapes[0].shape == shapes[1].shape == shapes[2].shape)  # type: ignore[union-attr]


_SPLIT_FUNCTIONS = {torch.split, torch.functional.split, torch.chunk, torch.tensor_split}
_SPLIT_METHODS = {"split", "chunk", "tensor_split", "split_with_sizes"}


def _channel_splits_as_slices(graph: fx.Graph) -> bool:
    """``a, b = x.split(k, dim=C)`` -> ``a = x[:, :k]``, ``b = x[:, k:]`` along the channel axis (1 in NCHW, 3
    in a channels-last block): a split's tuple is not a 4-D value, so it ran whole, ending the region there
    (timm's CSP stages, MambaOut's gated convolution, Res2Net); a channel slice is row-local. Channel sizes do
    not depend on the image size, so the rewritten graph holds for every input shape. Returns whether any was."""
    rewritten = False
    for node in list(graph.nodes):
        if not ((node.op == "call_function" and node.target in _SPLIT_FUNCTIONS)
                or (node.op == "call_method" and node.target in _SPLIT_METHODS)) or not node.args:
            continue
        x, parts = node.args[0], node.meta.get("val")
        if not (isinstance(x, fx.Node) and is_4d(x.meta.get("val")) and isinstance(parts, (tuple, list)) and parts
                and all(isinstance(p, Tensor) and p.dim() == 4 for p in parts)
                and all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                        for u in node.users)):
            continue
        shape = x.meta["val"].shape
        dims = {a for p in parts for a in range(4) if p.shape[a] != shape[a]}
        channel = {2: 1, 1: 3}.get(row_dim(x), -1)
        if dims != {channel} or sum(p.shape[channel] for p in parts) != shape[channel]:
            continue
        starts = [sum(p.shape[channel] for p in parts[:i]) for i in range(len(parts))]
        for user in list(node.users):
            i = int(user.args[1]) % len(parts)  # type: ignore[call-overload]
            index = (*(slice(None),) * channel, slice(starts[i], starts[i] + parts[i].shape[channel]))
            user.args = (x, index)
        graph.erase_node(node)
        rewritten = True
    return rewritten


def _weight_only_nodes(graph: fx.Graph, root: nn.Module, static: dict[fx.Node, Any]) -> set[fx.Node]:
    """Tensors computed from parameters, buffers and constants alone (``FrozenBatchNorm2d``'s scale and shift, a
    layer scale reshaped to ``(1, C, 1, 1)``): they hold no image rows, so they neither run in bands nor end a
    region; each runs once, whole, before the region that reads it (see :func:`_hoist_weight_only_nodes`). A
    node that writes in place keeps its place (and its global step)."""
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method") or node in static or not _has_tensor(node.meta.get("val")):
            continue
        inputs = node.all_input_nodes
        if (any(u.op == "get_attr" or u in found for u in inputs)
                and all(u.op == "get_attr" or u in static or u in found for u in inputs)
                and written_input(node, root) is None):
            found.add(node)
    return found


def _hoist_weight_only_nodes(graph: fx.Graph, regions: list[list[fx.Node]], weight_only: set[fx.Node]) -> None:
    """Move the weight-only nodes written between a region's first and last node to just before its first, in
    their order: they read no node of the region, and only row-local (side-effect free) nodes are passed."""
    if not weight_only:
        return
    order = {node: i for i, node in enumerate(graph.nodes)}
    for region in regions:
        first, last = order[region[0]], order[region[-1]]
        for node in sorted((v for v in weight_only if first < order[v] < last), key=order.__getitem__):
            region[0].prepend(node)


def _set_row_dims(graph: fx.Graph) -> None:
    """``node.meta["row_dim"]`` for every 4-D value: the axis the image rows are in. 2 (NCHW) except after a
    ``permute``/``transpose`` that moved them, and for values computed from such a value along other axes
    (channels-last LayerNorm, Linear, pointwise ops: same shape but perhaps the last axis)."""
    for node in graph.nodes:
        node.meta.pop("row_dim", None)
        if node.op == "placeholder" or not is_4d(node.meta.get("val")):
            continue
        inputs = [u for u in node.all_input_nodes if is_4d(u.meta.get("val"))]
        first = node.args[0] if node.args else None
        if isinstance(first, fx.Node) and is_4d(first.meta.get("val")):
            moved = moved_row_dim(node, row_dim(first))
            if moved is not None:
                node.meta["row_dim"] = moved
                continue
        shape = node.meta["val"].shape
        for u in inputs:
            r = row_dim(u)
            if r != 2 and r < 3 and u.meta["val"].shape[:3] == shape[:3]:
                node.meta["row_dim"] = r
                break


def _row_local_rules(graph: fx.Graph, root: nn.Module, batchnorm: str, static: dict[fx.Node, Any],
                     weight_only: set[fx.Node]) -> dict[fx.Node, NodeRule]:
    rules: dict[fx.Node, NodeRule] = {}
    for node in graph.nodes:
        if node in static or node in weight_only:
            continue
        try:
            rule = rule_for(node, root, batchnorm)
        except Exception as exc:
            raise PlanError(f"cannot plan node {node.format_node()}: {type(exc).__name__}: {exc}") from exc
        if rule is not None:
            rules[node] = rule
    return rules


def _sink_row_local_nodes(graph: fx.Graph, rules: dict[fx.Node, NodeRule]) -> None:
    """Reorder ``graph`` so each row-local node comes right before its first reader; every other node keeps its
    place relative to the others (so side effects keep their order).

    Regions are runs of row-local nodes in graph order; a global node written between two independent
    row-local parts (a ResNet block's shortcut BatchNorm statistics between the main branch's last
    normalisation and the add) would cut the run in two and materialise what crosses the cut.
    """
    order: list[fx.Node] = []
    for node in reversed(graph.nodes):
        at = {v: i for i, v in enumerate(order)}
        users = [at[u] for u in node.users if u in at]
        order.insert(min(users) if node in rules and users else 0, node)
    for before, node in zip(order, order[1:], strict=False):
        if before.next is not node:
            before.append(node)


def _regions(graph: fx.Graph, rules: dict[fx.Node, NodeRule], static: dict[fx.Node, Any],
             weight_only: set[fx.Node]) -> list[list[fx.Node]]:
    """Maximal runs (topological order) of row-local nodes; static, weight-only, placeholder and get_attr nodes
    don't break them."""
    regions: list[list[fx.Node]] = []
    current: list[fx.Node] = []
    members: set[fx.Node] = set()
    for node in graph.nodes:
        if node in static or node in weight_only or node.op in ("placeholder", "get_attr"):
            continue
        rule = rules.get(node)
        # a whole (non-row) input made inside the run would be needed in full by every band: cut there
        if rule is None or any(n in members and n not in rule.row_inputs for n in node.all_input_nodes):
            if current:
                regions.append(current)
            current, members = [], set()
        if rule is not None:
            current.append(node)
            members.add(node)
    if current:
        regions.append(current)
    return regions


# --------------------------------------------------------------------------------------------- bands


def _height(node: fx.Node) -> int:
    return int(node.meta["val"].shape[row_dim(node)])


class _SegmentGeometry:
    """Row dependencies inside one segment (consumers, needed rows) used to place cuts and intervals."""

    def __init__(self, nodes: list[fx.Node], rules: dict[fx.Node, NodeRule], outputs: list[fx.Node]) -> None:
        self.nodes, self.rules, self.outputs = nodes, rules, outputs
        inside = set(nodes)
        self.users = {v: [u for u in v.users if u in inside and v in rules[u].row_inputs] for v in nodes}
        self.main = max(outputs, key=_height)
        heights = [_height(v) for u in nodes for v in rules[u].row_inputs if v not in inside]
        self.h_in = max(heights) if heights else 1  # the tallest segment input sets the input progress
        # progress dicts (read only) and band weights by prefix: the planner bands a segment many times
        self._memo: dict[tuple[str, int], dict[fx.Node, int]] = {}
        self._weights: dict[tuple[str, int], int] = {}

    def needed(self, u: fx.Node, rows: RowInterval) -> RowInterval:
        return self.rules[u].rule.needed(rows)

    def prefixes(self, p_main: int) -> dict[fx.Node, int]:
        """Rows ``[0, P_v)`` each node must compute so the outputs have their first rows (output-driven)."""
        if ("prefixes", p_main) not in self._memo:
            self._memo["prefixes", p_main] = self._prefixes(p_main)
        return self._memo["prefixes", p_main]

    def _prefixes(self, p_main: int) -> dict[fx.Node, int]:
        h_main = _height(self.main)
        prefix: dict[fx.Node, int] = {}
        for v in reversed(self.nodes):
            p = -(-_height(v) * p_main // h_main) if v in self.outputs else 0
            for u in self.users[v]:
                if prefix[u] > 0:
                    p = max(p, self.needed(u, RowInterval(0, prefix[u])).stop)
            prefix[v] = min(p, _height(v))
        return prefix

    def computable(self, p_in: int) -> dict[fx.Node, int]:
        """Rows ``[0, P_v)`` each node can compute once the segment inputs' first rows are known (input-driven)."""
        if ("computable", p_in) not in self._memo:
            self._memo["computable", p_in] = self._computable(p_in)
        return self._memo["computable", p_in]

    def _computable(self, p_in: int) -> dict[fx.Node, int]:
        prefix: dict[fx.Node, int] = {}
        for u in self.nodes:
            rule = self.rules[u]
            limits = []
            for v in rule.row_inputs:
                h = _height(v)
                limits.append((prefix[v] if v in prefix else -(-h * p_in // self.h_in), h))
            if all(p >= h for p, h in limits):
                prefix[u] = _height(u)
                continue
            lo, hi = 0, _height(u)  # largest o with needed([0, o)) inside every input's prefix
            while lo < hi:
                mid = (lo + hi + 1) // 2
                need = self.needed(u, RowInterval(0, mid))
                if all(need.stop <= p for p, _ in limits):
                    lo = mid
                else:
                    hi = mid - 1
            prefix[u] = lo
        return prefix

    def cuts(self, bands: int, progress: Callable[[int], dict[fx.Node, int]], height: int) -> list[int]:
        """Cut points of ``progress`` so every band holds about the same activation bytes (skew-balanced)."""

        def weight(p: int) -> int:
            key = (progress.__name__, p)
            if key not in self._weights:
                self._weights[key] = sum(row_bytes(v) * pv for v, pv in progress(p).items())
            return self._weights[key]

        total = weight(height)
        cuts: list[int] = []
        for r in range(1, bands):
            target, lo, hi = total * r / bands, cuts[-1] + 1 if cuts else 1, height
            while lo < hi:
                mid = (lo + hi) // 2
                if weight(mid) >= target:
                    hi = mid
                else:
                    lo = mid + 1
            if lo < height:
                cuts.append(lo)
        return [0, *cuts, height]

    def two_phase(self, bands: int) -> list[Band]:
        cuts = self.cuts(bands, self.computable, self.h_in)
        prefix = [dict.fromkeys(self.nodes, 0)] + [self.computable(c) for c in cuts[1:]]
        result: list[Band] = []
        carry: list[tuple[fx.Node, RowInterval]] = []
        for r in range(1, len(cuts)):
            before, after = prefix[r - 1], prefix[r]
            rows = {v: RowInterval(before[v], after[v]) for v in self.nodes}
            if all(i.empty for i in rows.values()):
                continue
            carry_out = []
            for v in self.nodes:
                lows = [self.needed(u, RowInterval(after[u], after[u] + 1)).start
                        for u in self.users[v] if after[u] < _height(u)]
                if lows and min(lows) < after[v]:
                    carry_out.append((v, RowInterval(min(lows), after[v])))
            outputs = [(o, rows[o]) for o in self.outputs if not rows[o].empty]
            result.append(self._released(Band(rows, outputs, carry, carry_out)))
            carry = carry_out
        return result

    def overlapped(self, count: int) -> list[Band]:
        h_main = _height(self.main)
        cuts = self.cuts(count, self.prefixes, h_main)
        prefix = [self.prefixes(c) for c in cuts]
        bands: list[Band] = []
        for r in range(1, len(cuts)):
            own = {o: RowInterval(prefix[r - 1][o], prefix[r][o]) for o in self.outputs}
            rows: dict[fx.Node, RowInterval] = {}
            for v in reversed(self.nodes):
                need = own.get(v, RowInterval(0, 0))
                for u in self.users[v]:
                    if not rows[u].empty:
                        need = need.hull(self.needed(u, rows[u]))
                rows[v] = need
            bands.append(self._released(Band(rows, [(o, i) for o, i in own.items() if not i.empty], [], [])))
        return bands

    def _released(self, band: Band) -> Band:
        """Fill in what a band frees after each node and which rows it reads of the segment's outside inputs."""
        inside = set(self.nodes)
        reads: dict[fx.Node, RowInterval] = {}
        for v in self.nodes:
            if band.rows[v].empty:
                continue
            for u in self.rules[v].row_inputs:
                if u not in inside:
                    need = self.needed(v, band.rows[v]).clamp(_height(u))
                    reads[u] = reads[u].hull(need) if u in reads else need
        band.inputs = list(reads.items())
        return _with_release(self.nodes, band)

    def overlap(self, bands: list[Band]) -> float:
        """Fraction of activation bytes computed more than once (OverL halos)."""
        done = sum(row_bytes(v) * len(b.rows[v]) for b in bands for v in self.nodes)
        once = sum(row_bytes(v) * _height(v) for v in self.nodes)
        return done / max(once, 1) - 1.0


def _outputs(nodes: Sequence[fx.Node], static: dict[fx.Node, Any],
             streamed: set[fx.Node] | frozenset[fx.Node] = frozenset()) -> list[fx.Node]:
    """Nodes read outside ``nodes`` (shape queries excepted), and nodes nothing reads (a module whose result a
    network drops still runs, as in the plain model: train-mode BatchNorm updates its statistics): they are
    materialised in full. Reads by ``streamed`` statistics do not count: their prefix recomputes what they read."""
    inside = set(nodes)
    readers = {v: [u for u in v.users if u not in static] for v in nodes}
    return [v for v in nodes if not readers[v] or any(u not in inside and u not in streamed for u in readers[v])]


def band_count(band_bytes: int, segment_bytes: int, output_height: int) -> int:
    """Bands of a segment so each holds about ``band_bytes`` of activations: at least one, at most one per
    output row."""
    return max(1, min(output_height, -(-segment_bytes // max(1, band_bytes))))


def _segment(nodes: list[fx.Node], rules: dict[fx.Node, NodeRule], mode: str, band_bytes: int,
             static: dict[fx.Node, Any]) -> Segment:
    """A segment of ``nodes`` with bands of about ``band_bytes`` each."""
    segment = _unbanded(nodes, rules, mode, static)
    _band(segment, band_count(band_bytes, sum(_full_bytes(v) for v in nodes), _output_rows(segment)))
    return segment


def _unbanded(nodes: list[fx.Node], rules: dict[fx.Node, NodeRule], mode: str, static: dict[fx.Node, Any],
              streamed: set[fx.Node] | frozenset[fx.Node] = frozenset()) -> Segment:
    return Segment(nodes, {v: rules[v] for v in nodes}, _outputs(nodes, static, streamed), mode)


def _streamed_stats(plan: Plan) -> set[fx.Node]:
    """The statistics nodes ``plan`` streams (their reads recompute, see :func:`_outputs`)."""
    return {s.stats for s in plan.steps if isinstance(s, Streamed)}


def _output_rows(segment: Segment) -> int:
    """Rows of the segment's tallest output: the most bands it can have."""
    return max(_height(o) for o in segment.outputs)


# The geometries of the segments that the build_plan call in progress has banded, by nodes and outputs (shapes
# are fixed during a build): the planner bands the same segment many times (relief, tails, merges, spending).
_GEOMETRIES: contextvars.ContextVar[dict[tuple, _SegmentGeometry] | None] = contextvars.ContextVar(
    "lrcnn_geometries", default=None)


def _geometry(segment: Segment) -> _SegmentGeometry:
    cache = _GEOMETRIES.get()
    if cache is None:
        return _SegmentGeometry(segment.nodes, segment.rules, segment.outputs)
    key = (tuple(segment.nodes), tuple(segment.outputs))
    if key not in cache:
        cache[key] = _SegmentGeometry(segment.nodes, segment.rules, segment.outputs)
    return cache[key]


def _band(segment: Segment, count: int) -> None:
    """Cut ``segment`` into ``count`` bands (fewer when its outputs have fewer rows)."""
    geo = _geometry(segment)
    segment.bands = geo.two_phase(count) if segment.mode == "2ps" else geo.overlapped(count)
    segment.overlap = geo.overlap(segment.bands)


def _relieve_peak(plan: Plan) -> None:
    """Relieve the segment at the estimated peak while that lowers its own peak and not the plan's: give it
    25% more bands or, where that is not possible (OverL past ``MAX_OVERLAP``, one band per output row),
    cut it in two.

    Equal-byte bands leave the segments that run on top of more held memory (deeper ones: earlier segments'
    outputs, input gradients) at the peak; smaller bands there lower it.
    """
    done: list[Segment | Streamed] = []
    peaks = estimate_segment_peaks(plan)
    for _ in range(_MAX_REFINEMENTS):
        top = max(p for _, p in peaks)
        candidates = [(p, s) for s, p in peaks if isinstance(s, (Segment, Streamed))
                      and p >= (1 - _MIN_GAIN) * top and all(s is not d for d in done)]
        if not candidates:
            return
        own, s = max(candidates, key=lambda ps: ps[0])
        trial = _more_bands(plan, s, own, top) or (_cut(plan, s, own, top) if isinstance(s, Segment) else None)
        if trial is None:
            done.append(s)
        else:
            peaks = trial


def _accepted(plan: Plan, new: Sequence[Segment | Streamed], own: int, top: int,
              gain: float = _MIN_GAIN) -> list[tuple[Segment | Streamed | fx.Node, int]] | None:
    """The plan's step peaks if the ``new`` segments' peaks are ``gain`` below ``own`` and none is above
    ``top``."""
    trial = estimate_segment_peaks(plan)
    steps = {id(n) for n in new} | {id(v) for n in new if isinstance(n, Segment) and not n.recompute
                                    for v in n.nodes}  # kept: its nodes
    mine = max((p for t, p in trial if id(t) in steps), default=0)
    return trial if mine <= (1 - gain) * own and max(p for _, p in trial) <= top else None


def _more_bands(plan: Plan, step: Segment | Streamed, own: int,
                top: int) -> list[tuple[Segment | Streamed | fx.Node, int]] | None:
    s = step_segment(step)
    assert s is not None
    n = len(s.bands)
    count = min(_output_rows(s), n + max(1, n // 4))
    if count <= n:
        return None
    before = s.bands, s.overlap
    _band(s, count)
    trial = None if s.mode == "overl" and s.overlap > MAX_OVERLAP else _accepted(plan, [step], own, top)
    if trial is None:
        s.bands, s.overlap = before
    return trial


def _cut(plan: Plan, s: Segment, own: int, top: int) -> list[tuple[Segment | Streamed | fx.Node, int]] | None:
    """Cut ``s`` in two, each part with 25% more bands than ``s`` had (a small deep part may run plainly)."""
    if len(s.nodes) < 2 or not s.recompute:
        return None
    split = _best_split(s.nodes, plan.static)
    count = len(s.bands) + max(1, len(s.bands) // 4)
    streamed = _streamed_stats(plan)
    parts = [_unbanded(nodes, s.rules, s.mode, plan.static, streamed) for nodes in (s.nodes[:split], s.nodes[split:])]
    for part in parts:
        _band(part, count)
    _keep_small_segments(parts, plan.param_grads)
    i = next(i for i, step in enumerate(plan.steps) if step is s)
    before = plan.steps, plan.free_after
    plan.steps = [*plan.steps[:i], *parts, *plan.steps[i + 1 :]]
    plan.free_after = _free_after(plan.graph, plan.steps)
    trial = _accepted(plan, parts, own, top, gain=0.0)  # not worse: the parts' bands are refined next
    if trial is None:
        plan.steps, plan.free_after = before
    return trial


def _segments(nodes: list[fx.Node], rules: dict[fx.Node, NodeRule], mode: str, band_bytes: int,
              static: dict[fx.Node, Any], param_grads: dict[fx.Node, int], cut_whole: bool) -> list[Segment]:
    """Cut a region into segments where the estimated peak memory does not rise (a cut also ends halo work).
    ``cut_whole``: also cut a part that is one band (its bytes under ``band_bytes``): smaller transients, but
    every cut materialises a value, and the pieces may end up kept plain (see :func:`build_plan`)."""
    whole = [_segment(nodes, rules, mode, band_bytes, static)]
    if len(nodes) < 2 or (len(whole[0].bands) < 2 and not cut_whole):
        return whole
    split = _best_split(nodes, static)
    parts = (_segments(nodes[:split], rules, mode, band_bytes, static, param_grads, cut_whole)
             + _segments(nodes[split:], rules, mode, band_bytes, static, param_grads, cut_whole))
    too_much_halo = mode == "overl" and whole[0].overlap > MAX_OVERLAP
    if too_much_halo or segments_peak(parts, param_grads) <= segments_peak(whole, param_grads):
        return parts
    return whole


def _with_release(nodes: list[fx.Node], band: Band) -> Band:
    """Fill ``band.release``: after each node, the segment values no later node of the band reads."""
    last: dict[fx.Node, fx.Node] = {}
    for u in nodes:
        if band.rows[u].empty:
            continue
        last.setdefault(u, u)
        for v in u.all_input_nodes:
            if v in band.rows:
                last[v] = u
    for v, u in last.items():
        band.release.setdefault(u, []).append(v)
    return band


def _whole(segment: Segment) -> Band:
    rows = {v: RowInterval(0, _height(v)) for v in segment.nodes}
    return _with_release(segment.nodes, Band(rows, [(o, rows[o]) for o in segment.outputs], [], []))


def _keep_plain(segment: Segment) -> None:
    segment.bands, segment.recompute, segment.overlap = [_whole(segment)], False, 0.0


def _keep_small_segments(segments: list[Segment], param_grads: dict[fx.Node, int]) -> None:
    """Run plainly (kept for backward, no recomputation) the segments where bands cannot pay off.

    A segment whose every node is an output (a lone conv between train-mode BatchNorms) saves nothing when
    banded: its inputs and outputs are materialised anyway. Deep
    low-resolution segments hold little memory but much compute: keeping them costs no peak memory as long as
    they fit under the largest band's transient (their backward frees them before the big bands are
    recomputed), and saves time.
    """
    for s in segments:
        if all(v in s.outputs for v in s.nodes):
            _keep_plain(s)
    banded = [s for s in segments if s.recompute]
    transient = max((_band_bytes(s, b) for s in banded for b in s.bands), default=0)
    kept = 0
    for s in reversed(banded):
        # what keeping costs beyond the banded run, which holds its outputs and 2PS boundary rows anyway, and
        # sums one weight gradient per band (a temporary as large as its largest weight)
        held = sum(_full_bytes(o) for o in s.outputs) + sum(
            row_bytes(v) * len(rows) for b in s.bands for v, rows in b.carry_out) + max(
            (param_grads.get(v, 0) for v in s.nodes), default=0)
        extra = max(0, sum(_full_bytes(v) for v in s.nodes) - held)
        if kept + extra > transient:
            break
        kept += extra
        _keep_plain(s)


def _best_split(nodes: list[fx.Node], static: dict[fx.Node, Any]) -> int:
    """Split index near the middle where the fewest bytes must be materialised in full."""
    n = len(nodes)
    candidates = range(max(1, n // 3), max(2, n - n // 3))

    def crossing(i: int) -> int:
        return sum(_full_bytes(v) for v in _outputs(nodes[:i], static))

    return min(candidates, key=lambda i: (crossing(i), abs(i - n // 2)))


# --------------------------------------------------------------------------------------------- plan


def build_plan(gm: fx.GraphModule, root: nn.Module, *, mode: str, rows: int, batchnorm: str,
               goal: int | None = None) -> Plan:
    """Plan ``gm`` (shapes already propagated) for row-centric execution. ``goal``: bytes the estimated peak may
    reach; where the plan is estimated below it, the difference is spent on time (see :func:`_spend_goal`).

    Raises:
        PlanError: a node cannot be planned; the message shows the node.
    """
    token = _GEOMETRIES.set({})
    try:
        plan = _build_plan(gm, root, mode=mode, rows=rows, batchnorm=batchnorm, goal=goal)
    finally:
        _GEOMETRIES.reset(token)
    for s in plan.segments:  # the estimate's memory of trial bands
        s.costs.clear()
    for t in plan.steps:
        if isinstance(t, Streamed):
            t.prefix.costs.clear()
    return plan


def _build_plan(gm: fx.GraphModule, root: nn.Module, *, mode: str, rows: int, batchnorm: str,
                goal: int | None) -> Plan:
    graph = gm.graph
    make_writes_explicit(graph, root)
    _drop_broadcast_expands(graph)
    _set_row_dims(graph)
    if _channel_splits_as_slices(graph):
        _set_row_dims(graph)  # the slices' rows: where their input holds them
    static = _static_nodes(graph)
    weight_only = _weight_only_nodes(graph, root, static)
    rules = _row_local_rules(graph, root, batchnorm, static, weight_only)
    _sink_row_local_nodes(graph, rules)
    param_grads = _param_grads(graph, root)
    regions = _regions(graph, rules, static, weight_only)
    _hoist_weight_only_nodes(graph, regions, weight_only)
    band_bytes = max(1, max((sum(_full_bytes(v) for v in region) for region in regions), default=0) // rows)
    # whether to cut regions down to pieces of one band is decided on the finished plans' estimates
    plans = [_plan_regions(graph, root, regions, rules, static, param_grads, mode, band_bytes, cut_whole, goal)
             for cut_whole in (True, False)]
    plan = min(plans, key=peak_bytes)
    if goal is not None:
        _spend_goal(plan, goal, band_bytes)
    return plan


def _plan_regions(graph: fx.Graph, root: nn.Module, regions: list[list[fx.Node]], rules: dict[fx.Node, NodeRule],
                  static: dict[fx.Node, Any], param_grads: dict[fx.Node, int], mode: str, band_bytes: int,
                  cut_whole: bool, goal: int | None = None) -> Plan:
    """Regions -> segments (some kept plain) -> a plan, its peak relieved and statistics streamed (those that
    cost recomputation only while the estimated peak is above ``goal``)."""
    region_of = {region[0]: _segments(region, rules, mode, band_bytes, static, param_grads, cut_whole)
                 for region in regions}
    _keep_small_segments([s for segs in region_of.values() for s in segs], param_grads)
    covered = {v for segs in region_of.values() for s in segs for v in s.nodes}
    steps: list[Step] = []
    for node in graph.nodes:
        if node in region_of:
            steps.extend(region_of[node])
        elif node not in covered and _runs(node, static):
            steps.append(node)
    plan = Plan(steps, static, _free_after(graph, steps), graph, param_grads)
    _relieve_peak(plan)
    _stream_statistics(plan, root, goal)
    _merge_lone_nodes(plan)
    if goal is None or peak_bytes(plan) > goal:
        _recompute_tails(plan, root)
    _relieve_peak(plan)  # streaming moved the peak
    _fewer_boundary_rows(plan)
    _cut_gradients(plan)
    _keep_where_peak_holds(plan)
    return plan


def _spend_goal(plan: Plan, goal: int, band_bytes: int) -> None:
    """Spend what the plan's estimated peak leaves under ``goal`` on time: keep recomputed segments plain while
    every step stays under the goal (deepest first, as :func:`_keep_where_peak_holds`), then give the segments
    with the most bands 25% fewer while the peak stays under it (fewer, larger bands: less per-band work,
    fewer halo and boundary rows), down to the bands ``rows`` asked for (``band_bytes`` each: those the
    relief added go; a CPU can run smaller bands faster, so ``rows`` stays the caller's choice). Nothing changes
    where the plan is estimated above the goal."""
    if peak_bytes(plan) > goal:
        return
    _keep_where_peak_holds(plan, goal)

    def asked(s: Segment) -> int:
        return band_count(band_bytes, sum(_full_bytes(v) for v in s.nodes), _output_rows(s))

    # fewer bands of one segment only raise the others' peaks: a segment refused once is never tried again
    trying = [s for s in plan.segments if s.recompute and len(s.bands) > asked(s)]
    while trying:
        s = max(trying, key=lambda s: len(s.bands))
        if _fewer_bands(plan, s, asked(s), goal) is None or len(s.bands) <= asked(s):
            trying.remove(s)


def _fewer_bands(plan: Plan, s: Segment, floor: int, limit: float) -> int | None:
    """Give ``s`` 25% fewer bands (not below ``floor``) where the plan's estimated peak stays at or under
    ``limit``; returns that peak, or None (``s`` unchanged)."""
    before = s.bands, s.overlap
    _band(s, max(floor, len(s.bands) - max(1, len(s.bands) // 4)))
    trial = peak_bytes(plan)
    if trial <= limit:
        return trial
    s.bands, s.overlap = before
    return None


def _keep_where_peak_holds(plan: Plan, goal: int = 0) -> None:
    """Run plainly (kept for backward, no recomputation) each recomputed segment whose activations fit under
    the estimated peak, deepest first: its forward runs once instead of twice and its bands' overhead goes,
    at no cost in peak memory. A segment's activations live from its forward to its backward; where the peak
    is elsewhere (typically the backward of an early, high-resolution segment), deep segments fit. Every step
    whose estimated peak keeping raises must stay ``_KEEP_MARGIN`` below the plan's peak: the estimate is not
    exact, and a step it puts just under the peak can measure above it. ``goal``: a peak (bytes) to keep under
    instead, where it is above the plan's own."""
    peaks = estimate_segment_peaks(plan)
    peak = max(max((p for _, p in peaks), default=0), goal)
    for s in reversed(plan.segments):
        if not s.recompute:
            continue
        before, old = (s.bands, s.overlap), {id(t): p for t, p in peaks}
        _keep_plain(s)
        trial = estimate_segment_peaks(plan)
        if all(_keeps_under(p, old.get(id(t), -1), peak) for t, p in trial):
            peaks = trial
        else:
            s.bands, s.overlap, s.recompute = before[0], before[1], True


def _keeps_under(new: int, old: int, peak: int) -> bool:
    """Whether a step whose estimated peak goes from ``old`` to ``new`` leaves the plan's ``peak`` safe: never
    above it, and where it rose, at least ``_KEEP_MARGIN`` below it."""
    return new <= peak and (new <= old or new <= (1 - _KEEP_MARGIN) * peak)


def _cut_gradients(plan: Plan) -> None:
    """Let later recomputations of each streamed statistics' prefix stop their backward at its input (see NOTE
    [ Gradient cuts ] in :mod:`lightning_lrcnn.plan`: one backward pass through the prefix instead of two),
    then keep cut inputs whole through forward for their readers, and their recomputed rows through backward,
    wherever the estimated peak does not rise."""
    peak = _set_where_peak_holds(plan, "cut", [s for s in plan.steps if isinstance(s, Streamed)],
                                 peak_bytes(plan))
    cuts = gradient_cuts(plan)
    read = {id(s) for c in cuts.values() for s in c.at}  # in forward: by segments and statistics' passes
    reread = {id(s) for t in plan.steps if isinstance(t, Streamed) and id(t.prefix) in cuts  # in backward
              for s in cuts[id(t.prefix)].at}
    for flag, readers in (("keep", read), ("reuse", reread)):
        peak = _set_where_peak_holds(plan, flag, [s for s in plan.steps if id(s) in readers], peak)


def _set_where_peak_holds(plan: Plan, flag: str, steps: list[Step], peak: int) -> int:
    """Set ``flag`` on ``steps``: on all at once where the estimated peak does not rise above ``peak`` (one
    estimate), else one at a time, kept where it does not. Returns the new estimated peak."""
    for s in steps:
        setattr(s, flag, True)
    trial = peak_bytes(plan)
    if trial <= peak:
        return trial
    for s in steps:
        setattr(s, flag, False)
    for s in steps:
        setattr(s, flag, True)
        trial = peak_bytes(plan)
        if trial > peak:
            setattr(s, flag, False)
        else:
            peak = trial
    return peak


def _fewer_boundary_rows(plan: Plan) -> None:
    """Give 2PS segments 25% fewer bands while that lowers the estimated peak (by ``_MIN_GAIN``, as bands are
    added): every band's boundary rows are held for backward, so a segment's bands can cost more, where later
    steps run on top of them, than they save in its own transients (VGG-16 with many bands)."""
    peak = peak_bytes(plan)
    for s in plan.segments:
        while s.mode == "2ps" and s.recompute and len(s.bands) > 1:
            trial = _fewer_bands(plan, s, 1, (1 - _MIN_GAIN) * peak)
            if trial is None:
                break
            peak = trial


def _merge_lone_nodes(plan: Plan) -> None:
    """Merge a recomputed segment of one node (a block's last activation, left alone when statistics were
    streamed around it) into the recomputed segment just before it where that reads one of its outputs, keeping
    the merge where the estimated peak does not rise: the value between them is then never materialised."""
    peak = peak_bytes(plan)
    streamed = _streamed_stats(plan)
    i = 1
    while i < len(plan.steps):
        before, lone = plan.steps[i - 1], plan.steps[i]
        if not (isinstance(before, Segment) and isinstance(lone, Segment) and before.recompute and lone.recompute
                and len(lone.nodes) == 1 and before.mode == lone.mode
                and any(u in before.nodes for u in lone.nodes[0].all_input_nodes)):
            i += 1
            continue
        nodes = [*before.nodes, *lone.nodes]
        merged = Segment(nodes, {**before.rules, **lone.rules}, _outputs(nodes, plan.static, streamed), before.mode)
        _band(merged, max(len(before.bands), len(lone.bands)))
        trial = Plan([*plan.steps[: i - 1], merged, *plan.steps[i + 1 :]], plan.static, [], plan.graph,
                     plan.param_grads)
        trial.free_after = _free_after(plan.graph, trial.steps)
        trial_peak = peak_bytes(trial)
        if trial_peak <= peak and not (merged.mode == "overl" and merged.overlap > MAX_OVERLAP):
            plan.steps, plan.free_after, peak = trial.steps, trial.free_after, trial_peak
        else:
            i += 1


# --------------------------------------------------------------------------------------------- recomputed tails


def _recompute_tails(plan: Plan, root: nn.Module) -> None:
    """Stop materialising a recomputed segment's outputs where a narrower value inside it can be kept instead,
    and the steps that read the outputs recompute them from it (the segment's *tail*), keeping each change
    where the estimated peak drops.

    # NOTE [ Recomputed tails ]
    # A bottleneck block's output (256 channels at 1/4 of the image in ResNet-50) is materialised for the next
    # block, which reads it twice (its first convolution, and the residual add). Its last 1x1 convolution's
    # input (64 channels) is a quarter of its size: keeping that, with the block input, and letting the next
    # block's steps recompute "conv, normalise, add, activate" in their own bands trades 3/4 of the held bytes
    # for one cheap convolution per reading band. The next block's output then needs the previous tail too, so
    # tails chain. Per segment, the value kept is the one whose tail saves the most held bytes per unit of
    # recomputed work (see _work); segments are tried in order of peak bytes saved per unit of added work
    # (see _plan_work), each kept where the estimated peak drops, until tails would add MAX_TAIL_WORK to the
    # step's work. Where the next block's statistics' prefix holds the tail, a gradient cut keeps autograd for
    # the tail, which the residual add reads too (see NOTE [ Gradient cuts ] in plan.py).
    """
    peak, work = peak_bytes(plan), _plan_work(plan, root)
    budget = (1 + MAX_TAIL_WORK) * work
    gains: list[tuple[float, frozenset[fx.Node]]] = []  # memory saved per unit of work, each tail on its own
    for s in plan.segments:
        trial = _without_tail(plan, s, root) if s.recompute else None
        if trial is not None and (trial_peak := peak_bytes(trial)) < peak:
            gains.append(((peak - trial_peak) / max(1.0, _plan_work(trial, root) - work), frozenset(s.outputs)))
    for _, outputs in sorted(gains, key=lambda g: -g[0]):
        now = next((t for t in plan.segments if t.recompute and frozenset(t.outputs) == outputs), None)
        trial = None if now is None else _without_tail(plan, now, root)
        if trial is not None and _plan_work(trial, root) <= budget:
            trial_peak = peak_bytes(trial)
            if trial_peak <= (1 - _MIN_GAIN) * peak:
                plan.steps, plan.free_after, peak = trial.steps, trial.free_after, trial_peak


def _without_tail(plan: Plan, s: Segment, root: nn.Module) -> Plan | None:
    """``plan`` with the outputs of ``s`` that only recomputed steps read recomputed by those steps, from the value
    of ``s`` whose tail saves the most held bytes per unit of work (or from the inputs of ``s``); None where no
    output can go or nothing is saved."""
    i = next(i for i, t in enumerate(plan.steps) if t is s)
    reads = {id(t): set(step_reads(t)) for t in plan.steps[i + 1:]}  # what each later step reads
    readers = {o: [t for t in plan.steps[i + 1:] if o in reads[id(t)]] for o in s.outputs}
    gone = [o for o in s.outputs if readers[o] and all(
        isinstance(t, Streamed) or (isinstance(t, Segment) and t.recompute) for t in readers[o])]
    if not gone:
        return None  # a value nothing reads (a dropped result) still runs where it is made
    kept = [o for o in s.outputs if o not in gone]
    held = sum(_full_bytes(o) for o in gone)

    def stop_at(m: fx.Node | None) -> frozenset[fx.Node]:  # what the tail from ``m`` reads materialised
        return frozenset(kept) | ({m} if m is not None else set())

    best: tuple[float, fx.Node | None] | None = None
    for m in [None, *(v for v in s.nodes if v not in s.outputs and is_4d(v.meta.get("val")))]:
        tail = {v for o in gone for v in _ancestors(s.nodes, o, stop_at(m))}
        saved = held - (0 if m is None else _full_bytes(m))
        if saved <= 0:
            continue
        score = saved / max(sum(_work(v, root) for v in tail), 1)
        if best is None or score > best[0]:
            best = (score, m)
    if best is None:
        return None
    m = best[1]
    stop = stop_at(m)
    streamed = _streamed_stats(plan)
    order = {v: k for k, v in enumerate(plan.graph.nodes)}
    new: list[Step] = []
    for t in plan.steps:
        if t is s:
            made = sorted({*kept, *([m] if m is not None else [])}, key=order.__getitem__)
            if made:
                head = _unbanded(sorted({v for o in made for v in _ancestors(s.nodes, o)}, key=order.__getitem__),
                                 s.rules, s.mode, plan.static, streamed)
                head.outputs = made
                _band(head, len(s.bands))
                new.append(head)
        elif id(t) in reads and reads[id(t)] & set(gone):
            tail = {v for o in gone if o in reads[id(t)] for v in _ancestors(s.nodes, o, stop)}
            segment = step_segment(t)
            assert segment is not None  # a reader is a segment or a streamed step
            nodes = sorted({*segment.nodes, *tail}, key=order.__getitem__)
            merged = Segment(nodes, {**s.rules, **segment.rules}, list(segment.outputs), segment.mode)
            if any(v in tail and v not in merged.rules[u].row_inputs for u in nodes for v in u.all_input_nodes):
                return None  # a value read whole (a squeeze-excitation gate) is not recomputed in bands
            _band(merged, max(len(segment.bands), len(s.bands)))
            if merged.mode == "overl" and merged.overlap > MAX_OVERLAP:
                return None
            new.append(Streamed(t.stats, t.outputs, merged) if isinstance(t, Streamed) else merged)
        else:
            new.append(t)
    return Plan(new, plan.static, _free_after(plan.graph, new), plan.graph, plan.param_grads)


def _plan_work(plan: Plan, root: nn.Module) -> float:
    """Multiply-adds of one training step of ``plan``, roughly: every node's forward work once per band it runs
    in (halos included), and again for each recomputation (a segment's bands in backward, a streamed step's
    backward pass), and its backward work (about twice its forward) once per band that backpropagates through it
    (not where a gradient cut recomputes it without autograd)."""
    cuts = gradient_cuts(plan)
    done = 0.0
    for step in plan.steps:
        segment = step_segment(step)
        if segment is None:
            done += 3 * _work(step, root) if isinstance(step, fx.Node) else 0
            continue
        frozen = frozen_nodes(cuts, segment)
        for v in segment.nodes:
            passes = (2 if segment.recompute else 1) + (0 if v in frozen else 2)
            done += passes * _work(v, root) * sum(len(b.rows[v]) for b in segment.bands) / max(1, _height(v))
    return done


def _work(node: fx.Node, root: nn.Module) -> int:
    """Multiply-adds of a node, roughly: its output's elements times the weights each one reads (a convolution
    or linear layer), else its output's elements."""
    val = node.meta.get("val")
    if not isinstance(val, Tensor):
        return 0
    known = node.meta.get("work")
    if known is not None and known[0] is val:
        return int(known[1])
    module = root.get_submodule(str(node.target)) if node.op == "call_module" else None
    weights = sum(p.numel() for p in module.parameters(recurse=False)) if module is not None else 0
    weights += sum(u.meta["val"].numel() for u in node.all_input_nodes
                   if u.op == "get_attr" and isinstance(u.meta.get("val"), Tensor))
    linear = isinstance(module, nn.Linear) or node.target is F.linear
    channels = val.shape[-1] if linear and val.dim() else val.shape[1] if val.dim() > 1 else 1
    work = int(val.numel() * max(1, weights // max(1, channels)))
    node.meta["work"] = (val, work)
    return work


# --------------------------------------------------------------------------------------------- streamed statistics


def _stream_statistics(plan: Plan, root: nn.Module, goal: int | None = None) -> None:
    """Stream each train-mode BatchNorm's statistics, and each mean over the image (a squeeze-excitation gate's
    squeeze), (:class:`Streamed`) where that lowers the estimated peak, in graph order until the peak is under
    ``goal`` (streaming costs recomputation).

    # NOTE [ Streamed statistics ]
    # Materialised, a BatchNorm's statistics keep their input (a convolution output) whole until backward.
    # Streamed, they are accumulated band by band from a *prefix*: the nodes of the segment before them that
    # compute that input from materialised values; the segment after them then starts with the prefix too, so
    # it recomputes the input's rows itself. Chained BatchNorms make ever longer prefixes (more recomputation,
    # less memory): each is kept only where the estimate says the step's peak drops.
    """
    peak = peak_bytes(plan)
    for stats in [s for s in plan.steps if isinstance(s, fx.Node) and streamable(s, root)]:
        if goal is not None and peak <= goal:
            return
        trial = _streamed(plan, stats)
        if trial is None:
            continue
        trial_peak = peak_bytes(trial)
        if trial_peak < peak:
            plan.steps, plan.free_after, peak = trial.steps, trial.free_after, trial_peak


def streamable(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` is a reduction that can be streamed band by band: train-mode BatchNorm statistics, or a
    mean or L2 norm over the image (see :func:`~lightning_lrcnn.rules.image_reduction`)."""
    return (node.op == "call_function" and node.target is batch_statistics) or image_reduction(node, root) is not None


def _ancestors(nodes: list[fx.Node], of: fx.Node, stop: frozenset[fx.Node] = frozenset()) -> list[fx.Node]:
    """The nodes of ``nodes`` that ``of`` depends on (``of`` included), in order, not looking past ``stop``
    (values materialised anyway: read, not recomputed)."""
    inside, need = set(nodes), {of}
    for v in reversed(nodes):
        if v in need and v not in stop:
            need.update(u for u in v.all_input_nodes if u in inside)
    return [v for v in nodes if v in need and v not in stop]


def _streamed(plan: Plan, stats: fx.Node) -> Plan | None:
    """``plan`` with ``stats`` streamed over the segment that makes its input, or None where that does not
    apply: the input comes from a recomputed segment and is read only by the statistics and by the segment
    that normalises with them."""
    x, steps = stats.args[0], plan.steps
    if not isinstance(x, fx.Node):
        return None
    owner = {id(v): s for s in steps if isinstance(s, Segment) for v in s.nodes}
    seg_a = owner.get(id(x))
    # the segment that normalises (or gates) with the statistics; shape queries (timm's ``_assert``) are constants
    others = [u for u in x.users if u is not stats and u not in plan.static]
    seg_b = owner.get(id(others[0])) if others else None
    if seg_a is None or seg_b is None or seg_b is seg_a or any(owner.get(id(u)) is not seg_b for u in others):
        return None  # read by seg_a itself or by more than one step: it is materialised anyway
    if stats.target is batch_statistics:  # its mean and rstd, read by getitem, are made by the streamed step
        readers = list(stats.users)
        if any(r.op != "call_function" or r.target is not operator.getitem for r in readers):
            return None
    else:
        readers = [stats]
    if steps.index(seg_b) < steps.index(stats):
        return None
    kept = [o for o in seg_a.outputs if o is not x]
    prefix_nodes = _ancestors(seg_a.nodes, x, frozenset(kept))
    rules = {**seg_a.rules, **seg_b.rules}
    prefix = _unbanded(prefix_nodes, rules, "overl", plan.static)
    prefix.outputs = [x]
    _band(prefix, len(seg_a.bands))
    order = {v: i for i, v in enumerate(plan.graph.nodes)}
    streamed = {stats} | _streamed_stats(plan)
    merged = _unbanded(sorted({*prefix_nodes, *seg_b.nodes}, key=order.__getitem__), rules, seg_b.mode, plan.static,
                       streamed)
    merged.outputs = [o for o in merged.outputs if o not in kept]
    _band(merged, len(seg_b.bands))
    new: list[Step] = []
    for step in steps:
        if step is seg_a and kept:  # its other outputs: only the nodes they need
            needed = {v for o in kept for v in _ancestors(seg_a.nodes, o)}
            rest = [v for v in seg_a.nodes if v in needed]
            part = _unbanded(rest, seg_a.rules, seg_a.mode, plan.static, streamed)
            _band(part, len(seg_a.bands))
            new.append(part)
        elif step is stats:
            new.append(Streamed(stats, readers, prefix))
        elif step is seg_b:
            new.append(merged)
        elif step is not seg_a and not (isinstance(step, fx.Node) and step in readers):
            new.append(step)
    return Plan(new, plan.static, _free_after(plan.graph, new), plan.graph, plan.param_grads)


def plain_graph_plan(gm: fx.GraphModule, root: nn.Module) -> Plan:
    """``gm`` (shapes already propagated) run as usual, planned no further (what the plain model runs)."""
    graph = gm.graph
    make_writes_explicit(graph, root)
    static = _static_nodes(graph)
    steps: list[Step] = [v for v in graph.nodes if _runs(v, static)]
    return Plan(steps, static, _free_after(graph, steps), graph, _param_grads(graph, root))


def _runs(node: fx.Node, static: dict[fx.Node, Any]) -> bool:
    """Whether ``node`` is computed by a step (not an input, an attribute or a value known from shapes)."""
    return node not in static and node.op not in ("placeholder", "get_attr")


def plain_plan(plan: Plan, reason: str) -> Plan:
    """The same graph run as usual: every node a global step, nothing banded or recomputed."""
    steps: list[Step] = list(plan.graph_nodes())
    return Plan(steps, plan.static, _free_after(plan.graph, steps), plan.graph, plan.param_grads, reason)


def _param_grads(graph: fx.Graph, root: nn.Module) -> dict[fx.Node, int]:
    """Bytes of the trainable parameters each node uses (a ``get_attr`` parameter counts for its first user)."""
    grads: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            params = list(root.get_submodule(str(node.target)).parameters())
        elif node.op == "get_attr" and node.users:
            value = fetch_attr(root, str(node.target))
            params, node = ([value] if isinstance(value, nn.Parameter) else []), next(iter(node.users))
        else:
            continue
        nbytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        grads[node] = grads.get(node, 0) + nbytes
    return grads


def _free_after(graph: fx.Graph, steps: list[Step]) -> list[list[fx.Node]]:
    """For each step, the env entries that no later step reads (freed to keep peak memory low)."""
    last: dict[fx.Node, int] = {}
    for i, step in enumerate(steps):
        for n in step_reads(step):
            last[n] = i
    frees: list[list[fx.Node]] = [[] for _ in steps]
    for i, step in enumerate(steps):  # values no step reads (a dropped result) are freed where they are made
        for node in step_outputs(step):
            last.setdefault(node, i)
    for n, i in last.items():
        if n.op != "get_attr":
            frees[i].append(n)
    return frees


def _band_bytes(segment: Segment, band: Band) -> int:
    return sum(row_bytes(v) * len(band.rows[v]) for v in segment.nodes)


def _full_bytes(node: fx.Node) -> int:
    return row_bytes(node) * _height(node)
