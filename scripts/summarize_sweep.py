"""Summarise a Hydra multirun of scripts/train.py: a markdown table and a PNG plot in the sweep folder.

    python scripts/summarize_sweep.py multirun/2026-11-24/19-00-00
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import yaml

KEYS = ("lrcnn/peak_memory_mib", "lrcnn/baseline_peak_memory_mib", "lrcnn/memory_saved_pct",
        "lrcnn/step_time_ratio", "lrcnn/rows", "val_acc")


def read_job(job: Path) -> dict[str, object] | None:
    """Overrides and the last logged value of each key of one job folder (None if it is not a job)."""
    overrides_file, metrics_file = job / ".hydra" / "overrides.yaml", job / "metrics.csv"
    if not overrides_file.is_file():
        return None
    overrides = yaml.safe_load(overrides_file.read_text()) or []
    row: dict[str, object] = {"job": job.name, "overrides": " ".join(overrides)}
    if metrics_file.is_file():
        with metrics_file.open() as f:
            for record in csv.DictReader(f):
                for key in KEYS:
                    if record.get(key) not in (None, ""):
                        row[key] = float(record[key])
    hparams = job / "hparams.yaml"
    if hparams.is_file():
        row["mode"] = (yaml.safe_load(hparams.read_text()) or {}).get("lrcnn/mode", "?")
    return row


def _fmt(value: object, spec: str) -> str:
    if not isinstance(value, float) or math.isnan(value):
        return "n/a"
    return format(value, spec)


def markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| job | overrides | mode | rows | peak MiB | plain MiB | saved % | step time x | val acc |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['job']} | `{r['overrides']}` | {r.get('mode', '?')} | {_fmt(r.get('lrcnn/rows'), '.0f')} "
                     f"| {_fmt(r.get('lrcnn/peak_memory_mib'), '.1f')} "
                     f"| {_fmt(r.get('lrcnn/baseline_peak_memory_mib'), '.1f')} "
                     f"| {_fmt(r.get('lrcnn/memory_saved_pct'), '.1f')} "
                     f"| {_fmt(r.get('lrcnn/step_time_ratio'), '.2f')} "
                     f"| {_fmt(r.get('val_acc'), '.3f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r["overrides"]) or str(r["job"]) for r in rows]
    peak = [float(r.get("lrcnn/peak_memory_mib", float("nan"))) for r in rows]  # type: ignore[arg-type]
    ratio = [float(r.get("lrcnn/step_time_ratio", float("nan"))) for r in rows]  # type: ignore[arg-type]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 2), sharey=True)
    axes[0].barh(labels, peak, color="tab:blue")
    axes[0].set_xlabel("peak memory of one step (MiB)")
    axes[1].barh(labels, ratio, color="tab:orange")
    axes[1].set_xlabel("step time / plain model")
    axes[1].axvline(1.0, color="grey", lw=0.8)
    fig.suptitle("lightning_lrcnn sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the Hydra sweep folder (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: no such sweep folder: {args.sweep_dir}", file=sys.stderr)
        return 2
    jobs = sorted((p for p in args.sweep_dir.iterdir() if p.is_dir()),
                  key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    rows = [r for r in (read_job(j) for j in jobs) if r is not None]
    if not rows:
        print(f"error: {args.sweep_dir} holds no Hydra job folders (with .hydra/overrides.yaml)", file=sys.stderr)
        return 2
    table = markdown(rows)
    (args.sweep_dir / "sweep_summary.md").write_text(table)
    plot(rows, args.sweep_dir / "sweep_summary.png")
    print(table)
    print(f"wrote {args.sweep_dir / 'sweep_summary.md'} and {args.sweep_dir / 'sweep_summary.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
