"""The plan's data: steps (global nodes and banded segments), bands and the row bytes they are costed by.

Built by :mod:`lightning_lrcnn.planner`, costed by :mod:`lightning_lrcnn.estimate`, run by
:mod:`lightning_lrcnn.executor`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from .geometry import RowInterval
from .norms import batch_statistics
from .rules import NodeRule, row_dim

__all__ = ["Band", "Segment", "Streamed", "Step", "Plan", "Cuts", "gradient_cuts", "frozen_nodes", "last_cut_readers",
           "handed_in_pieces", "describe", "row_bytes", "step_nodes", "step_reads", "step_outputs", "step_segment"]


@dataclass
class Band:
    """One band of a segment: the rows each node computes and the boundary rows it hands on (2PS)."""

    rows: dict[fx.Node, RowInterval]  # rows computed per node (OverL: halo included)
    outputs: list[tuple[fx.Node, RowInterval]]  # (segment output, its rows produced by this band)
    carry_in: list[tuple[fx.Node, RowInterval]]  # 2PS: boundary rows received from earlier bands
    carry_out: list[tuple[fx.Node, RowInterval]]  # 2PS: boundary rows handed to later bands
    release: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)  # after node: values no longer read
    inputs: list[tuple[fx.Node, RowInterval]] = field(default_factory=list)  # rows read of row inputs from outside
    costs: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)  # the estimate's, remembered


@dataclass
class Segment:
    """A run of row-local nodes executed band by band; its outputs are materialised in full."""

    nodes: list[fx.Node]
    rules: dict[fx.Node, NodeRule]
    outputs: list[fx.Node]
    mode: str
    bands: list[Band] = field(default_factory=list)
    overlap: float = 0.0  # fraction of activation bytes computed more than once (OverL halos)
    recompute: bool = True  # False: one full band kept for backward like the plain model (no recomputation)
    costs: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)  # the estimate's, while planning

    @property
    def name(self) -> str:
        return f"{self.nodes[0].name}..{self.nodes[-1].name}"


@dataclass
class Streamed:
    """Train-mode BatchNorm statistics (or a mean over the image) accumulated band by band: ``prefix``
    recomputes the statistics' input
    from materialised values (its one output), so that input is never kept whole; its backward recomputes
    the bands again. Sets ``outputs`` (the statistics' mean and ``rsqrt(var + eps)``)."""

    stats: fx.Node  # the batch_statistics node, or a mean over the image (a squeeze-excitation squeeze)
    outputs: list[fx.Node]  # what the step sets: the statistics' getitem readers (mean, rstd), or the mean
    prefix: Segment  # OverL bands whose one output is ``stats``' input
    cut: bool = False  # later recomputations of the prefix stop their backward at its input (gradient_cuts)
    keep: bool = False  # with ``cut``: its input is kept whole through forward; cut readers read it in forward
    reuse: bool = False  # with ``cut``: the first recomputation in backward keeps its input's rows for the rest

    @property
    def batch_norm(self) -> bool:
        """Train-mode BatchNorm statistics (mean and rstd), not a mean over the image."""
        return self.stats.target is batch_statistics

    @property
    def nodes(self) -> list[fx.Node]:
        return [self.stats, *(o for o in self.outputs if o is not self.stats)]

    @property
    def name(self) -> str:
        return f"{self.stats.name} (streamed over {self.prefix.name})"


Step = fx.Node | Segment | Streamed


@dataclass
class Plan:
    """Executable plan for one input shape: steps in order, static values and when env entries die."""

    steps: list[Step]
    static: dict[fx.Node, Any]
    free_after: list[list[fx.Node]]
    graph: fx.Graph
    param_grads: dict[fx.Node, int] = field(default_factory=dict)  # bytes of the trainable parameters a node uses
    plain_reason: str = ""  # why the module runs as usual for this shape ("" when it runs row-centric)

    @property
    def segments(self) -> list[Segment]:
        return [s for s in self.steps if isinstance(s, Segment)]

    def graph_nodes(self) -> list[fx.Node]:
        """Every graph node some step runs, once each, in graph order (what the plain model runs)."""
        order = {v: i for i, v in enumerate(self.graph.nodes)}
        seen = {v: None for step in self.steps for v in step_nodes(step)}
        return sorted(seen, key=order.__getitem__)


def step_nodes(step: Step) -> list[fx.Node]:
    """The graph nodes a step computes (a streamed step: its statistics; its prefix's nodes run again later)."""
    return [step] if isinstance(step, fx.Node) else step.nodes


def step_reads(step: Step) -> list[fx.Node]:
    """The values a step reads from before it (its nodes' inputs made outside it)."""
    nodes = [*step.prefix.nodes, *step.nodes] if isinstance(step, Streamed) else step_nodes(step)
    inside = set(nodes)
    return list({u: None for v in nodes for u in v.all_input_nodes if u not in inside})


def step_outputs(step: Step) -> list[fx.Node]:
    """The values a step leaves for later steps."""
    return [step] if isinstance(step, fx.Node) else step.outputs


def step_segment(step: Step) -> Segment | None:
    """The bands a step runs: a segment's own, a streamed step's prefix; None for a node."""
    return step.prefix if isinstance(step, Streamed) else step if isinstance(step, Segment) else None


@dataclass(frozen=True)
class Cuts:
    """Where a recomputed segment's backward stops (see :func:`gradient_cuts`)."""

    at: tuple[Streamed, ...]  # streamed statistics whose input gradient the segment adds into their sum
    frozen: frozenset[fx.Node]  # their prefixes' nodes: recomputed without autograd


def gradient_cuts(plan: Plan) -> dict[int, Cuts]:
    """Per recomputed segment (by ``id``; a streamed step's prefix included), the streamed statistics it can stop
    its backward at.

    # NOTE [ Gradient cuts ]
    # A segment after streamed statistics recomputes their whole prefix to make the statistics' input ``x``
    # (chained BatchNorms: a bottleneck's third statistics' prefix holds the first two's). Backpropagating
    # through that prefix again would repeat what the statistics' own backward does anyway: it runs the prefix
    # once more, band by band, for the statistics' gradient. So the segment computes the prefix without
    # autograd and adds the gradient of ``x``'s rows into one sum of ``x``'s size, which the statistics'
    # backward (run later: it waits for every reader) adds to its own gradient of ``x`` before its one pass
    # through the prefix. Valid where the segment computes the whole prefix, reads nothing of it but ``x``,
    # and leaves none of it to later steps. The sum costs ``x``'s bytes through part of backward: the planner
    # sets ``Streamed.cut`` only where the estimated peak does not rise.
    # In forward the same readers (later statistics' passes, the segment) recompute the prefix only to make
    # ``x``'s rows: with ``Streamed.keep`` the statistics' own pass keeps ``x`` whole until the last of them
    # has run forward, and they read its rows instead (no autograd runs there, so checkpoint's recomputation in
    # backward, which recomputes the prefix from its inputs, saves the same tensors). A chain of BatchNorms
    # then runs each convolution once in forward, as the plain model does. With ``Streamed.reuse`` the same
    # holds in backward: the first recomputation that makes ``x``'s rows (the segment's) keeps them, and later
    # statistics' backward passes read them instead of running the prefix that makes them.
    """
    # Where the segment also reads a value inside a prefix other than through ``x`` (a recomputed tail, see NOTE
    # [ Recomputed tails ] in the planner: the next block's residual add reads the block output that its first
    # convolution reads too), that value and what makes it keep autograd; the rest of the prefix is frozen.
    streamed: list[tuple[Streamed, fx.Node, set[fx.Node]]] = []  # the cut ones before this step
    cuts: dict[int, Cuts] = {}
    for step in plan.steps:
        segment = step_segment(step)
        if streamed and segment is not None and segment.recompute:
            inside, leaves = set(segment.nodes), set(segment.outputs)
            valid = [s for s, x, prefix in streamed if x in inside and prefix <= inside and not prefix & leaves]
            top = tuple(s for s in valid
                        if not any(s.prefix.outputs[0] in t.prefix.nodes for t in valid if t is not s))
            if top:
                cuts[id(segment)] = Cuts(top, _without_autograd(top, inside))
        if isinstance(step, Streamed) and step.cut:
            streamed.append((step, step.prefix.outputs[0], set(step.prefix.nodes)))
    return cuts


def _without_autograd(top: Sequence[Streamed], inside: set[fx.Node]) -> frozenset[fx.Node]:
    """The nodes of ``top``'s prefixes a segment of ``inside`` can compute without autograd: all but those it also
    reads other than through a statistics' input (and what makes them, back to those inputs, whose gradient goes
    into their sums however it is read)."""
    prefix = {v for s in top for v in s.prefix.nodes}
    inputs = {s.prefix.outputs[0] for s in top}
    shared = [v for v in prefix - inputs if any(u in inside and u not in prefix for u in v.users)]
    live: set[fx.Node] = set()
    while shared:
        v = shared.pop()
        if v not in live:
            live.add(v)
            shared.extend(u for u in v.all_input_nodes if u in prefix and u not in inputs)
    return frozenset(prefix - live)


def frozen_nodes(cuts: dict[int, Cuts], segment: Segment) -> frozenset[fx.Node]:
    """The nodes ``segment`` computes without autograd at the plan's ``cuts`` (none where it stops at none)."""
    return cuts[id(segment)].frozen if id(segment) in cuts else frozenset()


def last_cut_readers(steps: Sequence[Any], cuts: dict[int, Cuts]) -> dict[int, int]:
    """Per cut streamed step (by ``id``), the index in ``steps`` of the last step that stops at its cut."""
    last: dict[int, int] = {}
    for i, step in enumerate(steps):
        segment = step_segment(step)
        for s in cuts[id(segment)].at if segment is not None and id(segment) in cuts else ():
            last[id(s)] = i
    return last


def handed_in_pieces(plan: Plan, cuts: dict[int, Cuts] | None = None) -> frozenset[fx.Node]:
    """The segment outputs that stay the pieces their bands made, never joined into one tensor (``cuts``: the
    plan's :func:`gradient_cuts`, where the caller has them).

    # NOTE [ Values handed on in pieces ]
    # A value that one recomputed segment makes and that only recomputed segments read, in rows, need not be
    # joined: each reading band gets views of the pieces its rows lie in, and autograd hands each piece's
    # gradient to the band that made it. In backward the readers' bands then let go of the pieces below their
    # rows as they finish while the value's gradient grows piece by piece, instead of the whole value living
    # beside a whole gradient sum (see ``executor._Anchors``) until the last reader is done; and the maker's
    # bands free each piece's gradient as they go. Values read whole (a global op, the output), by streamed
    # statistics, or by a segment that stops its backward at gradient cuts are joined as before.
    """
    cuts = gradient_cuts(plan) if cuts is None else cuts
    made = {o for step in plan.steps if isinstance(step, Segment) and step.recompute and len(step.bands) > 1
            for o in step.outputs}
    whole: set[fx.Node] = set()
    for step in plan.steps:
        segment = step_segment(step)
        if segment is None:
            whole.update(step.all_input_nodes)  # type: ignore[union-attr]
            continue
        clean = isinstance(step, Segment) and step.recompute and id(step) not in cuts
        inside = set(segment.nodes)
        in_rows = {v for band in segment.bands for v, _ in band.inputs}
        for user in segment.nodes:
            rule = segment.rules[user]
            whole.update(v for v in user.all_input_nodes
                         if v not in inside and not (clean and v in in_rows and v in rule.row_inputs))
        if isinstance(step, Streamed):
            whole.update(step.stats.all_input_nodes)
    return frozenset(made - whole)


def row_bytes(node: fx.Node) -> int:
    """Bytes of one row (all of N, C, W) of a node's 4-D output (remembered per value: planning asks often)."""
    v, dim = node.meta["val"], row_dim(node)
    known = node.meta.get("row_bytes")
    if known is not None and known[0] is v and known[1] == dim:
        return int(known[2])
    size = int(v.numel() // max(1, v.shape[dim])) * v.element_size()
    node.meta["row_bytes"] = (v, dim, size)
    return size


def describe(plan: Plan) -> str:
    """One line per segment: nodes, bands, overlap (for logs and debugging); why a plain plan is plain."""
    if plan.plain_reason:
        return f"runs as usual: {plan.plain_reason}"
    lines = []
    for s in plan.steps:
        if isinstance(s, Segment):
            how = f"{s.mode}, {len(s.bands)} bands" if s.recompute else "kept (no recomputation)"
            lines.append(f"segment {s.name}: {len(s.nodes)} nodes, {how}, overlap {s.overlap:.2f}")
        elif isinstance(s, Streamed):
            how = (", gradient cut" + (", input kept in forward" if s.keep else "")
                   + (", rows reused in backward" if s.reuse else "")) if s.cut else ""
            lines.append(f"statistics {s.name}: {len(s.prefix.bands)} bands{how}")
    return "\n".join(lines) if lines else "no row-local region"

