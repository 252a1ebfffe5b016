"""Networks for the Hydra app: torchvision backbones with a light head, and a small U-Net."""

from __future__ import annotations

import torch
import torchvision  # type: ignore[import-untyped]
from torch import nn

__all__ = ["vgg16_classifier", "small_vgg", "UNet", "InputNormalize", "uint8_input"]


def vgg16_classifier(num_classes: int) -> nn.Module:
    """torchvision VGG-16 features (random init) with global pooling and one linear layer.

    The stock VGG head (two 4096-wide layers, 120M parameters) is for 224x224 ImageNet; at high resolution
    the convolutional features are what matters, and what row-centric execution converts.
    """
    return nn.Sequential(torchvision.models.vgg16(weights=None).features, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(512, num_classes))


def small_vgg(num_classes: int, width: int = 16, convs_per_stage: int = 1) -> nn.Module:
    """A small VGG-style classifier (no BatchNorm): four conv stages, global pooling, one linear layer.

    Fast enough to train on a laptop CPU at 256x256, and fully row-local up to the global pooling.
    """
    layers: list[nn.Module] = []
    cin = 3
    for i, cout in enumerate((width, 2 * width, 4 * width, 4 * width)):
        for _ in range(convs_per_stage):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
            cin = cout
        if i < 3:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A small U-Net for per-pixel tasks: ``depth`` poolings, transposed-conv upsampling, skip concatenation.

    Input height and width must be multiples of ``2 ** depth``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        chans = [width * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.down = nn.ModuleList([_block(in_channels, chans[0])] + [_block(chans[i], chans[i + 1])
                                                                     for i in range(depth)])
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2)
                                 for i in reversed(range(depth))])
        self.merge = nn.ModuleList([_block(2 * chans[i], chans[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


class InputNormalize(nn.Module):
    """``(x / scale - mean) / std`` per channel, from any input dtype (``uint8`` batches of large images).

    As the first layer of a converted backbone it runs band by band: a float copy of the whole input never
    exists (see :mod:`lightning_lrcnn.large_images`). Defaults: ImageNet mean and std on 0..255 pixels.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...] = (0.485, 0.456, 0.406), std: tuple[float, ...] = (0.229, 0.224, 0.225),
                 scale: float = 255.0) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std) or scale <= 0:
            raise ValueError(f"InputNormalize: mean and std must have one value per channel, std and scale > 0; got "
                             f"mean={mean}, std={std}, scale={scale}")
        self.register_buffer("mean", torch.tensor(mean).reshape(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(-1, 1, 1), persistent=False)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.mean.dtype
        return (x.to(dtype) / self.scale - self.mean) / self.std


def uint8_input(net: nn.Module, mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                std: tuple[float, ...] = (0.229, 0.224, 0.225)) -> nn.Module:
    """``net`` taking 0..255 pixels (``uint8`` or float): :class:`InputNormalize` first, then ``net``."""
    return nn.Sequential(InputNormalize(mean, std), net)
