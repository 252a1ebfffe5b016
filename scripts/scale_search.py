"""Largest image side that trains under a memory budget: the plain model against row-centric plans.

For each method (the plain model, and 2PS/OverL at the given band counts) a binary search over the image side
(multiples of --step) finds the largest side whose *estimated* training-step peak (``lightning_lrcnn.estimate``,
within about 10% of measurements) fits the budget. With --verify the found sides are then *measured* (one
training step each, live tensor bytes on CPU): the plain model at its side, and the best row-centric plan at
--verify-side (default: 4x the plain side), so the reported ratio rests on measurements, not the estimate.

    python scripts/scale_search.py --budget-mib 2048 --methods plain,overl:32,overl:64,2ps:64 --verify
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import DOCS, _step, build  # noqa: E402

from lightning_lrcnn import restore, to_row_centric  # noqa: E402
from lightning_lrcnn.convert import plan_for  # noqa: E402
from lightning_lrcnn.estimate import estimate, estimate_plain  # noqa: E402
from lightning_lrcnn.memory import MIB, measure  # noqa: E402


def _parse(method: str) -> tuple[str, int]:
    """("plain", 1) or (mode, rows) from "mode:rows"."""
    mode, _, rows = method.partition(":")
    return mode, int(rows or 1)


def estimated_peak(model: torch.nn.Module, method: str, side: int, batch: int) -> int:
    """Estimated training-step peak of ``method`` ("plain" or "mode:rows") at ``side`` (nothing is run)."""
    x = torch.empty(batch, 3, side, side)
    mode, rows = _parse(method)
    to_row_centric(model, mode="2ps" if mode == "plain" else mode, rows=rows)
    try:
        plan = plan_for(model, x)
        return estimate_plain(plan) if mode == "plain" else estimate(plan).peak_bytes
    finally:
        restore(model)


def largest_side(model: torch.nn.Module, method: str, budget: int, batch: int, step: int, hi: int) -> int:
    """Largest multiple of ``step`` up to ``hi`` whose estimated peak fits ``budget`` (0 if none)."""
    lo, hi = 0, hi // step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimated_peak(model, method, mid * step, batch) <= budget:
            lo = mid
        else:
            hi = mid - 1
        print(f"[scale] {method}: side {mid * step} -> {'fits' if lo == mid else 'over'}", flush=True)
    return lo * step


def measured_peak(model: torch.nn.Module, method: str, side: int, batch: int) -> tuple[int, float]:
    x = torch.randn(batch, 3, side, side)
    mode, rows = _parse(method)
    if mode != "plain":
        to_row_centric(model, mode=mode, rows=rows)
        plan_for(model, x)  # plan first: planning is not part of a training step
    try:
        m = measure(_step(model, x))
        return m.peak_bytes, m.seconds
    finally:
        restore(model)
        model.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg16", help="vgg16 or resnet50")
    parser.add_argument("--budget-mib", type=float, default=2048.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--methods", default="plain,overl:32,overl:64,2ps:64")
    parser.add_argument("--step", type=int, default=32, help="side granularity")
    parser.add_argument("--max-side", type=int, default=12288)
    parser.add_argument("--verify", action="store_true", help="measure the found sides (slow at large sides)")
    parser.add_argument("--verify-side", type=int, default=0, help="side to measure the best plan at (0: 4x plain)")
    args = parser.parse_args(argv)
    budget = int(args.budget_mib * MIB)
    model = build(args.model)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "plain" not in methods:
        methods.insert(0, "plain")
    record: dict[str, object] = {"model": args.model, "batch": args.batch, "budget_mib": args.budget_mib,
                                 "date": time.strftime("%Y-%m-%dT%H:%M"), "torch": torch.__version__}
    sides = {m: largest_side(model, m, budget, args.batch, args.step, args.max_side) for m in methods}
    record["estimated_sides"] = sides
    best = max((m for m in methods if m != "plain"), key=lambda m: sides[m], default=None)
    print(f"[scale] estimated largest sides under {args.budget_mib:.0f} MiB: {sides}", flush=True)
    if args.verify and best is not None:
        peak, secs = measured_peak(model, "plain", sides["plain"], args.batch)
        record["plain_measured"] = {"side": sides["plain"], "peak_mib": peak / MIB, "seconds": secs}
        print(f"[scale] plain at {sides['plain']}: measured {peak / MIB:.0f} MiB ({secs:.0f} s)", flush=True)
        side = args.verify_side or 4 * sides["plain"]
        peak, secs = measured_peak(model, best, side, args.batch)
        record["best_measured"] = {"method": best, "side": side, "peak_mib": peak / MIB, "seconds": secs,
                                   "fits": peak <= budget, "side_ratio": side / max(1, sides["plain"])}
        print(f"[scale] {best} at {side} ({side / max(1, sides['plain']):.2f}x the plain side): measured "
              f"{peak / MIB:.0f} MiB ({secs:.0f} s), {'fits' if peak <= budget else 'does NOT fit'}", flush=True)
    with (DOCS / "scale.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
