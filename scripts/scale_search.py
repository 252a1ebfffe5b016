"""Largest image side that trains under a memory budget: the plain model against row-centric plans.

For each network, budget and method (the plain model, and 2PS/OverL at the given band counts) a binary search
over the image side (multiples of --step) finds the largest side whose *estimated* training-step peak, plus the
float32 input itself, fits the budget (``lightning_lrcnn.estimate``; measured within 2% at 8192² and 16384², see
``scripts/gigapixel.py``). Nothing is allocated: the planner sees a broadcast input of the full shape. With
--verify the found sides under the smallest budget are then *measured* (one training step each, live tensor
bytes on CPU, the input counted): the plain model at its side, and the best row-centric plan at --verify-side
(default: its own largest side).

    python scripts/scale_search.py --models vgg16,resnet50 --budgets-gib 2,16,80
    python scripts/scale_search.py --models vgg16 --budgets-gib 2 --methods plain,overl:48 --verify
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

GIB = 1024 * MIB


def _parse(method: str) -> tuple[str, int]:
    """("plain", 1) or (mode, rows) from "mode:rows"."""
    mode, _, rows = method.partition(":")
    return mode, int(rows or 1)


def _input_bytes(batch: int, side: int) -> int:
    return batch * 3 * side * side * 4


def estimated_peak(model: torch.nn.Module, method: str, side: int, batch: int) -> int:
    """Estimated training-step peak of ``method`` ("plain" or "mode:rows") at ``side``, the float32 input
    included. Nothing is run or allocated (the planner only reads shapes)."""
    x = torch.empty(1, 3, 1, 1).expand(batch, 3, side, side)
    mode, rows = _parse(method)
    to_row_centric(model, mode="2ps" if mode == "plain" else mode, rows=rows)
    try:
        plan = plan_for(model, x)
        return _input_bytes(batch, side) + (estimate_plain(plan) if mode == "plain" else estimate(plan).peak_bytes)
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
    return lo * step


def measured_peak(model: torch.nn.Module, method: str, side: int, batch: int) -> tuple[int, float]:
    """Measured peak of one training step (the input counted) and its seconds."""
    x = torch.randn(batch, 3, side, side)
    mode, rows = _parse(method)
    if mode != "plain":
        to_row_centric(model, mode=mode, rows=rows)
        plan_for(model, x)  # plan first: planning is not part of a training step
    try:
        m = measure(_step(model, x))
        return m.peak_bytes + x.numel() * x.element_size(), m.seconds
    finally:
        restore(model)
        model.zero_grad(set_to_none=True)


def render(records: list[dict]) -> str:
    """Markdown table of the latest search per network and budget."""
    latest: dict[tuple[str, float], dict] = {}
    for r in records:
        if "budget_gib" in r:
            latest[(r["model"], r["budget_gib"])] = r
    lines = ["| network | budget | plain side | best plan | its side | side / plain | pixels / plain |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for (model, budget), r in sorted(latest.items()):
        sides = r["estimated_sides"]
        best = max((m for m in sides if m != "plain"), key=lambda m: sides[m])
        ratio = sides[best] / max(1, sides["plain"])
        lines.append(f"| {model} | {budget:g} GiB | {sides['plain']} | {best} | {sides[best]} | {ratio:.1f}× | "
                     f"{ratio * ratio:.0f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg16,resnet50", help="comma-separated: vgg16, resnet50")
    parser.add_argument("--budgets-gib", default="2,16,80", help="comma-separated memory budgets in GiB")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--methods", default="plain,overl:32,overl:64,overl:128,2ps:64")
    parser.add_argument("--step", type=int, default=64, help="side granularity")
    parser.add_argument("--max-side", type=int, default=131072)
    parser.add_argument("--verify", action="store_true",
                        help="measure the found sides under the smallest budget (slow at large sides)")
    parser.add_argument("--verify-side", type=int, default=0, help="side to measure the best plan at (0: its own)")
    parser.add_argument("--render", action="store_true", help="only print the table of recorded searches")
    args = parser.parse_args(argv)
    store = DOCS / "scale.jsonl"
    if args.render:
        print(render([json.loads(line) for line in store.read_text().splitlines() if line.strip()]))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "plain" not in methods:
        methods.insert(0, "plain")
    budgets = sorted(float(b) for b in args.budgets_gib.split(","))
    records = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model = build(name)
        for budget in budgets:
            started = time.perf_counter()
            sides = {m: largest_side(model, m, int(budget * GIB), args.batch, args.step, args.max_side)
                     for m in methods}
            record: dict[str, object] = {
                "kind": "scale_search", "model": name, "batch": args.batch, "budget_gib": budget,
                "input": "float32, counted", "date": time.strftime("%Y-%m-%dT%H:%M"), "torch": torch.__version__,
                "estimated_sides": sides, "search_seconds": time.perf_counter() - started}
            best = max((m for m in methods if m != "plain"), key=lambda m: sides[m], default=None)
            print(f"[scale] {name} under {budget:g} GiB (estimated, input counted): {sides}", flush=True)
            if args.verify and best is not None and budget == budgets[0]:
                peak, secs = measured_peak(model, "plain", sides["plain"], args.batch)
                record["plain_measured"] = {"side": sides["plain"], "peak_mib": peak / MIB, "seconds": secs}
                print(f"[scale] plain at {sides['plain']}: measured {peak / MIB:.0f} MiB ({secs:.0f} s)", flush=True)
                side = args.verify_side or sides[best]
                peak, secs = measured_peak(model, best, side, args.batch)
                record["best_measured"] = {"method": best, "side": side, "peak_mib": peak / MIB, "seconds": secs,
                                           "fits": peak <= budget * GIB}
                print(f"[scale] {best} at {side}: measured {peak / MIB:.0f} MiB ({secs:.0f} s), "
                      f"{'fits' if peak <= budget * GIB else 'does NOT fit'}", flush=True)
            with store.open("a") as f:
                f.write(json.dumps(record) + "\n")
            records.append(record)
    print(render(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
