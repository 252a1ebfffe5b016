"""Plan -> analytic cost: peak memory of one training step and extra compute, from shapes alone (no run).

The model follows what autograd keeps. Shape propagation records, per node, the bytes its backward saves
(``node.meta["saved_output"]``: its output, when an op saves it; ``["saved_internal"]``: buffers an op saves
for itself, such as max-pool indices). A step of the plan then

* *holds* bytes from its forward until its backward: a plain node what autograd saves; a banded segment its
  materialised outputs and 2PS boundary rows (bands save nothing: they are recomputed);
* needs *transient* bytes on top: in forward the value being made; in backward the gradients flowing through
  it and, for a segment, one recomputed band's saved tensors and gradients;
* adds its parameters' gradients in backward, which stay alive to the end of the step.

The peak is the largest of these sums over a forward sweep and a backward sweep. The estimate prunes
candidates before measuring them and stands in for the plain model's peak when that would not fit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from torch import Tensor, fx

from .plan import (
    Band,
    Cuts,
    Plan,
    Segment,
    Streamed,
    frozen_nodes,
    gradient_cuts,
    handed_in_pieces,
    last_cut_readers,
    row_bytes,
    step_segment,
)
from .rules import row_dim

__all__ = ["Estimate", "Breakdown", "estimate", "peak_bytes", "breakdown", "estimate_plain", "segment_peaks",
           "segments_peak"]


@dataclass(frozen=True)
class Estimate:
    """Analytic cost of a plan: the training step's peak bytes (activations, gradients, and the parameter
    gradients it creates) and the forward work of the segments, banded (halos, recomputation) over plain."""

    peak_bytes: int
    extra_compute: float


@dataclass(frozen=True)
class _Cost:
    held: int  # alive from this step's forward until its backward
    forward: int  # transient on top of everything held, while the step runs forward
    backward: int  # transient on top of everything held and the gradients made so far, in its backward
    grads: int  # parameter gradients the step's backward creates
    band: int = 0  # of ``backward``: one recomputed band with its gradients (a segment; 0 for a node)


@dataclass(frozen=True)
class Breakdown:
    """Where the estimated peak goes, at the moment it is reached (bytes; ``input`` exists before the step and
    is not part of the peak)."""

    peak: int
    phase: str  # "forward" or "backward"
    step: str  # the step running at the peak
    param_grads: int  # parameter gradients made so far
    held: int  # segment outputs, 2PS boundary rows and saved tensors of plain steps, kept for backward
    band: int  # the live band (recomputed, with its gradients); 0 when a plain step is at the peak
    in_flight: int  # the running step's other transients: its output (forward) or the gradients flowing (backward)
    input: int

    def __str__(self) -> str:
        mib = 2.0**20
        return (f"estimated peak {self.peak / mib:.1f} MiB ({self.phase}, {self.step}): parameter gradients "
                f"{self.param_grads / mib:.1f}, held outputs and boundary rows {self.held / mib:.1f}, live band "
                f"{self.band / mib:.1f}, gradients and values in flight {self.in_flight / mib:.1f} MiB; the input "
                f"({self.input / mib:.1f} MiB) is not counted")


def estimate(plan: Plan) -> Estimate:
    """Estimated peak of one training step (forward and backward) of ``plan`` and its recompute cost."""
    return Estimate(peak_bytes(plan), _extra_compute(plan))


def peak_bytes(plan: Plan) -> int:
    """``estimate(plan).peak_bytes`` alone (what the planner compares its trials by)."""
    return max((p for _, p in segment_peaks(plan)), default=0)


def segment_peaks(plan: Plan) -> list[tuple[Segment | Streamed | fx.Node, int]]:
    """Per step (a recomputed segment, or a node of the plan run as usual): the highest estimated memory while
    it runs forward or backward. The largest is the step's peak."""
    steps, costs = _costs(plan)
    return list(zip(steps, _step_peaks(costs), strict=True))


def _costs(plan: Plan) -> tuple[list[Segment | Streamed | fx.Node], list[_Cost]]:
    """The plan's steps as costed units (a kept segment: its nodes) and their costs."""
    captured = {u for s in plan.segments if s.recompute for v in s.nodes for u in v.all_input_nodes}
    captured |= {u for s in plan.steps if isinstance(s, Streamed) for v in s.prefix.nodes for u in v.all_input_nodes}
    cuts = gradient_cuts(plan)
    steps: list[Segment | Streamed | fx.Node] = []
    costs: list[_Cost] = []
    for step in plan.steps:
        if isinstance(step, Segment) and step.recompute:
            steps.append(step)
            costs.append(_segment_cost(step, plan.param_grads, captured, frozen=frozen_nodes(cuts, step)))
        elif isinstance(step, Streamed):
            steps.append(step)
            cost = _segment_cost(step.prefix, plan.param_grads, captured, streamed=True,
                                 frozen=frozen_nodes(cuts, step.prefix))
            if step.cut:  # its backward adds later recomputations' sum to each band's gradient: one more band
                x = step.prefix.outputs[0]
                cost = replace(cost, backward=cost.backward + row_bytes(x) * max(
                    _band_rows(b, x) for b in step.prefix.bands))
            costs.append(cost)
        else:
            for v in step.nodes if isinstance(step, Segment) else [step]:
                steps.append(v)
                costs.append(_node_cost(v, plan, captured))
    return steps, _with_cut_sums(steps, _with_row_input_grads(steps, costs, _pieces(plan, cuts)), cuts)


def _pieces(plan: Plan, cuts: dict[int, Cuts]) -> dict[fx.Node, int]:
    """Per value handed on in pieces (see NOTE [ Values handed on in pieces ] in :mod:`lightning_lrcnn.plan`),
    how many pieces: by its maker's bands."""
    pieces = handed_in_pieces(plan, cuts)
    return {o: len(s.bands) for s in plan.segments for o in s.outputs if o in pieces}


def _with_cut_sums(steps: Sequence[Segment | Streamed | fx.Node], costs: list[_Cost],
                   cuts: dict[int, Cuts]) -> list[_Cost]:
    """Add each cut's gradient sum (of the streamed statistics' input, see ``plan.gradient_cuts``): alive in
    backward from the last recomputation that adds into it to the statistics' own step (again where its rows are
    reused in backward: ``Streamed.reuse``); and, where the input is kept through forward (``Streamed.keep``),
    the input itself in forward, from that step to the last reader."""
    last = last_cut_readers(steps, cuts)
    extra, kept = [0] * len(costs), [0] * len(costs)
    for first, step in enumerate(steps):
        if isinstance(step, Streamed) and id(step) in last:
            for i in range(first, last[id(step)] + 1):
                extra[i] += _bytes(step.prefix.outputs[0]) * (2 if step.reuse else 1)
                kept[i] += _bytes(step.prefix.outputs[0]) if step.keep else 0
    return [replace(c, forward=c.forward + k, backward=c.backward + e) if e else c
            for c, e, k in zip(costs, extra, kept, strict=True)]


def _with_row_input_grads(steps: Sequence[Segment | Streamed | fx.Node], costs: list[_Cost],
                          pieces: dict[fx.Node, int] | None = None) -> list[_Cost]:
    """Add the gradient of each value read in rows (by recomputed segments and streamed statistics): one sum for
    all its readers (see ``executor._Anchors``), alive in backward from its last reader to its first. A value
    handed on in ``pieces`` (by count) lets go of a piece as its gradient grows by one: beside the value, which
    is held, only the two pieces a band's rows may straddle."""
    pieces = pieces or {}
    span: dict[fx.Node, tuple[int, int]] = {}
    for i, step in enumerate(steps):
        segment = step_segment(step)
        if segment is not None:
            for u in _row_inputs(segment):
                first, _ = span.get(u, (i, i))
                span[u] = (first, i)
    extra = [0] * len(costs)
    for u, (first, last) in span.items():
        grad = _bytes(u) * min(1.0, 2 / pieces[u]) if u in pieces else _bytes(u)
        for i in range(first, last + 1):
            extra[i] += int(grad)
    return [replace(c, backward=c.backward + e) if e else c for c, e in zip(costs, extra, strict=True)]


def _row_inputs(segment: Segment) -> set[fx.Node]:
    return {u for b in segment.bands for u, _ in b.inputs if u.op != "placeholder"}


def breakdown(plan: Plan) -> Breakdown:
    """The estimated peak of ``plan`` split into its parts (see :class:`Breakdown`)."""
    steps = [(s.name, c) for s, c in zip(*_costs(plan), strict=True)]
    best = Breakdown(0, "forward", "-", 0, 0, 0, 0, 0)
    held = 0
    for name, c in steps:
        if held + c.forward > best.peak:
            best = Breakdown(held + c.forward, "forward", name, 0, held, 0, c.forward, 0)
        held += c.held
    grads = 0
    for name, c in reversed(steps):
        grads += c.grads
        if held + grads + c.backward > best.peak:
            best = Breakdown(held + grads + c.backward, "backward", name, grads, held, c.band, c.backward - c.band, 0)
        held -= c.held
    inputs = sum(_bytes(v) for v in plan.graph.nodes if v.op == "placeholder")
    return Breakdown(**{**best.__dict__, "input": inputs})


def estimate_plain(plan: Plan) -> int:
    """Estimated peak of the same step run as usual (every node on full tensors, nothing recomputed)."""
    return _peak([_node_cost(v, plan, set()) for v in plan.graph_nodes()])


def segments_peak(segments: Sequence[Segment], param_grads: dict[fx.Node, int]) -> int:
    """Estimated peak of a training step through ``segments`` alone (the planner compares cuts with it)."""
    captured = {u for s in segments for v in s.nodes for u in v.all_input_nodes}
    return _peak(_with_row_input_grads(segments, [_segment_cost(s, param_grads, captured) for s in segments]))


def _step_peaks(costs: Sequence[_Cost]) -> list[int]:
    peaks = [0] * len(costs)
    held = 0
    for i, c in enumerate(costs):
        peaks[i] = held + c.forward
        held += c.held
    grads = 0
    for i in reversed(range(len(costs))):
        grads += costs[i].grads
        peaks[i] = max(peaks[i], held + grads + costs[i].backward)
        held -= costs[i].held
    return peaks


def _peak(costs: Sequence[_Cost]) -> int:
    return max(_step_peaks(costs), default=0)


def _bytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    return int(val.numel() * val.element_size()) if isinstance(val, Tensor) else 0


def _saved(node: fx.Node) -> tuple[int, int]:
    """(bytes of the output autograd saves, bytes of the node's own saved buffers); all of it when unknown."""
    if "saved_output" not in node.meta:
        return _bytes(node), 0
    return int(node.meta["saved_output"]), int(node.meta["saved_internal"])


def _tensor_inputs(node: fx.Node) -> Iterable[fx.Node]:
    return (u for u in node.all_input_nodes if u.op != "placeholder" and hasattr(u.meta.get("val"), "numel"))


def _node_cost(node: fx.Node, plan: Plan, captured: set[fx.Node]) -> _Cost:
    output, internal = _saved(node)
    held = (_bytes(node) if output or node in captured else 0) + internal
    grads_through = _bytes(node) + sum(_bytes(u) for u in _tensor_inputs(node))
    return _Cost(held, _bytes(node), grads_through, plan.param_grads.get(node, 0))


def _band_rows(band: Band, node: fx.Node) -> int:
    return len(band.rows[node])


def _segment_cost(segment: Segment, param_grads: dict[fx.Node, int], captured: set[fx.Node],
                  streamed: bool = False, frozen: frozenset[fx.Node] = frozenset()) -> _Cost:
    """A recomputed segment's cost; ``streamed``: the prefix of streamed statistics (its output is never
    materialised, only reduced band by band; its parameter gradients are counted where the prefix runs again);
    ``frozen``: nodes it recomputes without autograd (they save nothing and pass no gradient). Remembered on the
    segment for the same bands, nodes, outputs and arguments (the entry holds the bands, so their ids stay
    theirs; the planner clears it when the plan is built)."""
    key = (tuple(map(id, segment.bands)), tuple(segment.nodes), tuple(segment.outputs), id(param_grads),
           frozenset(o for o in segment.outputs if o in captured), streamed, frozen)
    if key not in segment.costs:
        segment.costs[key] = (segment.bands, _new_segment_cost(segment, param_grads, captured, streamed, frozen))
    return segment.costs[key][1]


def _new_segment_cost(segment: Segment, param_grads: dict[fx.Node, int], captured: set[fx.Node],
                      streamed: bool = False, frozen: frozenset[fx.Node] = frozenset()) -> _Cost:
    outputs = 0 if streamed else sum(_bytes(o) for o in segment.outputs)
    held_outputs = 0 if streamed else sum(_bytes(o) for o in segment.outputs if _saved(o)[0] or o in captured)
    held = held_outputs + sum(row_bytes(v) * len(rows) for b in segment.bands for v, rows in b.carry_out)
    inside = set(segment.nodes)
    row_inputs = _row_inputs(segment)
    whole_inputs = {u for v in segment.nodes for u in _tensor_inputs(v) if u not in inside} - row_inputs
    # gradients of the segment inputs: a whole input's running sum plus one band's contribution (the row inputs'
    # sums are added over all their readers: see _with_row_input_grads)
    input_grads = 2 * sum(_bytes(u) for u in whole_inputs)
    band_fwd = band_bwd = 0
    for band in segment.bands:
        costs = _band_costs(segment, band, inside, frozen)
        band_fwd = max(band_fwd, max((c.forward for c in costs), default=0))
        rows_in = sum(row_bytes(u) * len(rows) for u, rows in band.inputs if u in row_inputs)
        band_bwd = max(band_bwd, rows_in + _peak(costs))
    grads = 0 if streamed else sum(param_grads.get(v, 0) for v in segment.nodes)
    # from the second band on, a weight gradient is made and summed out of place into the one before
    accumulate = 2 * max((param_grads.get(v, 0) for v in segment.nodes), default=0) if len(segment.bands) > 1 else 0
    # forward: the output pieces, then their concatenation. Backward: the output gradient, the input gradients
    # and one band, recomputed, with its gradients (its input rows' included) and a weight gradient. The
    # outputs themselves died with the backward of the steps that read them.
    forward = outputs + max(band_fwd, outputs if len(segment.bands) > 1 else 0)
    backward = outputs + input_grads + band_bwd + accumulate - held_outputs
    return _Cost(held, forward, backward, grads, band_bwd)


def _band_costs(segment: Segment, band: Band, inside: set[fx.Node],
                frozen: frozenset[fx.Node] = frozenset()) -> list[_Cost]:
    """One band's nodes as steps: what each saves when recomputed, makes in forward and passes in backward
    (remembered on the band: a band belongs to one segment, and planning estimates the same bands often)."""
    if frozen not in band.costs:
        band.costs[frozen] = _band_node_costs(segment, band, inside, frozen)
    return band.costs[frozen]


def _band_node_costs(segment: Segment, band: Band, inside: set[fx.Node], frozen: frozenset[fx.Node]) -> list[_Cost]:
    costs = []
    for v in segment.nodes:
        rows = _band_rows(band, v)
        if not rows:
            continue
        made = row_bytes(v) * rows
        if v in frozen:  # no autograd: its value lives until its readers ran (the band's largest transient)
            costs.append(_Cost(0, made, 0, 0))
            continue
        output, internal = _saved(v)
        saved = (row_bytes(v) * rows if output else 0) + internal * rows // max(1, v.meta["val"].shape[row_dim(v)])
        through = made + sum(row_bytes(u) * _band_rows(band, u) for u in v.all_input_nodes if u in inside)
        costs.append(_Cost(saved, made, through, 0))
    return costs


def _extra_compute(plan: Plan) -> float:
    """Activation bytes computed in forward (bands with their halos, and the passes of streamed statistics, which
    run their prefix again in backward) over the plain model's."""
    work = once = 0.0
    for s in plan.steps:
        if isinstance(s, Segment) and s.recompute:
            once += sum(_bytes(v) for v in s.nodes)
            work += sum(row_bytes(v) * _band_rows(b, v) for b in s.bands for v in s.nodes)
        elif isinstance(s, Streamed):
            work += 2 * sum(row_bytes(v) * _band_rows(b, v) for b in s.prefix.bands for v in s.prefix.nodes)
    return work / max(once, 1.0)
