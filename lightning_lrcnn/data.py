"""Data for the Hydra app: a deterministic synthetic high-resolution task, or an ImageFolder."""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["SyntheticStripes", "SyntheticDataModule", "FolderDataModule"]


class SyntheticStripes(Dataset):
    """Image ``i`` shows stripes at one of ``num_classes`` orientations inside a random box, plus noise.

    The label is the orientation (classification); the mask is the box (segmentation). Every item is made
    on the fly from ``seed`` and ``i``, so nothing is stored or downloaded and runs are reproducible.
    """

    def __init__(self, length: int, image_size: int, num_classes: int = 4, seed: int = 0) -> None:
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.length, self.image_size, self.num_classes, self.seed = length, image_size, num_classes, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        s = self.image_size
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        angle = math.pi * label / self.num_classes
        period = float(torch.empty(1).uniform_(6.0, 12.0, generator=g)) * s / 256
        phase = float(torch.rand(1, generator=g)) * 2 * math.pi
        yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                                indexing="ij")
        stripes = torch.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase)
        h, w = (int(v) for v in torch.randint(s // 3, s + 1, (2,), generator=g))
        top = int(torch.randint(0, s - h + 1, (1,), generator=g))
        left = int(torch.randint(0, s - w + 1, (1,), generator=g))
        mask = torch.zeros(s, s, dtype=torch.long)
        mask[top : top + h, left : left + w] = 1
        image = stripes * mask + 0.5 * torch.randn(s, s, generator=g)
        return {"image": image.expand(3, s, s).clone(), "label": label, "mask": mask}


class SyntheticDataModule(pl.LightningDataModule):
    """Train/val splits of :class:`SyntheticStripes` (different seeds)."""

    def __init__(self, image_size: int = 256, batch_size: int = 8, train_size: int = 256, val_size: int = 64,
                 num_classes: int = 4, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.num_classes = num_classes
        self.train_set = SyntheticStripes(train_size, image_size, num_classes, seed)
        self.val_set = SyntheticStripes(val_size, image_size, num_classes, seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers)


class _Folder(Dataset):
    def __init__(self, root: str, image_size: int) -> None:
        from torchvision import datasets, transforms  # type: ignore[import-untyped]

        tf = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])
        self.inner = datasets.ImageFolder(root, transform=tf)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label = self.inner[i]
        return {"image": image, "label": label}


class FolderDataModule(pl.LightningDataModule):
    """A torchvision ImageFolder (``root/<class>/<image>``), split 80/20 into train/val, resized square."""

    def __init__(self, path: str, image_size: int = 512, batch_size: int = 4, num_workers: int = 2,
                 num_classes: int | None = None, seed: int = 0) -> None:
        super().__init__()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"data.path: no such folder: {path!r} (expected an ImageFolder: "
                                    "PATH/<class name>/<image files>)")
        self.path, self.image_size, self.batch_size, self.num_workers, self.seed = (
            path, image_size, batch_size, num_workers, seed)
        full = _Folder(path, image_size)
        if len(full) < 2:
            raise ValueError(f"data.path: {path!r} holds fewer than 2 images")
        found = len(full.inner.classes)
        if num_classes is not None and num_classes != found:
            raise ValueError(f"data.num_classes={num_classes} but {path!r} has {found} class folders")
        self.num_classes = found
        n_val = max(1, len(full) // 5)
        self.train_set, self.val_set = torch.utils.data.random_split(
            full, [len(full) - n_val, n_val], generator=torch.Generator().manual_seed(seed))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers)
