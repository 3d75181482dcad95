"""The demo's report folder: summary.json (everything), report.md (the table) and accuracy.png (curves)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastfit.perf.measure import environment, format_table


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for role, run in report["runs"].items():
        final = run.get("final") or {}
        trained = [h for h in run["history"] if "train_img_s" in h]
        images = sum(h["train_img_s"] * h["train_seconds"] for h in trained)
        seconds = sum(h["train_seconds"] for h in trained)
        rows.append(
            {
                "run": role,
                "model": run["student"],
                "params": run["student_params"],
                "top1": final.get("top1"),
                "top5": final.get("top5"),
                "train_img_s": images / seconds if seconds else None,
                "wall_s": run["wall_seconds"],
            }
        )
    return rows


def plot_curves(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for role, run in report["runs"].items():
        points = [(i + 1, h["top1"]) for i, h in enumerate(h for h in run["history"] if "top1" in h)]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{role} ({run['student']})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch (classification stages)")
    ax.set_ylabel("top-1 on the test set (%)")
    ax.set_title(f"fastfit demo: Fashion-MNIST, {report['budget']} budget on {report['device']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out: Path, report: dict[str, Any]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(report)
    table = format_table(rows, ["run", "model", "params", "top1", "top5", "train_img_s", "wall_s"])
    (out / "summary.json").write_text(
        json.dumps({"environment": environment(), **report, "table": rows}, indent=2, default=str) + "\n"
    )
    plot_curves(report, out / "accuracy.png")
    lines = [
        "# fastfit demo: FitNets on Fashion-MNIST",
        "",
        f"Budget: {report['budget']} on {report['device']}, total wall time {report['wall_seconds']:.0f} s.",
        "",
        "```",
        table,
        "```",
        "",
        "![top-1 per epoch](accuracy.png)",
        "",
        "Each run's config overrides and full history are in summary.json.",
        "",
        "One seed of the study's rows for this student (`fastfit study fmnist`: the same runs over 3 seeds, with the",
        "learning rate and temperature chosen on a validation split; its table is in the README and",
        "docs/results/study_fmnist.json). Read a difference between rows here against the study's spread over seeds,",
        "not as a verdict of its own.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return table
