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
from hydra.errors import InstantiationException
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lightning_lrcnn import RowCentricError, RowCentricTraining
from lightning_lrcnn.large_images import LargeImageError

log = logging.getLogger("lightning_lrcnn.train")
CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")


class ImageSizeError(ValueError):
    """The image size is too small for the network."""


class InputDtypeError(ValueError):
    """The data's images are of a dtype the network cannot take."""


def check_input(net: torch.nn.Module, image_size: int, model_name: str,
                     dtype: torch.dtype = torch.float32) -> None:
    """Run the network on a shape-only (fake) batch so a too-small image, or uint8 images for a network that
    expects floats, fail here, in one line."""
    first = _fake_run(net, image_size, dtype)
    if first is None:
        return
    if dtype != torch.float32 and _fake_run(net, image_size, torch.float32) is None:
        raise InputDtypeError(
            f"the data yields {dtype} images but model={model_name} takes floats ({first}). Use a model that "
            "normalises inside the network, e.g. model=resnet50_uint8, or wrap yours with "
            "lightning_lrcnn.models.uint8_input(net).")
    raise ImageSizeError(f"data.image_size={image_size} does not fit model={model_name}: {first}. "
                         "Use a larger data.image_size (for the U-Net, a multiple of 2**depth).")


def _fake_run(net: torch.nn.Module, image_size: int, dtype: torch.dtype) -> str | None:
    """The first line of the error ``net`` raises on a fake batch of one image, or None."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_lrcnn.trace import quiet_fake_tensor_logs

    training = net.training
    net.eval()
    try:
        with quiet_fake_tensor_logs(), FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            net(torch.empty(1, 3, image_size, image_size, dtype=dtype))
    except Exception as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    finally:
        net.train(training)
    return None


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, raising a bad argument's own error (a one-line message) rather than
    Hydra's wrapper of it."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, (FileNotFoundError, ValueError, MisconfigurationException, RowCentricError)):
            raise exc.__cause__ from None
        raise


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
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    check_input(module.net, int(datamodule.image_size), model_name, getattr(datamodule, "dtype", torch.float32))
    callback = instantiate(cfg.lrcnn)
    logger = instantiate(cfg.logger)
    trainer = instantiate(cfg.trainer, callbacks=[callback], logger=logger)
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
    except (FileNotFoundError, LargeImageError, MisconfigurationException, RowCentricError, ValueError,
            MissingMandatoryValue) as exc:
        # one line; nothing the run wrote (config, logs, checkpoints in its folder) is removed
        message = str(exc).strip().splitlines()[0] if isinstance(exc, MissingMandatoryValue) else str(exc)
        log.error("%s: %s", type(exc).__name__, message)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    return metrics.get("val_acc", float("nan"))


if __name__ == "__main__":
    main()
