"""Peak memory and step time of row-centric plans on networks beyond the benchmark's two: U-Nets with
InstanceNorm (nnU-Net style) or GroupNorm, and segmentation_models_pytorch's U-Net, FPN and DeepLabV3+
(ResNet-34 encoder, eval BN) when that package is installed (``pip install -e '.[zoo]'``). CPU, fp32, one
training step each (``mean(y**2)`` loss), ratios to the plain model measured in the same run.

    python scripts/other_nets.py --size 512
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lrcnn import to_row_centric
from lightning_lrcnn.memory import measure


def _block(i: int, o: int, norm: str) -> nn.Sequential:
    def make(c: int) -> nn.Module:
        return nn.InstanceNorm2d(c, affine=True) if norm == "instance" else nn.GroupNorm(8, c)

    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), make(o), nn.LeakyReLU(0.01, inplace=True),
                         nn.Conv2d(o, o, 3, padding=1), make(o), nn.LeakyReLU(0.01, inplace=True))


class NormUNet(nn.Module):
    """Three levels, 32-64-128 channels, transposed-conv upsampling, skip connections."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.e1, self.e2, self.e3 = _block(3, 32, norm), _block(32, 64, norm), _block(64, 128, norm)
        self.u2, self.d2 = nn.ConvTranspose2d(128, 64, 2, 2), _block(128, 64, norm)
        self.u1, self.d1 = nn.ConvTranspose2d(64, 32, 2, 2), _block(64, 32, norm)
        self.out = nn.Conv2d(32, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.e1(x)
        b = self.e2(F.max_pool2d(a, 2))
        c = self.e3(F.max_pool2d(b, 2))
        d = self.d2(torch.cat([self.u2(c), b], 1))
        return self.out(self.d1(torch.cat([self.u1(d), a], 1)))


def _networks() -> dict[str, nn.Module]:
    nets = {"U-Net, InstanceNorm": NormUNet("instance"), "U-Net, GroupNorm(8)": NormUNet("group")}
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        print("segmentation_models_pytorch not installed: its networks are skipped")
        return nets
    for arch in ("Unet", "FPN", "DeepLabV3Plus"):
        nets[f"smp {arch}, ResNet-34, eval BN"] = getattr(smp, arch)(
            encoder_name="resnet34", encoder_weights=None, classes=2).eval()
    return nets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--methods", default="2ps:8,overl:8,overl:16")
    args = parser.parse_args()
    x = torch.randn(1, 3, args.size, args.size)
    methods = [(m.split(":")[0], int(m.split(":")[1])) for m in args.methods.split(",")]
    print(f"| network, 1×3×{args.size}² | plain | " + " | ".join(f"{m} {r}" for m, r in methods) + " |")
    print("|---|---:|" + "---:|" * len(methods))
    for name, net in _networks().items():
        torch.manual_seed(0)

        def step(model: nn.Module):  # noqa: ANN202
            return lambda: model(x).square().mean().backward()

        plain = measure(step(copy.deepcopy(net)))
        cells = []
        for mode, rows in methods:
            converted = to_row_centric(copy.deepcopy(net), mode=mode, rows=rows)
            converted(x)  # plan once
            r = measure(step(converted))
            cells.append(f"{r.peak_bytes / plain.peak_bytes:.3f} @ {r.seconds / plain.seconds:.2f}×")
        print(f"| {name} | {plain.peak_bytes / 2**20:.0f} MiB, {plain.seconds:.2f} s | " + " | ".join(cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
