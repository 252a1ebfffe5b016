"""Hydra app: train a torchvision model or a U-Net with the RowCentricTraining callback.

    python scripts/train.py                                   # the main job (CPU, synthetic data)
    python scripts/train.py model=vgg16 lrcnn=2ps lrcnn.rows=8 data.image_size=512
    python scripts/train.py -m lrcnn.mode=2ps,overl,off data.image_size=256,512
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from lightning_lrcnn import RowCentricError, RowCentricTraining
from lightning_lrcnn.large_images import LargeImageError

log = logging.getLogger("lightning_lrcnn.train")
CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")


class ImageSizeError(ValueError):
    """The image size is too small for the network."""


def check_image_size(net: torch.nn.Module, image_size: int, model_name: str) -> None:
    """Run the network on a shape-only (fake) batch so a too-small image fails here, in one line."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_lrcnn.trace import quiet_fake_tensor_logs

    training = net.training
    net.eval()
    try:
        with quiet_fake_tensor_logs(), FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            net(torch.empty(1, 3, image_size, image_size))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageSizeError(f"data.image_size={image_size} does not fit model={model_name}: {first}. "
                             "Use a larger data.image_size (for the U-Net, a multiple of 2**depth).") from None
    finally:
        net.train(training)


def summary_table(callback: RowCentricTraining | None, trainer: pl.Trainer) -> str:
    """The closing summary: mode, rows, peak vs plain, saving, step-time ratio, validation accuracy."""
    m = callback.metrics() if callback is not None else {}

    def fmt(key: str, spec: str, suffix: str = "") -> str:
        v = m.get(key, float("nan"))
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}{suffix}"

    acc = trainer.callback_metrics.get("val_acc")
    mode = callback.chosen.mode if callback is not None and callback.chosen is not None else "off"
    estimated = " (estimated)" if m.get("lrcnn/baseline_estimated") == 1 else ""
    rows = [
        ("mode", mode),
        ("rows", fmt("lrcnn/rows", ".0f")),
        ("peak memory (MiB)", f"{fmt('lrcnn/peak_memory_mib', '.1f')} vs plain "
                              f"{fmt('lrcnn/baseline_peak_memory_mib', '.1f')}{estimated}"),
        ("memory saved", fmt("lrcnn/memory_saved_pct", ".1f", " %")),
        ("step time ratio", fmt("lrcnn/step_time_ratio", ".2f", "x")),
        ("val accuracy", "n/a" if acc is None else f"{float(acc):.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["| " + "what".ljust(width) + " | value |", "|" + "-" * (width + 2) + "|-------|"]
                     + [f"| {k.ljust(width)} | {v} |" for k, v in rows])


def train(cfg: DictConfig) -> dict[str, Any]:
    pl.seed_everything(cfg.seed, workers=True)
    model_name = hydra.core.hydra_config.HydraConfig.get().runtime.choices.get("model", "?")
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.model)
    check_image_size(module.net, int(datamodule.image_size), model_name)
    callback = hydra.utils.instantiate(cfg.lrcnn)
    logger = hydra.utils.instantiate(cfg.logger)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[callback], logger=logger)
    trainer.fit(module, datamodule=datamodule)
    metrics = {**callback.metrics(), "val_acc": float(trainer.callback_metrics.get("val_acc", float("nan")))}
    if cfg.summary and trainer.is_global_zero:
        table = summary_table(callback, trainer)
        print(table)
        with open(os.path.join(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir, "summary.md"), "w") as f:
            f.write(table + "\n")
    return metrics


@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def main(cfg: DictConfig) -> float:
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
    try:
        metrics = train(cfg)
    except (FileNotFoundError, ImageSizeError, LargeImageError, MisconfigurationException, RowCentricError,
            ValueError) as exc:
        # one line; nothing the run wrote (config, logs, checkpoints in its folder) is removed
        log.error("%s: %s", type(exc).__name__, exc)
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return metrics.get("val_acc", float("nan"))


if __name__ == "__main__":
    main()
