"""A sweep's learning curves: held-out accuracy against training steps and training seconds,
and the tokens each step generated, per method (mean and spread over seeds).

`opd sweep` writes sweep_curves.csv (one row per run and evaluation) and sweep_curves.png
beside its table; time-to-target comparisons read the curve, not only the final point.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

TRAIN_TIME = ("time/sample", "time/score", "time/method", "time/train")
"""The training seconds of a step (sampling, scoring, the method's weights, the update); the
evaluations, logging and checkpoints are left out."""


def run_curve(rows: list[dict[str, Any]]) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """(evaluations, steps) of one run's metrics rows: every held-out evaluation with the
    training seconds spent before it (greedy accuracy, and the sampled one where it was taken),
    and every step's generated tokens."""
    evals, steps, spent = [], [], 0.0
    for r in rows:
        if "loss/total" in r:
            spent += sum(r.get(k) or 0.0 for k in TRAIN_TIME)
            steps.append({"step": float(r["progress/step"]), "tokens_generated": float(r.get("rollout/tokens") or 0.0)})
        for label in ("eval_before", "eval", "eval_after"):
            if f"{label}/heldout/accuracy" in r:
                point = {"step": float(r["progress/step"]), "train_s": spent,
                         "accuracy": float(r[f"{label}/heldout/accuracy"])}
                if f"{label}/heldout_sampled/accuracy" in r:
                    point["sampled_accuracy"] = float(r[f"{label}/heldout_sampled/accuracy"])
                evals.append(point)
    return evals, steps


def mean_curve(curves: list[list[dict[str, float]]], key: str) -> list[tuple[float, float, float, float]]:
    """(step, mean train_s, mean, std) of `key` at the steps every run evaluated."""
    common = set.intersection(*({p["step"] for p in c if key in p} for c in curves)) if curves else set()
    out = []
    for step in sorted(common):
        points = [next(p for p in c if p["step"] == step and key in p) for c in curves]
        values = [p[key] for p in points]
        out.append((step, statistics.fmean(p["train_s"] for p in points), statistics.fmean(values),
                    statistics.stdev(values) if len(values) > 1 else 0.0))
    return out


def write_curves(runs: list[tuple[str, int, list[dict[str, Any]]]], out_dir: Path) -> None:
    """sweep_curves.csv and sweep_curves.png of the (label, seed, metrics rows) runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    table, by_label = [], {}
    for label, seed, rows in runs:
        evals, steps = run_curve(rows)
        table += [{"method": label, "seed": seed} | p for p in evals]
        by_label.setdefault(label, []).append((evals, steps))
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(table).to_csv(out_dir / "sweep_curves.csv", index=False)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, group in by_label.items():
        curve = mean_curve([evals for evals, _ in group], "accuracy")
        if curve:
            step, seconds, mean, std = (list(col) for col in zip(*curve, strict=True))
            line, = axes[0].plot(step, [100 * m for m in mean], marker="o", label=label)
            axes[0].fill_between(step, [100 * (m - s) for m, s in zip(mean, std, strict=True)],
                                 [100 * (m + s) for m, s in zip(mean, std, strict=True)], color=line.get_color(), alpha=0.15)
            axes[1].errorbar(seconds, [100 * m for m in mean], yerr=[100 * s for s in std], marker="o",
                             color=line.get_color(), label=label, capsize=3)
        per_step = [steps for _, steps in group]
        n = min(len(s) for s in per_step)
        axes[2].plot(range(1, n + 1), [statistics.fmean(s[i]["tokens_generated"] for s in per_step) for i in range(n)],
                     label=label)
    axes[0].set(xlabel="training step", ylabel="held-out accuracy, greedy (%)")
    axes[1].set(xlabel="training seconds (sample + score + method + train)", ylabel="held-out accuracy, greedy (%)")
    axes[2].set(xlabel="training step", ylabel="tokens generated per step")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "sweep_curves.png", dpi=120)
    plt.close(fig)
