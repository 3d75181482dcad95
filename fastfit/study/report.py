"""The study's table: per student and row, test top-1 as mean ± std over seeds, parameters, epochs, wall time."""

from __future__ import annotations

import statistics
from typing import Any


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def results_table(report: dict[str, Any]) -> str:
    """Markdown: one line per (student, row) in run order, then the teacher and the chosen settings."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in report["runs"]:
        groups.setdefault((run["student"], run["row"]), []).append(run)
    seeds = len(report["seeds"])
    lines = [
        f"| student | row | test top-1 (mean ± std, {seeds} seeds) | parameters | epochs | wall time per run |",
        "|---|---|---|---|---|---|",
    ]
    for (student, row), runs in groups.items():
        lines.append(
            f"| {student} | {row} | {_mean_std([r['top1'] for r in runs])} | {runs[0]['params']:,} | "
            f"{runs[0]['epochs']} | {statistics.mean(r['wall_seconds'] for r in runs):.0f} s |"
        )
    teacher = report["teacher"]
    test_top1 = [r["teacher_top1"] for r in report["runs"] if r.get("teacher_top1") is not None]
    lines.append("")
    lines.append(
        f"Teacher `wide_cnn` ({teacher['params']:,} parameters, {teacher['epochs']} epochs): "
        f"top-1 {test_top1[0]:.2f} on test."
        if test_top1
        else f"Teacher: top-1 {teacher['top1']:.2f} on validation."
    )
    chosen = ", ".join(
        f"{student}: lr {entry['chosen']['lr']}, τ {entry['chosen']['temperature']}"
        for student, entry in report["search"].items()
    )
    lines.append(f"Chosen on the validation split: {chosen}.")
    return "\n".join(lines)
