"""``RowCentricTraining``: the Lightning callback that converts conv backbones and reports the savings."""

from __future__ import annotations

import contextlib
import logging
import resource
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from .auto import NO_BUDGET, Candidate, Choice, NoPlanFitsError, candidates_for, choose_plan
from .convert import cached_plans, restore, to_row_centric
from .estimate import estimate, estimate_plain
from .memory import MIB, check_budget
from .rules import BATCHNORM_POLICIES

__all__ = ["RowCentricTraining"]

log = logging.getLogger(__name__)

_MODES = ("auto", "2ps", "overl", "off")
_DEFAULT_INFERENCE = Candidate("2ps", 16)


class RowCentricTraining(Callback):
    r"""Train a LightningModule's convolutional backbones with row-centric (LR-CNN) execution.

    In ``setup`` the target submodules are converted in place with :func:`~lightning_lrcnn.to_row_centric`
    (parameters and ``state_dict`` keys unchanged, so checkpoints load into plain models and back); at
    ``teardown`` they are restored. With ``mode="auto"`` or ``rows="auto"`` the first training batch is used
    to measure the plain model, 2PS and OverL at several band counts; the probe's effect on gradients,
    buffers (BatchNorm statistics) and RNG is undone, so the run is the one it would have been without it, and
    the fastest candidate whose peak fits ``memory_budget`` is kept (each candidate is planned to spend up to 90% of
    the budget on time: fewer bands, segments kept whole, where its smallest plan is well under it).

    Logged to every attached logger (at the first training step, from the probe):

    - ``lrcnn/peak_memory_mib``: peak memory of one training step with the chosen plan
    - ``lrcnn/baseline_peak_memory_mib``: the same for the plain model (measured, or, when it runs out of
      memory, estimated from the planner; then ``lrcnn/baseline_estimated`` = 1, else 0)
    - ``lrcnn/baseline_estimated``
    - ``lrcnn/memory_saved_pct``: ``100 * (1 - peak / baseline)``
    - ``lrcnn/step_time_ratio``: step time with the chosen plan over the plain model's (NaN if not measured)
    - ``lrcnn/rows``: band count (0 for the plain model, and when no row-centric plan is estimated below the
      plain model's peak, so the targets run as usual; the reason is logged once and in the choice's report)

    Hyperparameters: ``lrcnn/mode`` and ``lrcnn/batchnorm`` (with ``mode="off"`` these, ``"off"``, and the
    epoch peak below are all that is logged, so a sweep over modes can show the plain runs). Each training epoch:

    - ``lrcnn/epoch_peak_memory_mib``: peak memory observed during the epoch (CUDA allocator peak; on CPU
      the process's peak resident set size, a high-water mark since the process started)

    Args:
        mode: ``"auto"``, ``"2ps"``, ``"overl"`` or ``"off"`` (callback does nothing).
        rows: ``"auto"`` or the number of row bands (int >= 1).
        memory_budget: bytes (int), fraction of the accelerator's memory (or of available RAM on CPU) as a
            float in (0, 1], or None for 80%.
        targets: names of submodules of the LightningModule to convert (e.g. ``["backbone"]``), or None to
            convert every direct child that contains a convolution.
        batchnorm: ``"exact"``, ``"freeze"`` or ``"per_band"`` (see :func:`~lightning_lrcnn.to_row_centric`).
        leaf_modules: passed to the tracer (submodule types or names not to trace into).

    Raises:
        MisconfigurationException: bad arguments, a target that does not exist or holds no convolution, or
            (in auto mode) no candidate fitting the budget.

    Example::

        trainer = Trainer(callbacks=[RowCentricTraining(mode="auto", batchnorm="freeze")])
    """

    def __init__(
        self,
        mode: str = "auto",
        rows: int | str = "auto",
        memory_budget: int | float | None = None,
        targets: Sequence[str] | None = None,
        batchnorm: str = "exact",
        leaf_modules: Sequence[type | str] = (),
    ) -> None:
        if mode not in _MODES:
            raise MisconfigurationException(f"RowCentricTraining(mode={mode!r}): mode must be one of {_MODES}")
        if rows != "auto" and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise MisconfigurationException(f"RowCentricTraining(rows={rows!r}): rows must be 'auto' or an int >= 1")
        if batchnorm not in BATCHNORM_POLICIES:
            raise MisconfigurationException(
                f"RowCentricTraining(batchnorm={batchnorm!r}): batchnorm must be one of {BATCHNORM_POLICIES}")
        try:
            if memory_budget is not None:
                check_budget(memory_budget)
        except ValueError as exc:
            raise MisconfigurationException(f"RowCentricTraining: {exc}") from None
        if targets is not None and (isinstance(targets, str) or not all(isinstance(t, str) for t in targets)
                                    or not list(targets)):
            raise MisconfigurationException(
                f"RowCentricTraining(targets={targets!r}): targets must be a non-empty list of submodule names, or "
                "None to convert every child module that contains a convolution")
        self.mode, self.rows, self.memory_budget, self.batchnorm = mode, rows, memory_budget, batchnorm
        self.targets = None if targets is None else list(targets)
        self.leaf_modules = tuple(leaf_modules)
        self.choice: Choice | None = None
        self.chosen: Candidate | None = None
        self._plan_budget: int | None = None  # what the chosen plan's planner spent on time (see choose_plan)
        self._modules: list[nn.Module] = []
        self._names: list[str] = []
        self._warned_no_logger = False
        self._estimated_baseline = float("nan")

    # ----------------------------------------------------------------------------------------- setup / teardown

    @property
    def needs_probe(self) -> bool:
        return self.mode != "off" and self.chosen is None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.mode == "off":
            return
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise NotImplementedError(
                f"RowCentricTraining does not support the {strategy} strategy (parameters are sharded and gathered "
                "per module call, which band-wise execution would repeat per band). Remedy: use strategy='ddp' "
                "or remove the callback.")
        if getattr(pl_module, "_compiler_ctx", None):
            raise MisconfigurationException(
                "RowCentricTraining cannot convert a torch.compile'd LightningModule: the compiled graph would "
                "bypass the band-wise forward. Remedy: pass the uncompiled module to the Trainer (row-centric "
                "execution already bounds memory), or use RowCentricTraining(mode='off').")
        self._names, self._modules = self._find_targets(pl_module)
        rank_zero_info(f"RowCentricTraining: targets {self._names}")
        if self.mode != "auto" and self.rows != "auto":
            self.chosen = Candidate(self.mode, int(self.rows))
        if self.chosen is not None:
            self._apply(self.chosen)
        elif stage != "fit":
            self._apply(_DEFAULT_INFERENCE)  # no training batch to measure on: a safe band-wise default

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for m in self._modules:
            restore(m)

    def _find_targets(self, pl_module: pl.LightningModule) -> tuple[list[str], list[nn.Module]]:
        if self.targets is not None:
            modules = []
            for name in self.targets:
                try:
                    module = pl_module.get_submodule(name)
                except AttributeError:
                    children = [n for n, _ in pl_module.named_children()]
                    raise MisconfigurationException(
                        f"RowCentricTraining(targets=[{name!r}]): no submodule {name!r} in "
                        f"{type(pl_module).__name__}; its children are {children}") from None
                if not any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in module.modules()):
                    raise MisconfigurationException(
                        f"RowCentricTraining(targets=[{name!r}]): {name!r} ({type(module).__name__}) contains no "
                        "Conv2d/ConvTranspose2d, so row-centric execution cannot save anything; target the "
                        "convolutional backbone instead")
                modules.append(module)
            return list(self.targets), modules
        found = [(n, m) for n, m in pl_module.named_children()
                 if any(isinstance(c, (nn.Conv2d, nn.ConvTranspose2d)) for c in m.modules())]
        if not found:
            raise MisconfigurationException(
                f"RowCentricTraining: {type(pl_module).__name__} has no child module containing a convolution; "
                "pass targets=['name.of.backbone'] or remove the callback")
        return [n for n, _ in found], [m for _, m in found]

    def _apply(self, candidate: Candidate) -> None:
        for m in self._modules:
            if candidate.mode == "column":
                restore(m)
            else:
                to_row_centric(m, mode=candidate.mode, rows=candidate.rows, batchnorm=self.batchnorm,
                               leaf_modules=self.leaf_modules, memory_budget=self._plan_budget)

    # ----------------------------------------------------------------------------------------- probe

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.mode == "off" or self.choice is not None or not self._modules:
            return
        fixed = self.chosen
        candidates = (Candidate("column"), fixed) if fixed is not None else candidates_for(self.mode, self.rows)
        device = pl_module.device

        def step() -> None:
            with self._quiet(pl_module), trainer.precision_plugin.train_step_context(), _no_sync(trainer):
                out = pl_module.training_step(batch, batch_idx)
                loss = out["loss"] if isinstance(out, dict) else out
                if not isinstance(loss, torch.Tensor):
                    raise MisconfigurationException(
                        "RowCentricTraining needs training_step to return the loss (a tensor or {'loss': ...}) "
                        "to measure candidates; with manual optimization pass mode and rows explicitly")
                loss.backward()

        budget = self.memory_budget if fixed is None else NO_BUDGET  # a fixed choice is measured, not filtered
        try:
            choice = choose_plan(self._modules, step, memory_budget=budget, candidates=candidates,
                                 batchnorm=self.batchnorm, device=device, state_modules=[pl_module],
                                 convert_kwargs={"leaf_modules": self.leaf_modules},
                                 spend_budget=fixed is None)
        except NoPlanFitsError as exc:
            raise MisconfigurationException(
                f"RowCentricTraining(memory_budget={self.memory_budget!r}): {exc}") from None
        best = choice.best
        if fixed is None:
            self._plan_budget = choice.plan_budget
        if fixed is None and trainer.world_size > 1:  # every rank must run the same plan
            best, self._plan_budget = trainer.strategy.broadcast((best, choice.plan_budget), src=0)
            choice.plan_budget = self._plan_budget
            self._apply(best)
        elif fixed is not None:
            best = fixed
            self._apply(best)
        choice.best = best
        self.choice, self.chosen = choice, best
        self._estimated_baseline = self._estimate_baseline(choice)
        rank_zero_info(f"RowCentricTraining:\n{choice.report()}")
        self._log_choice(trainer, pl_module)

    def _estimate_baseline(self, choice: Choice) -> float:
        """Plain-model peak when it could not be measured: the chosen peak scaled by the planner's estimates (the
        probe's, else those of the targets' cached plans)."""
        chosen, column = choice.result(choice.best), choice.baseline
        if chosen is not None and chosen.peak_bytes is not None and chosen.estimate_bytes and column is not None \
                and column.estimate_bytes is not None:
            return float(chosen.peak_bytes) * column.estimate_bytes / chosen.estimate_bytes
        plans = [p for m in self._modules for p in cached_plans(m)[-1:]]
        if chosen is None or chosen.peak_bytes is None or not plans:
            return float("nan")
        planned = sum(estimate(p).peak_bytes for p in plans)
        return float(chosen.peak_bytes) * sum(estimate_plain(p) for p in plans) / max(planned, 1)

    @staticmethod
    @contextlib.contextmanager
    def _quiet(pl_module: pl.LightningModule) -> Iterator[None]:
        """Silence ``self.log`` inside the probe's extra training steps."""
        saved = pl_module.__dict__.get("log"), pl_module.__dict__.get("log_dict")
        pl_module.log = lambda *a, **k: None  # type: ignore[method-assign]
        pl_module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
        try:
            yield
        finally:
            for name, value in zip(("log", "log_dict"), saved, strict=True):
                if value is None:
                    pl_module.__dict__.pop(name, None)
                else:
                    pl_module.__dict__[name] = value

    # ----------------------------------------------------------------------------------------- logging

    def metrics(self) -> dict[str, float]:
        """The step metrics of the choice (see the class docstring)."""
        if self.choice is None or self.chosen is None:
            return {}
        chosen = self.choice.result(self.chosen)
        base = self.choice.baseline
        peak = float(chosen.peak_bytes) if chosen and chosen.peak_bytes is not None else float("nan")
        estimated = base is None or base.peak_bytes is None
        baseline = float(base.peak_bytes) if base and base.peak_bytes is not None else self._estimated_baseline
        ratio = (chosen.seconds / base.seconds if chosen and base and chosen.seconds and base.seconds
                 and base.peak_bytes is not None else float("nan"))
        return {
            "lrcnn/peak_memory_mib": peak / MIB,
            "lrcnn/baseline_peak_memory_mib": baseline / MIB,
            "lrcnn/baseline_estimated": float(estimated),
            "lrcnn/memory_saved_pct": 100.0 * (1.0 - peak / baseline) if baseline == baseline else float("nan"),
            "lrcnn/step_time_ratio": ratio,
            "lrcnn/rows": float(0 if self.chosen.mode == "column" or (chosen and chosen.ran_plain)
                                else self.chosen.rows),
        }

    def _log_choice(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.loggers:
            if not self._warned_no_logger:
                self._warned_no_logger = True
                rank_zero_warn("RowCentricTraining: no logger is attached (logger=False), so its metrics "
                               "cannot be logged; the choice is in the INFO log and in `callback.metrics()`")
            return
        metrics = self.metrics()
        for logger in trainer.loggers:
            logger.log_hyperparams({"lrcnn/mode": self.chosen.mode if self.chosen else "off",
                                    "lrcnn/batchnorm": self.batchnorm})
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "off":
            for logger in trainer.loggers:
                logger.log_hyperparams({"lrcnn/mode": "off", "lrcnn/batchnorm": self.batchnorm})

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.loggers:
            return
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / MIB
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        for logger in trainer.loggers:
            logger.log_metrics({"lrcnn/epoch_peak_memory_mib": peak}, step=trainer.global_step)

    # ----------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {} if self.chosen is None else {"mode": self.chosen.mode, "rows": self.chosen.rows,
                                               "plan_budget": self._plan_budget}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:  # resumed: keep the plan chosen before (no new probe)
            self.chosen = Candidate(state_dict["mode"], int(state_dict["rows"]))
            self._plan_budget = state_dict.get("plan_budget")
            self.choice = Choice(self.chosen, plan_budget=self._plan_budget)
            self._apply(self.chosen)


@contextlib.contextmanager
def _no_sync(trainer: pl.Trainer) -> Iterator[None]:
    no_sync = getattr(trainer.strategy.model, "no_sync", None)
    if trainer.world_size > 1 and no_sync is not None:
        with no_sync():
            yield
    else:
        yield
