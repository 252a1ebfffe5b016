"""The benchmark scripts' reports: which records make the backbone table, and how a method that did not run reads."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _backbones() -> ModuleType:
    spec = importlib.util.spec_from_file_location("backbones_script", SCRIPTS / "backbones.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rec(key: str, method: str, date: str, size: int = 1024, **extra: Any) -> dict[str, Any]:
    return {"key": key, "method": method, "date": date, "size": size, **extra}


def test_table_takes_each_methods_latest_record_at_the_latest_size() -> None:
    """A run that adds one method keeps the other methods' cells from the earlier run; a run at another size
    replaces the network's row instead of mixing sizes."""
    latest = _backbones()._latest
    early = [_rec("a", m, "2026-01-01") for m in ("plain", "2ps:16", "overl:16")]
    added = [_rec("a", m, "2026-01-02", tag="new") for m in ("plain", "auto:0.25")]
    rows = {r["method"]: r for r in latest(early + added)}
    assert set(rows) == {"plain", "2ps:16", "overl:16", "auto:0.25"}
    assert rows["plain"].get("tag") == "new" and "tag" not in rows["2ps:16"]
    resized = [_rec("a", "plain", "2026-01-03", size=512)]
    assert [(r["method"], r["size"]) for r in latest(early + added + resized)] == [("plain", 512)]


def test_a_budget_nothing_fits_shows_the_smallest_measured_peak() -> None:
    cell = _backbones()._error_cell
    error = ("NoPlanFitsError: no candidate fits memory_budget=431.3 MiB: the smallest peak was 445.0 MiB "
             "(overl:8). Remedy: raise memory_budget")
    assert cell(error, 1780 * 2**20) == "none fits (smallest 0.250, overl:8)"
    assert cell("RuntimeError: " + "x" * 80, 2**20) == ("RuntimeError: " + "x" * 80)[:40]
