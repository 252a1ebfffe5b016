"""Convolution arithmetic of one training step, plain against row-centric plans: where the extra time comes from.

Counts the floating-point operations of every convolution run in forward (recomputation included) and backward
(input and weight gradients), from the shapes each call sees, for a torchvision network. Deterministic, unlike
step times on a shared machine.

    python scripts/conv_flops.py --model resnet50 --size 1024                  # frozen BatchNorm
    python scripts/conv_flops.py --model resnet50 --size 1024 --train-bn       # train-mode BatchNorm
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_lrcnn import to_row_centric
from lightning_lrcnn.convert import plan_for


class ConvFlops(TorchDispatchMode):
    """Operations of the convolutions run inside the ``with`` block: ``forward`` and ``backward``."""

    def __init__(self) -> None:
        super().__init__()
        self.forward = self.backward = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:
            weight = args[1]
            self.forward += 2 * out.numel() * weight[0].numel()
        elif func is torch.ops.aten.convolution_backward.default:
            grad, weight, mask = args[0], args[2], args[-1]
            self.backward += 2 * grad.numel() * weight[0].numel() * sum(bool(m) for m in mask[:2])
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="a torchvision classification model")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--methods", default="overl:16,2ps:16")
    parser.add_argument("--train-bn", action="store_true", help="train-mode BatchNorm (default: frozen)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    net = getattr(torchvision.models, args.model)(weights=None).train()
    if not args.train_bn:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    x = torch.randn(1, 3, args.size, args.size)
    base = 0
    print(f"{args.model} {args.size}², batch 1, {'train-mode' if args.train_bn else 'frozen'} BatchNorm")
    for method in ["plain", *args.methods.split(",")]:
        model = copy.deepcopy(net)
        if method != "plain":
            mode, rows = method.split(":")
            model = to_row_centric(model, mode=mode, rows=int(rows))
            plan_for(model, x)  # planning runs on fake tensors: not counted
        with ConvFlops() as flops:
            model(x).square().mean().backward()
        total = flops.forward + flops.backward
        base = base or total
        print(f"{method:>9}: forward {flops.forward / 1e9:7.1f} GFLOP, backward {flops.backward / 1e9:7.1f} GFLOP, "
              f"total {total / base:.2f}x plain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
