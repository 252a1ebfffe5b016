"""Lightning DDP on CPU (gloo, 2 processes): the callback gives the same weights as plain DDP."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from test_callback import Classifier, _data
from torch.multiprocessing.spawn import ProcessExitedException

from lightning_lrcnn import RowCentricTraining


def _ddp_fit(tmp_path, model: pl.LightningModule, callbacks: list) -> pl.LightningModule:  # type: ignore[no-untyped-def]
    for attempt in range(2):
        pl.seed_everything(0)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             precision="64-true", default_root_dir=tmp_path, callbacks=callbacks)
        try:
            trainer.fit(model, _data(dtype=torch.float64))
            return model
        except ProcessExitedException as exc:
            # seen in about one full-suite run in ten, in the *plain* DDP fit: a gloo worker aborted while exiting
            # after training ("terminate called without an active exception"); spawn hands nothing back then,
            # so the fit is run again from the same model once; any other failure fails the test
            if attempt or "SIGABRT" not in str(exc):
                raise
    raise AssertionError("unreachable")


@pytest.mark.parametrize("callback", [RowCentricTraining(mode="2ps", rows=3),
                                      pytest.param(RowCentricTraining(mode="auto"), marks=pytest.mark.slow)],
                         ids=["2ps", "auto"])
def test_ddp_two_processes_same_weights_as_plain_ddp(tmp_path, callback: RowCentricTraining) -> None:
    torch.manual_seed(0)
    start = Classifier("vgg").double()
    plain = _ddp_fit(tmp_path, copy.deepcopy(start), [])
    converted = _ddp_fit(tmp_path, copy.deepcopy(start), [callback])
    moved = False
    for (name, a), (_, b) in zip(plain.state_dict().items(), converted.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, msg=f"state {name}")
        moved = moved or not torch.equal(a, start.state_dict()[name])
    assert moved, "training did not change the weights: the comparison would prove nothing"
