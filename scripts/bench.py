"""Benchmark row-centric training against the plain model and its peers, in one run per configuration.

For each model, resolution and batch size it measures one training step (forward + backward) of: the plain
model, ``torch.utils.checkpoint.checkpoint_sequential`` (4 segments), lightstream's StreamingCNN (when
installed and the network is a conv/pool trunk), 2PS and OverL at several band counts, and auto. It reports
the peak memory and step time as ratios to the plain model measured in the same run, the planner's
estimate next to the measured peak, and whether the gradients match the plain model. Records are appended
to ``docs/benchmarks.jsonl``; ``docs/benchmarks.md`` and the plots in ``docs/img/`` are rebuilt from all
records.

    python scripts/bench.py --model vgg16 --sizes 896 --batch 2
    python scripts/bench.py --model resnet50 --sizes 1024 --batch 2 --methods plain,checkpoint,2ps:16,overl:16
    python scripts/bench.py --render        # only rebuild the markdown and plots
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from lightning_lrcnn import to_row_centric
from lightning_lrcnn.auto import choose_plan
from lightning_lrcnn.convert import plan_for
from lightning_lrcnn.estimate import estimate
from lightning_lrcnn.memory import MIB, measure, time_call

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DEFAULT_METHODS = "plain,checkpoint,lightstream,2ps:8,2ps:16,overl:16,overl:32,auto"


def build(name: str) -> nn.Module:
    """The benchmark networks (random init): VGG-16 features, or ResNet-50 with frozen BN as a Sequential."""
    torch.manual_seed(0)
    if name == "vgg16":
        return torchvision.models.vgg16(weights=None).features
    if name == "resnet50":
        m = torchvision.models.resnet50(weights=None)
        seq = nn.Sequential(*list(m.children())[:-1], nn.Flatten(), m.fc)
        return _freeze_bn(seq)
    raise SystemExit(f"error: --model must be vgg16 or resnet50, got {name!r}")


def _freeze_bn(model: nn.Module) -> nn.Module:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def _step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(x).float().sum().backward()

    return run


def _lightstream_step(model: nn.Module, x: torch.Tensor, tile: int) -> Callable[[], None]:
    from lightstream.core.scnn.scnn import StreamingCNN  # type: ignore[import-not-found]

    scnn = StreamingCNN(model, tile_shape=(1, 3, tile, tile), copy_to_gpu=False, statistics_on_cpu=False,
                        verbose=False)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        for i in range(x.shape[0]):  # StreamingCNN streams one image at a time
            image = x[i : i + 1]
            out = scnn.forward(image)
            out.requires_grad_()
            out.float().sum().backward()
            scnn.backward(image, out.grad)

    return run


def _no_inplace(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return model


def _grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def _grad_error(ref: list[torch.Tensor | None], got: list[torch.Tensor | None]) -> float:
    worst = 0.0
    for r, g in zip(ref, got, strict=True):
        if r is None or g is None:
            if r is not g:
                return math.inf
            continue
        worst = max(worst, float((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12)))
    return worst


def run_config(model_name: str, size: int, batch: int, methods: list[str], device: torch.device, repeats: int,
               auto_budget: float) -> list[dict[str, Any]]:
    plain = build(model_name).to(device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    records: list[dict[str, Any]] = []
    base: dict[str, Any] = {}
    ref_grads: list[torch.Tensor | None] = []
    for method in methods:
        started = time.perf_counter()
        print(f"[bench] {model_name} {size}x{size} batch {batch} {method} ...", end="", flush=True)
        rec: dict[str, Any] = {"model": model_name, "size": size, "batch": batch, "method": method}
        try:
            model, step, est = _prepare(method, plain, x, model_name, base, auto_budget, rec)
            step()  # warm-up (plans, caches)
            rec["seconds"] = time_call(step, device, repeats)
            rec["peak_bytes"] = measure(step, device).peak_bytes
            if method == "plain":
                ref_grads = _grads(model)
                base = dict(rec)
            rec["grad_error"] = 0.0 if method == "plain" else _grad_error(ref_grads, _grads(model))
            if est is not None:
                rec["estimate_bytes"] = est
        except Exception as exc:  # a peer that cannot run this network is reported, not fatal
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        if base and "peak_bytes" in rec:
            rec["peak_ratio"] = rec["peak_bytes"] / base["peak_bytes"]
            rec["time_ratio"] = rec["seconds"] / base["seconds"]
        records.append(rec)
        msg = rec.get("error") or (f" peak {rec['peak_bytes'] / MIB:.0f} MiB ({rec.get('peak_ratio', 1):.3f}x), "
                                   f"step {rec['seconds']:.2f} s ({rec.get('time_ratio', 1):.2f}x)")
        print(f"{msg} [{time.perf_counter() - started:.0f} s]", flush=True)
    return records


def _prepare(method: str, plain: nn.Module, x: torch.Tensor, model_name: str, base: dict[str, Any],
             auto_budget: float, rec: dict[str, Any]) -> tuple[nn.Module, Callable[[], None], int | None]:
    batchnorm = "freeze" if model_name == "resnet50" else "exact"
    if method == "plain":
        return plain, _step(plain, x), None
    if method == "checkpoint":
        model = _no_inplace(copy.deepcopy(plain))  # a checkpointed segment must not overwrite its input

        def step() -> None:
            model.zero_grad(set_to_none=True)
            out = torch.utils.checkpoint.checkpoint_sequential(model, 4, x, use_reentrant=False)
            out.float().sum().backward()

        return model, step, None
    if method == "lightstream":
        if model_name != "vgg16":
            raise RuntimeError("lightstream streams conv/pool trunks only (no BatchNorm, no residual heads)")
        model = _no_inplace(copy.deepcopy(plain))  # lightstream's backward hooks cannot see in-place activations
        return model, _lightstream_step(model, x, tile=min(x.shape[-1], 448)), None
    model = copy.deepcopy(plain)
    if method == "auto":
        if not base:
            raise RuntimeError("auto needs the plain model measured first")
        budget = int(auto_budget * base["peak_bytes"])
        choice = choose_plan([model], _step(model, x), memory_budget=budget, batchnorm=batchnorm, device=x.device)
        rec["method"] = f"auto ({choice.best}, budget {auto_budget:.0%} of plain)"
    else:
        mode, rows = method.split(":")
        to_row_centric(model, mode=mode, rows=int(rows), batchnorm=batchnorm)
    est = estimate(plan_for(model, x)).peak_bytes
    return model, _step(model, x), est


# --------------------------------------------------------------------------------------------- report


def render(records: list[dict[str, Any]]) -> None:
    """Rebuild docs/benchmarks.md and docs/img/*.png from all records."""
    (DOCS / "img").mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmarks", "",
             "One training step (forward + backward, gradients set to None first) per method, measured by "
             "`scripts/bench.py` in one run per model, resolution and batch size. Peak memory on CPU is the "
             "live tensor bytes of the step (deterministic, `lightning_lrcnn.memory.LiveTensorTracker`); on "
             "CUDA, the allocator's peak. Ratios are to the plain model of the same run. `est.` is the planner's "
             "analytic estimate; `grad err` the largest gradient difference relative to the plain model's.", ""]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        device = r["device_name"] + (f", {r['precision']}" if "precision" in r else "")
        groups.setdefault((device, r["model"], r["size"], r["batch"], r["date"]), []).append(r)
    for (device, model, size, batch, date), rows in groups.items():
        lines += [f"## {model}, {size}x{size}, batch {batch} — {device} ({date}, torch {rows[0]['torch']})", ""]
        if rows[0].get("note"):
            lines += [rows[0]["note"], ""]
        lines += [
                  "| method | peak MiB | peak / plain | step s | time / plain | est. MiB | grad err |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['method']} | — | — | — | — | — | {r['error']} |")
                continue
            est = f"{r['estimate_bytes'] / MIB:.0f}" if "estimate_bytes" in r else "—"
            lines.append(f"| {r['method']} | {r['peak_bytes'] / MIB:.0f} | {r.get('peak_ratio', 1):.3f} | "
                         f"{r['seconds']:.2f} | {r.get('time_ratio', 1):.2f} | {est} | {r.get('grad_error', 0):.1e} |")
        lines.append("")
    lines += ["Reproduce: `python scripts/bench.py --model vgg16 --sizes 896 --batch 2` (see the script's help).", ""]
    (DOCS / "benchmarks.md").write_text("\n".join(lines))
    _plots(records)


def _plots(records: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(r: dict[str, Any]) -> str:  # method, and the GPU where not measured on a CPU
        method = r["method"].split(" (")[0]
        return method if r["device_name"].startswith("CPU") else f"{method}, {r['device_name'].replace('NVIDIA ', '')}"

    ok = [r for r in records if "peak_bytes" in r]
    for model in sorted({r["model"] for r in ok}):
        rows = [r for r in ok if r["model"] == model]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in sorted({label(r) for r in rows}):
            pts = sorted((r["size"], r["peak_bytes"] / MIB) for r in rows if label(r) == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="--" if ", " in name else "-",
                    label=name)
        ax.set(xlabel="image side (pixels)", ylabel="peak memory of one step (MiB)", yscale="log",
               title=f"{model}: memory vs resolution")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(DOCS / "img" / f"memory_vs_resolution_{model}.png", dpi=100)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            if "peak_ratio" in r:
                ax.scatter(r["time_ratio"], r["peak_ratio"], s=30)
                ax.annotate(f"{label(r)} {r['size']}", (r["time_ratio"], r["peak_ratio"]), fontsize=7)
        ax.set(xlabel="step time / plain", ylabel="peak memory / plain", title=f"{model}: memory–time trade-off")
        fig.tight_layout()
        fig.savefig(DOCS / "img" / f"memory_time_{model}.png", dpi=100)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg16", help="vgg16 or resnet50")
    parser.add_argument("--sizes", default="896", help="comma-separated image sides")
    parser.add_argument("--batch", type=int, default=2, help="batch size")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per method (median)")
    parser.add_argument("--auto-budget", type=float, default=0.15, help="auto's budget as a fraction of plain")
    parser.add_argument("--render", action="store_true", help="only rebuild docs from docs/benchmarks.jsonl")
    args = parser.parse_args(argv)
    store = DOCS / "benchmarks.jsonl"
    DOCS.mkdir(exist_ok=True)
    if not args.render:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if methods[0] != "plain":
            methods.insert(0, "plain")
        device = torch.device(args.device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        meta = {"device_name": name, "torch": torch.__version__,
                "date": datetime.datetime.now().isoformat(timespec="minutes")}
        if device.type == "cpu" and os.environ.get("MALLOC_MMAP_MAX_") == "0":
            meta["note"] = ("Timed with glibc keeping freed memory (`MALLOC_MMAP_MAX_=0`, `MALLOC_TRIM_THRESHOLD_` "
                            "large), as `scripts/backbones.py` does: no step pays for page-faulting fresh buffers in.")
        if device.type == "cuda":
            meta["precision"] = "TF32 convolutions (PyTorch default)" if torch.backends.cudnn.allow_tf32 \
                else "fp32 (TF32 off)"
        for size in (int(s) for s in args.sizes.split(",")):
            for rec in run_config(args.model, size, args.batch, methods, device, args.repeats, args.auto_budget):
                with store.open("a") as f:
                    f.write(json.dumps({**meta, **rec}) + "\n")
    records = [json.loads(line) for line in store.read_text().splitlines() if line.strip()] if store.exists() else []
    render(records)
    print(f"wrote {DOCS / 'benchmarks.md'} ({len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
