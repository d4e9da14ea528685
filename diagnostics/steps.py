"""Analysis 9: every headline number per training step, when the input spans several steps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from diagnostics.section import Section, skipped, write_csv

TITLE = "Headline numbers per step"
DESCRIPTION = ("Each analysis's headline numbers computed separately for every `step` value in "
               "the input (steps.csv), and the main ones plotted over steps (steps.png).")
PLOTTED = ("adv_std_late_over_early", "corr_early", "corr_late", "margin_late_over_early",
           "release_accept_rate", "release_gain_mean", "release_kept_fraction", "overlap_mean",
           "drift_rate", "eff_len_mean", "topd_low_div_share", "d_roll_mean")


def per_step(analyses: list[Any]) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} merged over all analyses."""
    table: dict[int, dict[str, float]] = {}
    for analysis in analyses:
        for step, metrics in analysis.step_metrics().items():
            table.setdefault(step, {}).update(metrics)
    return dict(sorted(table.items()))


def steps_section(analyses: list[Any], steps: set[int], out: Path) -> tuple[Section, dict]:
    """The per-step section and its table (empty when the input holds a single step)."""
    if len(steps) < 2:
        return skipped("steps", TITLE, DESCRIPTION,
                       f"skipped: the input holds a single step ({next(iter(steps), '-')})"), {}
    table = per_step(analyses)
    columns = sorted({m for metrics in table.values() for m in metrics})
    rows = [{"step": step, **metrics} for step, metrics in table.items()]
    sec = Section("steps", TITLE, DESCRIPTION)
    sec.files.append(write_csv(out / "steps.csv", rows, ["step", *columns]))
    shown = [m for m in PLOTTED if m in columns]
    if shown:
        sec.files.append(_plot(out, table, shown))
    first, last = min(table), max(table)
    sec.rows = [("steps", f"{len(table)} ({first}..{last})")]
    sec.rows += [(f"{m}: step {first} -> {last}", f"{_fmt(table[first].get(m))} -> {_fmt(table[last].get(m))}")
                 for m in shown]
    return sec, table


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


def _plot(out: Path, table: dict[int, dict[str, float]], shown: list[str]) -> str:
    from diagnostics import plots

    steps = list(table)
    with plots.figure(out / "steps.png", len(shown), "Headline numbers per step", cols=3) as axes:
        for ax, metric in zip(axes, shown, strict=True):
            values = [table[s].get(metric, float("nan")) for s in steps]
            plots.lines(ax, steps, {metric: values}, xlabel="step", ylabel=metric, title=metric)
            ax.xaxis.get_major_locator().set_params(integer=True)
    return "steps.png"
