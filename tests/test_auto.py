"""Automatic choice: pruned, measured candidates; state untouched; clear budget errors; the analytic estimate."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_lrcnn import Candidate, NoPlanFitsError, choose_plan, is_row_centric, row_centric_config, to_row_centric
from lightning_lrcnn.auto import DEFAULT_BUDGET_FRACTION, TIMED_STEPS, CandidateResult, candidates_for, resolve_budget
from lightning_lrcnn.memory import measure


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.Dropout2d(0.2), nn.ReLU())


def _step(model: nn.Module, x: torch.Tensor):  # noqa: ANN202
    return lambda: model(x).sum().backward()


def test_choice_fits_budget_and_reports_every_candidate() -> None:
    model, x = _net().eval(), torch.randn(2, 3, 96, 96)  # eval BN: row-local, so bands can save memory
    plain_peak = measure(_step(copy.deepcopy(model), x)).peak_bytes
    budget = int(0.6 * plain_peak)
    cands = candidates_for("auto", "auto")
    choice = choose_plan([model], _step(model, x), memory_budget=budget, candidates=cands)
    assert [r.candidate for r in choice.results] == list(cands)
    best = choice.result(choice.best)
    assert best is not None and best.fits and best.peak_bytes <= budget
    assert choice.baseline is not None and not choice.baseline.fits  # the plain model does not fit 60% of itself
    assert is_row_centric(model) and row_centric_config(model).rows == choice.best.rows
    assert "chosen" in choice.report()


def test_choice_leaves_state_untouched() -> None:
    model = _net().train()
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()  # existing gradients must survive
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    choose_plan([model], _step(model, x), memory_budget=2**40, candidates=candidates_for("auto", "auto"))
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(), strict=True))
    assert all(torch.equal(buffers[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_nothing_fits_is_a_clear_error_and_leaves_module_as_it_came() -> None:
    model = _net()
    with pytest.raises(NoPlanFitsError,
                       match=r"no candidate fits memory_budget=0.0 MiB: the smallest (estimated )?peak was .* MiB"):
        choose_plan([model], _step(model, torch.randn(1, 3, 32, 32)), memory_budget=1)
    assert not is_row_centric(model)


@pytest.mark.parametrize("budget", [-1, 0, 0.0, "1GB", [1], True, 1.5, float("nan")])
def test_bad_budgets(budget: object) -> None:
    with pytest.raises(ValueError, match="memory_budget"):
        resolve_budget(budget, torch.device("cpu"))


def test_budget_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    # free memory on CPU moves between calls; fix it so fractions are compared against the same total
    monkeypatch.setattr("lightning_lrcnn.memory.device_memory", lambda device: 1000 * 2**20)
    assert resolve_budget(123, torch.device("cpu")) == 123
    assert resolve_budget(0.5, torch.device("cpu")) == 500 * 2**20
    assert resolve_budget(None, torch.device("cpu")) == int(DEFAULT_BUDGET_FRACTION * 1000 * 2**20)
    assert resolve_budget(1.0, torch.device("cpu")) == 1000 * 2**20


def test_to_row_centric_auto() -> None:
    model, x = _net(), torch.randn(1, 3, 64, 64)
    out = to_row_centric(model, mode="auto", rows="auto", memory_budget=2**40, example_input=x)
    assert out is model
    with pytest.raises(ValueError, match="example_input"):
        to_row_centric(_net(), mode="auto", rows="auto")
    with pytest.raises(ValueError, match="rows must be 'auto' or an integer"):
        to_row_centric(_net(), mode="auto", rows=-2, example_input=x)
    assert [c.rows for c in candidates_for("2ps", "auto")] == [2, 4, 8, 16, 32]
    assert candidates_for("auto", 5) == (Candidate("column"), Candidate("2ps", 5), Candidate("overl", 5))


def test_estimate_prunes_candidates_far_over_budget() -> None:
    """Candidates estimated well over the budget are reported, not run; the rest are measured."""
    model, x = _net().eval(), torch.randn(2, 3, 96, 96)
    plain_peak = measure(_step(copy.deepcopy(model), x)).peak_bytes
    choice = choose_plan([model], _step(model, x), memory_budget=int(0.5 * plain_peak),
                         candidates=(Candidate("column"), Candidate("overl", 8)))
    column, banded = choice.results
    assert column.note.startswith("skipped") and column.peak_bytes is None and column.estimate_bytes > plain_peak * 0.8
    assert banded.peak_bytes is not None and banded.estimate_bytes is not None and choice.best == Candidate("overl", 8)
    assert "estimate" in choice.report()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_on_a_gpu_each_mode_stops_at_the_fewest_bands_that_fit(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """On a GPU more bands only add launches: a mode's candidates beyond its first fitting one are not run. On
    a CPU all are. The fastest fitting one wins (measurements faked: peaks fall, times rise with the bands)."""
    run: list[Candidate] = []

    def fake(candidate: Candidate, *args: object) -> CandidateResult:
        run.append(candidate)
        peak = 1000 if candidate.mode == "column" else 1000 // candidate.rows
        seconds = 1.0 + candidate.rows / (10 if candidate.mode == "overl" else 5)
        return CandidateResult(candidate, peak, seconds, peak <= 150)

    monkeypatch.setattr("lightning_lrcnn.auto._measure", fake)
    monkeypatch.setattr("lightning_lrcnn.memory.device_memory", lambda device: 2**40)
    model = _net()
    cands = candidates_for("auto", "auto")
    choice = choose_plan([model], _step(model, torch.randn(1, 3, 32, 32)), memory_budget=150, candidates=cands,
                         device=device)
    assert [r.candidate for r in choice.results] == list(cands)  # every candidate reported, in the given order
    if device == "cpu":
        assert sorted(run, key=str) == sorted(cands, key=str)
    else:
        assert run == [Candidate("column"), Candidate("2ps", 2), Candidate("2ps", 4), Candidate("2ps", 8),
                       Candidate("overl", 2), Candidate("overl", 4), Candidate("overl", 8)]
        skipped = choice.result(Candidate("overl", 16))
        assert skipped is not None and skipped.peak_bytes is None and "overl:8 fits with fewer bands" in skipped.note
    assert choice.best == Candidate("overl", 8)  # 1.8 s against 2PS 8's 2.6 s
    assert row_centric_config(model).mode == "overl" and row_centric_config(model).rows == 8


def test_candidates_are_timed_over_several_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr("lightning_lrcnn.auto.time_call", lambda fn, device, repeats=1: calls.append(repeats) or 1.0)
    model, x = _net().eval(), torch.randn(1, 3, 64, 64)
    choose_plan([model], _step(model, x), memory_budget=2**40, candidates=(Candidate("column"), Candidate("overl", 2)),
                spend_budget=False)  # planned for its smallest peak, overl:2 bands
    assert calls == [TIMED_STEPS, TIMED_STEPS] and TIMED_STEPS >= 3


def test_candidates_that_run_as_usual_take_the_plain_models_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the plain model fits the budget, every candidate planned to spend it runs as usual: planned, not
    measured again (the probe of a model that fits costs one measurement), and the plain model is chosen."""
    calls: list[int] = []
    monkeypatch.setattr("lightning_lrcnn.auto.time_call", lambda fn, device, repeats=1: calls.append(repeats) or 1.0)
    model, x = _net().eval(), torch.randn(1, 3, 64, 64)
    cands = candidates_for("auto", "auto")
    choice = choose_plan([model], _step(model, x), memory_budget=2**40, candidates=cands)
    assert calls == [TIMED_STEPS]  # the plain model alone
    column = choice.baseline
    assert choice.best == Candidate("column") and column is not None and not is_row_centric(model)
    for r in choice.results[1:]:
        assert r.ran_plain and (r.peak_bytes, r.seconds) == (column.peak_bytes, column.seconds), r.row()
        assert "within memory_budget" in r.note and "the plain model's figures" in r.note


def test_the_plain_model_is_chosen_over_candidates_that_ran_as_usual(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under autocast nothing is estimated, so candidates that run as usual are measured like the others; the
    fastest of them by noise is still the plain model's step, and the choice says so: column."""
    times = iter([2.0] + [1.0] * 100)  # the plain model measured slowest
    monkeypatch.setattr("lightning_lrcnn.auto.time_call", lambda fn, device, repeats=1: next(times))
    model, x = _net().eval(), torch.randn(1, 3, 64, 64)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().sum().backward()

    choice = choose_plan([model], step, memory_budget=2**40, candidates=(Candidate("column"), Candidate("2ps", 2)))
    ran = choice.result(Candidate("2ps", 2))
    assert ran is not None and ran.ran_plain and ran.estimate_bytes is None, ran.row()
    assert choice.best == Candidate("column") and not is_row_centric(model)


def test_plans_spend_the_budget_and_fall_back_to_their_smallest_peaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidates are planned to spend ``PLAN_GOAL_FRACTION`` of the budget on time (the chosen module keeps that
    planning); where none of them then fits, they are measured again as planned for their smallest peaks."""
    import dataclasses

    import lightning_lrcnn.auto as auto

    model, x = _net().eval(), torch.randn(2, 3, 96, 96)
    budget = int(0.6 * measure(_step(copy.deepcopy(model), x)).peak_bytes)
    cands = candidates_for("auto", "auto")
    choice = choose_plan([model], _step(model, x), memory_budget=budget, candidates=cands)
    assert choice.plan_budget == int(auto.PLAN_GOAL_FRACTION * budget)
    assert row_centric_config(model).memory_budget == choice.plan_budget
    assert "plans spend up to" in choice.report()

    real = auto.measure
    spending: list[bool] = []
    columns: list[Candidate] = []
    real_measure_one = auto._measure

    def counting(candidate, *args):  # type: ignore[no-untyped-def]
        columns.extend([candidate] if candidate.mode == "column" else [])
        return real_measure_one(candidate, *args)

    def over_when_spending(fn, device):  # type: ignore[no-untyped-def]
        got = real(fn, device)
        cfg = row_centric_config(model)
        spending.append(cfg is not None and cfg.memory_budget is not None)
        return dataclasses.replace(got, peak_bytes=budget + 1) if spending[-1] else got

    monkeypatch.setattr(auto, "measure", over_when_spending)
    monkeypatch.setattr(auto, "_measure", counting)
    model = _net().eval()
    choice = choose_plan([model], _step(model, x), memory_budget=budget, candidates=cands)
    assert any(spending) and not spending[-1]  # measured spending first, then at the smallest peaks
    assert columns == [Candidate("column")]  # the plain model plans nothing: tried once
    assert choice.plan_budget is None and row_centric_config(model).memory_budget is None
    best = choice.result(choice.best)
    assert best is not None and best.fits and best.peak_bytes <= budget
