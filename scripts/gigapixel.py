"""One measured training step at gigapixel sizes: ResNet-50 (frozen BatchNorm), batch 1, row-centric.

The input is a ``uint8`` image (as ``data=large_images`` yields) and the network is
``lightning_lrcnn.models.uint8_input(resnet50)``: normalisation runs band by band inside it, so no float copy of
the input is made. Records the measured peak (live tensor bytes on CPU, allocator peak on CUDA), the planner's
estimate and its breakdown, and the step time, in ``docs/scale.jsonl``. ``--check`` first compares outputs and
gradients with the plain model at a small size.

    python scripts/gigapixel.py --side 8192 --method overl:64
    python scripts/gigapixel.py --side 16384 --method overl:64
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from lightning_lrcnn import to_row_centric
from lightning_lrcnn.convert import plan_for
from lightning_lrcnn.estimate import breakdown, estimate
from lightning_lrcnn.memory import MIB, measure
from lightning_lrcnn.models import uint8_input

DOCS = Path(__file__).resolve().parents[1] / "docs"


def network() -> nn.Module:
    torch.manual_seed(0)
    model = uint8_input(torchvision.models.resnet50(weights=None)).train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def convert(model: nn.Module, method: str) -> nn.Module:
    mode, rows = method.split(":")
    return to_row_centric(model, mode=mode, rows=int(rows), batchnorm="freeze")


def check(method: str, side: int, device: torch.device) -> float:
    """Largest gradient difference to the plain model over its largest gradient, at ``side``."""
    plain = network().to(device)
    converted = convert(copy.deepcopy(plain), method)
    x = torch.randint(0, 256, (1, 3, side, side), dtype=torch.uint8, device=device)
    grads = []
    for model in (plain, converted):
        model(x).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    scale = max(float(g.abs().max()) for g in grads[0].values())
    return max(float((grads[1][n] - g).abs().max()) for n, g in grads[0].items()) / scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=8192)
    parser.add_argument("--method", default="overl:64", help="mode:rows")
    parser.add_argument("--check", type=int, default=512, help="side of the exactness check first (0: none)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    record: dict[str, object] = {
        "kind": "gigapixel", "model": "resnet50 (frozen BN, uint8 input)", "batch": 1, "side": args.side,
        "method": args.method, "date": time.strftime("%Y-%m-%dT%H:%M"), "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"}
    if device.type == "cuda":
        record["precision"] = "TF32 convolutions (PyTorch default)" if torch.backends.cudnn.allow_tf32 \
            else "fp32 (TF32 off)"
    if args.check:
        record["check_side"], record["check_grad_error"] = args.check, check(args.method, args.check, device)
        print(f"[gigapixel] exactness at {args.check}: gradient error {record['check_grad_error']:.1e}", flush=True)
    model = convert(network().to(device), args.method)
    x = torch.randint(0, 256, (1, 3, args.side, args.side), dtype=torch.uint8, device=device)
    started = time.perf_counter()
    plan = plan_for(model, x)
    record["plan_seconds"] = time.perf_counter() - started
    record["estimate_mib"] = estimate(plan).peak_bytes / MIB
    record["breakdown"] = str(breakdown(plan))
    print(f"[gigapixel] planned in {record['plan_seconds']:.0f} s; {record['breakdown']}", flush=True)
    logging_progress()
    m = measure(lambda: model(x).square().mean().backward(), device)
    record["peak_mib"], record["seconds"] = m.peak_bytes / MIB, m.seconds
    record["estimate_error"] = record["estimate_mib"] / record["peak_mib"] - 1  # type: ignore[operator]
    print(f"[gigapixel] {args.method} at {args.side}²: measured {record['peak_mib']:.0f} MiB, estimate "
          f"{record['estimate_mib']:.0f} MiB ({record['estimate_error']:+.1%}), step {m.seconds:.0f} s", flush=True)
    with (DOCS / "scale.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    return 0


def logging_progress() -> None:
    """Show the executor's progress lines (a step takes minutes here)."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("lightning_lrcnn.executor").setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
