"""LightningModules for the Hydra app: image classification and per-pixel segmentation."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn

__all__ = ["ImageClassifier", "ImageSegmenter"]


class _ImageTask(pl.LightningModule):
    def __init__(self, net: nn.Module, num_classes: int, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _target(self, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self(batch["image"]), self._target(batch))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self(batch["image"])
        target = self._target(batch)
        self.log("val_loss", nn.functional.cross_entropy(logits, target))
        self.val_acc(logits, target)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])


class ImageClassifier(_ImageTask):
    """Whole-image classification (``batch["label"]``); ``val_acc`` is top-1 accuracy."""

    def _target(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["label"]


class ImageSegmenter(_ImageTask):
    """Per-pixel classification (``batch["mask"]``); ``val_acc`` is pixel accuracy."""

    def _target(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["mask"]
