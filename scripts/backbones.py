"""Savings on the backbones people train: one training step of each network, plain and row-centric.

For each network (torchvision and timm classifiers, frozen or train-mode BatchNorm, ConvNeXt, U-Nets) it
measures one training step (``y.pow(2).mean()`` loss, batch 1) of the plain model and of row-centric plans
(2PS and OverL, 16 bands by default, and the plan the callback's ``mode="auto"`` picks under a memory budget
of 0.25 of the plain model's measured peak: the fastest candidate that fits), each network in a fresh process,
and records the peak memory and step time as ratios to the plain model measured in the same process, the
planner's estimate, the largest gradient difference, and whether the plan ran plain (and why). Records are
appended to ``docs/backbones.jsonl``; ``docs/backbones.md`` and ``docs/img/backbones.png`` are rebuilt from the
latest record of each network and method.

    python scripts/backbones.py                       # every network, 1024x1024 (over 80 min on 2 CPU cores)
    python scripts/backbones.py --only tv_resnet50_train --size 512
    python scripts/backbones.py --render              # only rebuild the table and plot
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
STORE = DOCS / "backbones.jsonl"


def _tv(name: str) -> Callable[[], nn.Module]:
    import torchvision

    return lambda: getattr(torchvision.models, name)(weights=None)


def _timm(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return make


def _smp_unet() -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet(encoder_name="resnet34", encoder_weights=None, classes=2)


def _fpn_resnet50() -> nn.Module:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)


def _own_unet() -> nn.Module:
    from lightning_lrcnn.models import UNet

    return UNet(num_classes=2)


# key: (label, builder, BatchNorm: "frozen" = eval statistics via batchnorm="freeze", "train" = exact, "-" = none)
NETWORKS: dict[str, tuple[str, Callable[[], nn.Module], str]] = {
    "tv_resnet50": ("torchvision resnet50", _tv("resnet50"), "frozen"),
    "tv_resnet50_train": ("torchvision resnet50", _tv("resnet50"), "train"),
    "tv_efficientnet_b0": ("torchvision efficientnet_b0", _tv("efficientnet_b0"), "frozen"),
    "tv_densenet121": ("torchvision densenet121", _tv("densenet121"), "frozen"),
    "tv_mobilenet_v3_large": ("torchvision mobilenet_v3_large", _tv("mobilenet_v3_large"), "frozen"),
    "tv_regnet_y_800mf": ("torchvision regnet_y_800mf", _tv("regnet_y_800mf"), "frozen"),
    "tv_convnext_tiny": ("torchvision convnext_tiny", _tv("convnext_tiny"), "-"),
    "timm_convnext_tiny": ("timm convnext_tiny", _timm("convnext_tiny"), "-"),
    "timm_efficientnet_b0": ("timm efficientnet_b0", _timm("efficientnet_b0"), "frozen"),
    "timm_efficientnetv2_rw_t": ("timm efficientnetv2_rw_t", _timm("efficientnetv2_rw_t"), "frozen"),
    "timm_mobilenetv3_large_100": ("timm mobilenetv3_large_100", _timm("mobilenetv3_large_100"), "frozen"),
    "timm_cspresnet50": ("timm cspresnet50", _timm("cspresnet50"), "frozen"),
    "timm_regnety_008": ("timm regnety_008", _timm("regnety_008"), "frozen"),
    "timm_resnet50": ("timm resnet50", _timm("resnet50"), "frozen"),
    "timm_resnet50_train": ("timm resnet50", _timm("resnet50"), "train"),
    "timm_ecaresnet50d": ("timm ecaresnet50d", _timm("ecaresnet50d"), "frozen"),
    "timm_convnextv2_nano": ("timm convnextv2_nano", _timm("convnextv2_nano"), "-"),
    "timm_mambaout_femto": ("timm mambaout_femto", _timm("mambaout_femto"), "-"),
    "tv_fpn_resnet50": ("torchvision resnet50 FPN backbone (FrozenBatchNorm2d)", _fpn_resnet50, "frozen"),
    "smp_unet_resnet34": ("smp Unet (resnet34 encoder)", _smp_unet, "frozen"),
    "unet_train": ("lightning_lrcnn UNet", _own_unet, "train"),
}


# Steps are timed with glibc keeping freed memory (no mmap, no trimming), as PyTorch's caching allocator does on a
# GPU. With glibc's defaults every tensor over 32 MiB is mapped afresh and page-faulted in on every step: that
# taxes the plain model (large tensors) far more than banded steps (small ones), and on this virtual machine
# the tax itself varies (the same plain ResNet-50 step took 1.8 s to 3.6 s), which made the time ratios flatter
# the plugin. Peaks are live tensor bytes and do not depend on it.
RETAINED_HEAP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def _loss(out: Any) -> torch.Tensor:
    leaves = [v for v in torch.utils._pytree.tree_leaves(out) if isinstance(v, torch.Tensor)]  # an FPN's dict
    return sum((t.float().pow(2).mean() for t in leaves), torch.zeros(()))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _grad_error(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    """Largest parameter-gradient difference over the largest plain gradient (of any parameter): fp32 noise in
    a gradient that is analytically ~0 (a conv bias before train-mode BatchNorm) does not dominate it."""
    if ref.keys() != got.keys():
        return math.inf
    scale = max((float(r.abs().max()) for r in ref.values()), default=1.0) or 1.0
    return max((float((got[n] - r).abs().max()) for n, r in ref.items()), default=0.0) / scale


def _float64_grads(plain: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain model's parameter gradients in float64, from the same state and the same random draws (dropout
    and stochastic depth draw the same masks in either dtype on CPU): the reference that shows how much of
    ``grad_error`` is fp32's own rounding."""
    model = copy.deepcopy(plain).double()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    _loss(model(x.double())).backward()
    return {n: g.float() for n, g in _grads(model).items()}


def measure_network(key: str, size: int, methods: list[str], repeats: int) -> list[dict[str, Any]]:
    """Plain and every method on one network, in this process; one record per method.

    Step times are taken in rounds, one step of every method per round, so drift on a shared machine falls on
    all of them alike; a method's time ratio is the median over rounds of its step time over the plain step's
    in the same round; ``time_ratio_best`` is the fastest step over the plain model's fastest (slowdowns from other
    work on the machine only add time, so the fastest steps are the least disturbed)."""
    from lightning_lrcnn import choose_plan, is_row_centric, to_row_centric
    from lightning_lrcnn.convert import plan_for
    from lightning_lrcnn.estimate import estimate, estimate_plain
    from lightning_lrcnn.memory import measure

    label, make, bn = NETWORKS[key]
    torch.manual_seed(0)
    plain = make().train()
    if bn == "frozen":
        for m in plain.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    base = {"key": key, "network": label, "batchnorm": bn, "size": size, "batch": 1}
    records: dict[str, dict[str, Any]] = {}
    models: dict[str, nn.Module] = {}

    def step(model: nn.Module) -> float:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # stochastic depth and dropout draw the same numbers in every method
        started = time.perf_counter()
        _loss(model(x)).backward()
        return time.perf_counter() - started

    for method in ["plain", *methods]:
        started = time.perf_counter()
        rec = records[method] = {**base, "method": method}
        try:
            model = plain if method == "plain" else copy.deepcopy(plain)
            batchnorm = "freeze" if bn == "frozen" else "exact"
            if method.startswith("auto:"):  # what the callback picks with this budget: the fastest that fits
                budget = int(float(method.split(":")[1]) * records["plain"]["peak_bytes"])
                choice = choose_plan([model], lambda m=model: _loss(m(x)).backward(), memory_budget=budget,
                                     batchnorm=batchnorm)
                rec["chosen"], rec["budget_bytes"] = str(choice.best), budget
            elif method != "plain":
                mode, rows = method.split(":")
                to_row_centric(model, mode=mode, rows=int(rows), batchnorm=batchnorm)
            if method != "plain" and is_row_centric(model):
                plan = plan_for(model, x)
                rec["estimate_bytes"] = estimate(plan).peak_bytes
                rec["estimate_plain_bytes"] = estimate_plain(plan)
                rec["ran_plain"] = plan.plain_reason
            step(model)  # warm-up: plans, caches, the allocator's heap
            step(model)
            rec["peak_bytes"] = measure(lambda m=model: step(m)).peak_bytes
            models[method] = model
        except Exception as exc:  # a network that cannot run is reported, not fatal
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        rec["wall_s"] = round(time.perf_counter() - started, 1)
    times: dict[str, list[float]] = {method: [] for method in models}
    for _ in range(repeats):
        for method, model in models.items():
            times[method].append(step(model))
    reference = _grads(models["plain"]) if "plain" in models else {}
    exact = _float64_grads(plain, x) if "plain" in models else {}
    for method, model in models.items():
        rec = records[method]
        rec["seconds"] = statistics.median(times[method])
        grads = _grads(model)
        rec["grad_error"] = _grad_error(reference, grads)
        if exact:  # fp32's own error: what the plain model's fp32 gradients miss of its float64 ones
            rec["grad_error_fp64"] = _grad_error(exact, grads)
        if "plain" in models:
            rec["peak_ratio"] = rec["peak_bytes"] / records["plain"]["peak_bytes"]
            rec["time_ratio"] = statistics.median(t / p for t, p in zip(times[method], times["plain"], strict=True))
            rec["time_ratio_best"] = min(times[method]) / min(times["plain"])  # the fastest step of each
    for rec in records.values():
        print(json.dumps(rec), flush=True)
    return list(records.values())


# --------------------------------------------------------------------------------------------- report


def _latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest record of each network and method, at the image size of the network's latest run (each record's
    ratios are against the plain model of its own run, so methods measured in different runs can share a row)."""
    ordered = sorted(records, key=lambda r: r["date"])
    size = {r["key"]: r["size"] for r in ordered}
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for r in ordered:
        if r["size"] == size[r["key"]]:
            last[r["key"], r["method"]] = r
    return list(last.values())


def render(records: list[dict[str, Any]]) -> None:
    """Rebuild docs/backbones.md and docs/img/backbones.png from the latest record of each network and method."""
    rows = _latest(records)
    if not rows:
        return
    methods = sorted({r["method"] for r in rows if r["method"] != "plain"}, key=lambda m: (m.startswith("auto"), m))
    order = [k for k in NETWORKS if any(r["key"] == k for r in rows)]
    first = rows[0]
    lines = ["# Savings on common backbones", "",
             f"One training step (`y.pow(2).mean()` loss, batch 1, fp32) per network and method, measured by "
             f"`scripts/bench.py`'s sibling `scripts/backbones.py`, each network in its own process, on "
             f"{first['device_name']} (torch {first['torch']}"
             + (f"; allocator: {first['allocator']}, see `RETAINED_HEAP` in the script"
                if first.get("allocator") else "")
             + "). Peak: live tensor bytes of the step; each cell is "
             "`peak / plain @ time / plain` against the plain model measured in the same process (each cell: the "
             "latest run of that method; steps timed in rounds, "
             "every method once per round; the time ratio is the median over rounds of the step time over the plain "
             "step of the same round; in brackets, the fastest step over the plain model's fastest). `plain` means the "
             "plan was not estimated below the plain model, so the network ran as usual. BatchNorm: `frozen` = "
             "eval-mode statistics (`batchnorm=\"freeze\"`), `train` = exact train-mode statistics "
             "(`batchnorm=\"exact\"`, the default). `grad err`: the largest parameter-gradient difference to the plain "
             "model over its largest gradient (fp32; the tests prove exactness in float64); `fp32 err`: the same "
             "difference between the plain model in fp32 and in float64, i.e. fp32's own rounding, for scale.", "",
             "| network | BN | size | plain peak | plain step | " + " | ".join(_header(m) for m in methods)
             + " | grad err | fp32 err |",
             "|---|---|---:|---:|---:|" + "---:|" * len(methods) + "---:|---:|"]
    for key in order:
        recs = {r["method"]: r for r in rows if r["key"] == key}
        p = recs.get("plain", {})
        if "peak_bytes" not in p:
            lines.append(f"| {NETWORKS[key][0]} | {NETWORKS[key][2]} | — | — | — | " + " | ".join(
                "—" for _ in methods) + f" | {p.get('error', 'not run')} | — |")
            continue
        cells, err = [], 0.0
        for m in methods:
            r = recs.get(m, {})
            if "peak_ratio" not in r:
                cells.append(_error_cell(r.get("error", "—"), p["peak_bytes"]))
                continue
            err = max(err, r.get("grad_error", 0.0))
            best = f" ({r['time_ratio_best']:.2f}×)" if "time_ratio_best" in r else ""
            chosen = f", {r['chosen']}" if "chosen" in r else ""
            cells.append(f"{r['peak_ratio']:.3f} @ {r['time_ratio']:.2f}×{best}{chosen}"
                         + (" (plain)" if r.get("ran_plain") else ""))
        lines.append(f"| {p['network']} | {p['batchnorm']} | {p['size']}² | {p['peak_bytes'] / 2**20:.0f} MiB | "
                     f"{p['seconds']:.1f} s | " + " | ".join(cells) + f" | {err:.1e} | "
                     + (f"{p['grad_error_fp64']:.1e} |" if "grad_error_fp64" in p else "— |"))
    lines += ["", "Reproduce: `python scripts/backbones.py` (all networks, 1024²) or "
              "`python scripts/backbones.py --only tv_resnet50_train`.", ""]
    DOCS.mkdir(exist_ok=True)
    (DOCS / "backbones.md").write_text("\n".join(lines))
    _plot(rows, order, methods)
    _readme_table(rows, order)


README_METHODS = ("2ps:16", "overl:16", "auto:0.25")
_README_BN = {"frozen": "frozen", "-": "(LayerNorm)", "train": "train (streamed)"}


def _readme_table(rows: list[dict[str, Any]], order: list[str]) -> None:
    """Replace the README's table between its ``<!-- backbones -->`` markers with the latest runs' cells of
    ``README_METHODS`` (``peak / plain @ time / plain``, the auto choice in brackets)."""
    readme = ROOT / "README.md"
    text = readme.read_text() if readme.exists() else ""
    start, end = "<!-- backbones -->\n", "<!-- /backbones -->"
    if start not in text or end not in text:
        return
    lines = ["| network | BatchNorm | 2PS, 16 bands | OverL, 16 bands | auto, budget 0.25 of plain |",
             "|---|---|---:|---:|---:|"]
    for key in order:
        recs = {r["method"]: r for r in rows if r["key"] == key}
        plain = recs.get("plain", {})
        cells = []
        for m in README_METHODS:
            r = recs.get(m, {})
            if "peak_ratio" not in r:
                cells.append(_error_cell(r.get("error", "—"), plain["peak_bytes"]) if "peak_bytes" in plain else "—")
                continue
            chosen = f" ({r['chosen']})" if "chosen" in r else ""
            cells.append(f"{r['peak_ratio']:.3f} @ {r['time_ratio']:.2f}×{chosen}"
                         + (" (plain)" if r.get("ran_plain") else ""))
        label, _, bn = NETWORKS[key]
        lines.append(f"| {label} | {_README_BN.get(bn, bn)} | " + " | ".join(cells) + " |")
    before, rest = text.split(start, 1)
    readme.write_text(before + start + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])


def _error_cell(error: str, plain_peak: int) -> str:
    """A short cell for a method that did not run: for the auto choice, the smallest peak it measured."""
    found = re.search(r"smallest peak was ([0-9.]+) MiB \((\S+)\)", error)
    if error.startswith("NoPlanFitsError") and found:
        return f"none fits (smallest {float(found[1]) * 2**20 / plain_peak:.3f}, {found[2]})"
    return error[:40]


def _header(method: str) -> str:
    return f"auto, budget {method.split(':')[1]} of plain" if method.startswith("auto:") else method


def _plot(rows: list[dict[str, Any]], order: list[str], methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{NETWORKS[k][0]} ({NETWORKS[k][2]} BN)" if NETWORKS[k][2] != "-" else NETWORKS[k][0] for k in order]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.42 * len(order) + 1.6), sharey=True)
    markers = ["o", "s", "^", "D", "v"]
    for i, m in enumerate(methods):
        ys, peaks, times = [], [], []
        for j, k in enumerate(order):
            r = next((r for r in rows if r["key"] == k and r["method"] == m and "peak_ratio" in r), None)
            if r is not None:
                ys.append(j + (i - (len(methods) - 1) / 2) * 0.18)
                peaks.append(r["peak_ratio"])
                times.append(r["time_ratio"])
        left.scatter(peaks, ys, marker=markers[i % len(markers)], label=m, zorder=3)
        right.scatter(times, ys, marker=markers[i % len(markers)], label=m, zorder=3)
    left.axvline(1.0, color="grey", lw=1)
    left.axvline(0.25, color="grey", lw=1, ls="--")
    right.axvline(1.0, color="grey", lw=1)
    right.axvline(1.6, color="grey", lw=1, ls="--")
    left.set(yticks=range(len(order)), yticklabels=names, xlabel="peak memory / plain (lower is better)", xlim=(0, 1.1))
    right.set(xlabel="step time / plain")
    left.invert_yaxis()
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    left.legend(loc="lower right", fontsize=8)
    first = rows[0]
    fig.suptitle(f"One training step at {first['size']}², batch 1 ({first['device_name']}, "
                 f"{max(r['date'] for r in rows)[:10]})")
    fig.tight_layout()
    (DOCS / "img").mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS / "img" / "backbones.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated keys (default all: {', '.join(NETWORKS)})")
    parser.add_argument("--size", type=int, default=1024, help="image side (default 1024)")
    parser.add_argument("--methods", default="2ps:16,overl:16,auto:0.25",
                        help="comma-separated mode:rows, or auto:F (the callback's choice with a budget of F times the "
                             "plain model's measured peak)")
    parser.add_argument("--repeats", type=int, default=7, help="rounds of timed steps, every method once per round")
    parser.add_argument("--render", action="store_true", help="only rebuild docs from docs/backbones.jsonl")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()] or list(NETWORKS)
    unknown = [k for k in keys if k not in NETWORKS]
    if unknown:
        parser.error(f"unknown --only {unknown}; choose from {list(NETWORKS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args._child:  # one network, records on stdout
        measure_network(keys[0], args.size, methods, args.repeats)
        return 0
    if not args.render:
        meta = {"device_name": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                "allocator": "glibc, freed memory kept ("
                             + ", ".join(f"{k}={v}" for k, v in RETAINED_HEAP.items()) + ")",
                "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="minutes")}
        DOCS.mkdir(exist_ok=True)
        for key in keys:
            print(f"[backbones] {key} {args.size}² ...", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--_child", "--only", key, "--size", str(args.size),
                                   "--methods", ",".join(methods), "--repeats", str(args.repeats)],
                                  capture_output=True, text=True, env={**os.environ, **RETAINED_HEAP})
            got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 and not got:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                got = [{"key": key, "network": NETWORKS[key][0], "batchnorm": NETWORKS[key][2], "size": args.size,
                        "method": "plain", "error": f"process failed ({proc.returncode}): {tail[:160]}"}]
            with STORE.open("a") as f:
                for rec in got:
                    f.write(json.dumps({**meta, **rec}) + "\n")
                    if "peak_ratio" in rec or "error" in rec:
                        said = rec.get("error") or (f"{rec['peak_ratio']:.3f} of plain peak @ {rec['time_ratio']:.2f}x "
                                                    f"time (fastest {rec['time_ratio_best']:.2f}x)"
                                                    f"{' (ran plain)' if rec.get('ran_plain') else ''}")
                        print(f"  {rec['method']:>9}: {said}", flush=True)
    records = [json.loads(line) for line in STORE.read_text().splitlines() if line.strip()] if STORE.exists() else []
    render(records)
    print(f"wrote {DOCS / 'backbones.md'} and {DOCS / 'img' / 'backbones.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
