"""RowCentricTraining inside real Trainer runs: same weights, logged keys, probe invisible, resume, errors."""

from __future__ import annotations

import copy
import csv
import glob
import os

import lightning.pytorch as pl
import pytest
import torch
import torchvision
import yaml
from conftest import RecordOps
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lrcnn import Candidate, RowCentricTraining, is_row_centric, row_centric_config

KEYS = {"lrcnn/peak_memory_mib", "lrcnn/baseline_peak_memory_mib", "lrcnn/baseline_estimated",
        "lrcnn/memory_saved_pct", "lrcnn/step_time_ratio", "lrcnn/rows"}


class Classifier(pl.LightningModule):
    def __init__(self, backbone: str = "vgg") -> None:
        super().__init__()
        if backbone == "resnet18":
            self.model = torchvision.models.resnet18(num_classes=3)
        else:
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.0))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) if hasattr(self, "model") else self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self(batch[0])

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _data(n: int = 8, size: int = 32, dtype: torch.dtype = torch.float32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:  # type: ignore[no-untyped-def]
    defaults = dict(max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False,
                    enable_model_summary=False, logger=False, enable_checkpointing=False,
                    default_root_dir=tmp_path, deterministic=True)
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


def _fit(tmp_path, model: pl.LightningModule, callbacks=(), size: int = 32, **kwargs) -> pl.LightningModule:  # type: ignore[no-untyped-def]
    pl.seed_everything(0)
    dtype = torch.float64 if kwargs.get("precision") == "64-true" else torch.float32
    _trainer(tmp_path, callbacks, **kwargs).fit(model, _data(size=size, dtype=dtype), _data(size=size, dtype=dtype))
    return model


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], msg=f"state {k}")


@pytest.mark.parametrize(("backbone", "callback"), [
    ("resnet18", RowCentricTraining(mode="2ps", rows=3)),
    ("vgg", RowCentricTraining(mode="overl", rows=4)),
    ("vgg", RowCentricTraining(mode="auto", rows="auto")),
], ids=["resnet18-2ps", "vgg-overl", "vgg-auto"])
def test_same_weights_as_plain_training(tmp_path, backbone: str, callback: RowCentricTraining) -> None:
    torch.manual_seed(0)
    start = Classifier(backbone).double()
    plain = _fit(tmp_path, copy.deepcopy(start), precision="64-true")
    converted = _fit(tmp_path, copy.deepcopy(start), [callback], precision="64-true")
    _assert_same_weights(plain, converted)
    assert callback.chosen is not None
    assert not any(is_row_centric(m) for m in converted.modules())  # restored at teardown


def test_targets_found_automatically(tmp_path) -> None:
    cb = RowCentricTraining(mode="2ps", rows=2)
    model = Classifier("vgg")
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, *args) -> None:  # type: ignore[no-untyped-def]
            seen.append((is_row_centric(model.backbone), is_row_centric(model.head)))

    _fit(tmp_path, model, [cb, Spy()], max_steps=1)
    assert seen[0] == (True, False) and cb._names == ["backbone"]


@pytest.mark.parametrize("logger_cls", [CSVLogger, TensorBoardLogger])
def test_logged_keys(tmp_path, logger_cls: type) -> None:
    cb = RowCentricTraining(mode="2ps", rows=2)
    logger = logger_cls(tmp_path, name="run")
    _fit(tmp_path, Classifier(), [cb], logger=logger, max_epochs=2)
    if logger_cls is CSVLogger:
        with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
        logged = {k for r in rows for k, v in r.items() if v not in ("", None)}
        with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
            hparams = f.read()
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(glob.glob(os.path.join(logger.log_dir, "events.*"))[0])
        acc.Reload()
        logged = set(acc.Tags()["scalars"])
        hparams = str(dict(logger.hparams))
    assert KEYS <= logged, KEYS - logged
    assert "lrcnn/epoch_peak_memory_mib" in logged
    assert "lrcnn/mode" in hparams and "lrcnn/batchnorm" in hparams
    m = cb.metrics()
    assert m["lrcnn/rows"] == 2 and m["lrcnn/baseline_estimated"] == 0 and m["lrcnn/peak_memory_mib"] > 0


def test_no_logger_still_works_and_says_so(tmp_path) -> None:
    cb = RowCentricTraining(mode="2ps", rows=2)
    with pytest.warns(UserWarning, match="no logger"):
        _fit(tmp_path, Classifier(), [cb], max_steps=1)
    assert cb.metrics()["lrcnn/rows"] == 2
    assert cb.choice is not None and cb.choice.report().startswith("no budget; chosen 2ps:2")  # fixed: measured


@pytest.mark.parametrize(("mode", "budget", "size"), [
    pytest.param("auto", None, 32, marks=pytest.mark.slow),  # plans spend most of the machine: run as usual
    ("overl", 62 * 2**20, 128),  # a budget under the plain estimate (64.6 MiB): bands run, planned to spend it
])
def test_probe_leaves_run_bit_identical(tmp_path, mode: str, budget: int | None, size: int) -> None:
    torch.manual_seed(0)
    start = Classifier("resnet18")  # train-mode BN: the probe must restore running statistics
    auto = RowCentricTraining(mode=mode, rows="auto", memory_budget=budget)
    probed = _fit(tmp_path, copy.deepcopy(start), [auto], max_steps=2, size=size)
    chosen = auto.chosen
    assert chosen is not None and auto.choice is not None and len(auto.choice.results) > 1
    if budget is not None:
        result = auto.choice.result(chosen)
        assert result is not None and not result.ran_plain and auto.state_dict()["plan_budget"] < budget
    # the same plan without a probe: every weight and buffer must be bit-identical
    same_plan = [] if chosen.mode == "column" else [RowCentricTraining(mode=chosen.mode, rows=chosen.rows)]
    unprobed = copy.deepcopy(start)
    if same_plan:  # as a resumed run does: the chosen plan with the budget it spent, and no probe at all
        same_plan[0].load_state_dict(auto.state_dict())
    _fit(tmp_path, unprobed, same_plan, max_steps=2, size=size)
    for k, v in unprobed.state_dict().items():
        assert torch.equal(probed.state_dict()[k], v), f"{k} differs: the probe changed the run"


def test_checkpoint_resume_and_plain_load(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = _fit(tmp_path, Classifier(), [RowCentricTraining(mode="2ps", rows=2), ckpt],
                 enable_checkpointing=True, max_epochs=1)
    path = os.path.join(tmp_path, "last.ckpt")
    state = torch.load(path, weights_only=False)
    plain = Classifier()
    plain.load_state_dict(state["state_dict"], strict=True)
    _assert_same_weights(model, plain)
    assert any("RowCentricTraining" in k for k in state["callbacks"])
    cb = RowCentricTraining(mode="auto")
    pl.seed_everything(0)
    _trainer(tmp_path, [cb], max_epochs=2).fit(Classifier(), _data(), ckpt_path=path)
    assert cb.chosen is not None and cb.chosen.rows == 2  # resumed choice, no new probe


def test_validate_test_predict_loops(tmp_path) -> None:
    model = Classifier().eval()
    x = _data().dataset.tensors[0][:4]
    with torch.no_grad():
        expected = model(x)
    trainer = _trainer(tmp_path, [RowCentricTraining(mode="overl", rows=3)])
    trainer.validate(model, _data())
    preds = trainer.predict(model, DataLoader(TensorDataset(x), batch_size=4))
    torch.testing.assert_close(preds[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mode": "rows"}, r"mode must be one of \('auto', '2ps', 'overl', 'off'\)"),
    ({"rows": 0}, r"rows must be 'auto' or an int >= 1"),
    ({"batchnorm": "x"}, "batchnorm must be one of"),
    ({"memory_budget": -5}, "memory_budget must be > 0"),
    ({"memory_budget": "lots"}, "memory_budget must be bytes"),
    ({"memory_budget": 1.5}, r"fraction of device memory in \(0, 1\]"),
    ({"targets": "backbone"}, "targets must be a non-empty list"),
    ({"targets": []}, "targets must be a non-empty list"),  # would convert nothing, silently
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        RowCentricTraining(**kwargs)


def test_bad_targets(tmp_path) -> None:
    with pytest.raises(MisconfigurationException, match=r"no submodule 'encoder'.*children are \['backbone', 'head'\]"):
        _fit(tmp_path, Classifier(), [RowCentricTraining(mode="2ps", rows=2, targets=["encoder"])], max_steps=1)
    with pytest.raises(MisconfigurationException, match="'head'.*contains no Conv2d"):
        _fit(tmp_path, Classifier(), [RowCentricTraining(mode="2ps", rows=2, targets=["head"])], max_steps=1)


def test_budget_too_small_for_every_candidate(tmp_path) -> None:
    with pytest.raises(MisconfigurationException, match=r"memory_budget=16.*smallest (estimated )?peak.*Remedy"):
        _fit(tmp_path, Classifier(), [RowCentricTraining(memory_budget=16)], max_steps=1)


def test_off_converts_nothing_and_says_so(tmp_path) -> None:
    model = Classifier()
    logger = CSVLogger(tmp_path)
    _fit(tmp_path, model, [RowCentricTraining(mode="off")], max_steps=1, logger=logger)
    assert not any(is_row_centric(m) for m in model.modules())
    with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
        assert yaml.safe_load(f)["lrcnn/mode"] == "off"
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        header = f.readline()
    assert "lrcnn/epoch_peak_memory_mib" in header and "lrcnn/peak_memory_mib" not in header


def _plain_runs_out_of_memory(monkeypatch: pytest.MonkeyPatch, model: Classifier) -> None:
    """The probe's measurement of ``model`` with its backbone plain raises CUDA's out-of-memory error."""
    import lightning_lrcnn.auto as auto

    real = auto.measure

    def out_of_memory_when_plain(fn, device):  # type: ignore[no-untyped-def]
        if not is_row_centric(model.backbone):
            raise torch.cuda.OutOfMemoryError("simulated: the plain model does not fit")
        return real(fn, device)

    monkeypatch.setattr(auto, "measure", out_of_memory_when_plain)


def test_baseline_estimated_when_plain_runs_out_of_memory(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model = Classifier()
    _plain_runs_out_of_memory(monkeypatch, model)
    cb = RowCentricTraining(mode="2ps", rows=4)
    _fit(tmp_path, model, [cb], max_steps=1)
    m = cb.metrics()
    assert m["lrcnn/baseline_estimated"] == 1.0
    assert m["lrcnn/baseline_peak_memory_mib"] > m["lrcnn/peak_memory_mib"] > 0
    assert 0 < m["lrcnn/memory_saved_pct"] < 100


def test_compiled_module_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    compiled = torch.compile(Classifier())
    with pytest.raises(MisconfigurationException, match=r"torch.compile'd LightningModule.*Remedy"):
        _fit(tmp_path, compiled, [RowCentricTraining(mode="2ps", rows=2)], max_steps=1)


def test_fsdp_is_not_implemented(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lightning.pytorch.strategies import FSDPStrategy

    cb = RowCentricTraining(mode="2ps", rows=2)

    class FakeTrainer:
        strategy = FSDPStrategy.__new__(FSDPStrategy)

    with pytest.raises(NotImplementedError, match="FSDP.*Remedy: use strategy='ddp'"):
        cb.setup(FakeTrainer(), Classifier(), "fit")  # type: ignore[arg-type]


def test_accumulation_and_clipping_same_weights(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    start = Classifier("vgg").double()
    kwargs = dict(precision="64-true", accumulate_grad_batches=2, gradient_clip_val=0.05, max_epochs=2)
    plain = _fit(tmp_path, copy.deepcopy(start), **kwargs)
    converted = _fit(tmp_path, copy.deepcopy(start), [RowCentricTraining(mode="2ps", rows=3)], **kwargs)
    _assert_same_weights(plain, converted)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)])
def test_mixed_precision_trains(tmp_path, precision: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    cb = RowCentricTraining(mode="overl", rows=3)
    model = Classifier()
    before = [p.detach().clone() for p in model.parameters()]
    # Trainer(precision="16-mixed") on CPU silently falls back to bf16: give the float16 plugin explicitly
    with RecordOps() as ops:
        _fit(tmp_path, model, [cb], plugins=[MixedPrecision(precision, "cpu")], max_steps=2)
    convs = {(d, shape[2]) for name, d, shape in ops.calls if name == "convolution.default" and shape is not None}
    assert {d for d, _ in convs} == {dtype}  # every real convolution ran in the autocast dtype...
    assert {rows for _, rows in convs} - {32, 16}  # ...band-sized ones included (full: 32 and 16 rows)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))  # it trained
    assert cb.metrics()["lrcnn/peak_memory_mib"] > 0
    assert all(r.estimate_bytes is None for r in cb.choice.results)  # no fp32 estimate prunes a mixed step


def test_true_half_precision_trains_train_mode_batchnorm_in_bands(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The model itself in bf16 (fp16: tests/test_norms.py): the split BatchNorm hands on the half dtype (float32
    bands before: the plan was estimated at twice their bytes, and larger ones met the next convolution's bf16
    weights)."""
    cb = RowCentricTraining(mode="overl", rows=3)
    model = Classifier("resnet18")
    _fit(tmp_path, model, [cb], precision="bf16-true", max_steps=2)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert cb.metrics()["lrcnn/rows"] == 3


class OneConv(Classifier):
    """A backbone that bands cannot help: its input and output are whole anyway."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))


def test_a_plan_that_cannot_save_runs_plain_and_logs_rows_zero(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    cb = RowCentricTraining(mode="overl", rows=8)
    with caplog.at_level("WARNING", logger="lightning_lrcnn.convert"):
        _fit(tmp_path, OneConv(), [cb], max_steps=2, logger=CSVLogger(tmp_path, name="run"))
    assert cb.metrics()["lrcnn/rows"] == 0
    assert cb.choice.report().startswith("no budget; chosen overl:8 (runs as usual)")
    assert sum("runs as usual" in r.message for r in caplog.records) == 1


def test_baseline_estimated_when_the_choice_was_not_measured_last(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The plain model runs out of memory and the fastest candidate is not the last one measured (its plans were
    dropped when the others were converted): the baseline still comes from the probe's estimates."""
    import lightning_lrcnn.auto as auto

    model = Classifier()
    _plain_runs_out_of_memory(monkeypatch, model)

    def two_ps_2_fastest(fn, device, repeats=1):  # type: ignore[no-untyped-def]
        cfg = row_centric_config(model.backbone)
        return 1.0 if cfg is not None and (cfg.mode, cfg.rows) == ("2ps", 2) else 2.0

    monkeypatch.setattr(auto, "time_call", two_ps_2_fastest)
    monkeypatch.setattr(auto, "PLAN_GOAL_FRACTION", 0.0)  # plans at their smallest peaks (a TiB would keep all)
    cb = RowCentricTraining(mode="auto", rows="auto", memory_budget=2**40)
    _fit(tmp_path, model, [cb], max_steps=1)
    assert cb.chosen == Candidate("2ps", 2)
    m = cb.metrics()
    assert m["lrcnn/baseline_estimated"] == 1.0
    assert m["lrcnn/baseline_peak_memory_mib"] > m["lrcnn/peak_memory_mib"] > 0
