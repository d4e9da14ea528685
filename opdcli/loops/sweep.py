"""`opd sweep`: train several methods from the same student, seed and budget, then compare.

    opd sweep --config configs/toy/ablation.yaml

The sweep file names a base training config, shared overrides, the seeds and the methods
(each with its own options and extra overrides). Every run gets its own directory under
`out_dir`; the comparison table (sweep.csv, sweep.md, sweep.png) reports held-out accuracy
before and after, wall time, tokens generated, tokens scored by the teacher and tokens
trained on, with the mean and spread over seeds; sweep_curves.csv / .png hold the learning
curves (opdcli.run.curves).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opdcli.config import TrainRunConfig, build_dataclass, load_config, read_yaml, to_dict
from opdcli.errors import ConfigError
from opdcli.run.curves import TRAIN_TIME, run_curve, write_curves
from opdcli.run.tracking import read_metrics


@dataclass(frozen=True)
class SweepMethod:
    name: str
    """Registered method name."""
    label: str | None = None
    """Row label (default: the name); must be unique."""
    options: dict[str, Any] = field(default_factory=dict)
    """method.options of this run."""
    set: list[str] = field(default_factory=list)
    """Extra key=value overrides of this run (e.g. loss.objective=sampled)."""


@dataclass(frozen=True)
class SweepConfig:
    base: str
    """Training config every run starts from (path relative to the sweep file or absolute)."""
    out_dir: str = "runs/sweep"
    seeds: list[int] = field(default_factory=lambda: [0])
    set: list[str] = field(default_factory=list)
    """Overrides shared by every run (budget: train.max_steps, rollout.*)."""
    methods: list[SweepMethod] = field(default_factory=list)
    target_accuracy: float | None = None
    """Held-out (greedy) accuracy whose first crossing gives each run's time-to-target: the
    training time (sample + score + method + train) up to the first evaluation at or above it
    (set eval.every for a curve; the evaluation before training counts as time 0)."""


def load_sweep(path: Path) -> SweepConfig:
    raw = read_yaml(path)
    methods = raw.pop("methods", None)
    if not isinstance(methods, list) or not methods:
        raise ConfigError(f"sweep file '{path}' needs a non-empty 'methods' list")
    cfg = build_dataclass(SweepConfig, raw)
    parsed = [build_dataclass(SweepMethod, m, prefix=f"methods[{i}].") if isinstance(m, dict)
              else build_dataclass(SweepMethod, {"name": m}) for i, m in enumerate(methods)]
    labels = [m.label or m.name for m in parsed]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"sweep file '{path}': method labels must be unique, got {labels}")
    base = Path(cfg.base) if Path(cfg.base).is_absolute() else path.parent / cfg.base
    if cfg.target_accuracy is not None and not 0.0 < cfg.target_accuracy <= 1.0:
        raise ConfigError(f"sweep file '{path}': target_accuracy is {cfg.target_accuracy}; it is a fraction in "
                          "(0, 1], e.g. 0.3 for 30%")
    return SweepConfig(base=str(base), out_dir=cfg.out_dir, seeds=cfg.seeds, set=cfg.set, methods=parsed,
                       target_accuracy=cfg.target_accuracy)


def run_overrides(sweep: SweepConfig, method: SweepMethod, seed: int) -> list[str]:
    label = method.label or method.name
    opts = [f"method.options.{k}={v}" for k, v in method.options.items()]
    return [*sweep.set, f"method.name={method.name}", *opts, *method.set, f"run.seed={seed}",
            f"run.out_dir={Path(sweep.out_dir) / f'{label}-seed{seed}'}", "run.overwrite=true"]


def time_to_target(rows: list[dict[str, Any]], target: float) -> tuple[float, float]:
    """(training seconds, steps) up to the first held-out evaluation at or above `target`, or
    (nan, nan) when no evaluation reaches it."""
    evals, _ = run_curve(rows)
    hit = next((p for p in evals if p["accuracy"] >= target), None)
    return (hit["train_s"], hit["step"]) if hit is not None else (math.nan, math.nan)


def summarize_run(rows: list[dict[str, Any]], wall: float, target: float | None = None) -> dict[str, float]:
    """The sweep row of one run from its metrics rows (read once; the curves reuse them)."""
    steps = [r for r in rows if "loss/total" in r]

    def total(key: str) -> float:
        return sum(r.get(key) or 0.0 for r in steps)

    before = next(r["eval_before/heldout/accuracy"] for r in rows if "eval_before/heldout/accuracy" in r)
    after = next(r["eval_after/heldout/accuracy"] for r in rows if "eval_after/heldout/accuracy" in r)
    extra: dict[str, float] = {}
    sampled = [r["eval_after/heldout_sampled/accuracy"] for r in rows if "eval_after/heldout_sampled/accuracy" in r]
    if sampled:
        extra["acc_after_sampled"] = sampled[0]
    if target is not None:
        extra["time_to_target_s"], extra["steps_to_target"] = time_to_target(rows, target)
    return extra | {"acc_before": before, "acc_after": after, "wall_s": wall,
            "train_s": sum(total(k) for k in TRAIN_TIME),
            "tokens_generated": total("rollout/tokens"),
            # online truncation scores tokens during sampling; the scorer re-runs the teacher
            # only on tokens whose follower states it could not reuse
            "tokens_scored": total("rollout/tokens") + sum(total(k) for k in online_keys(steps))
            - sum(total(k) for k in reused_keys(steps)),
            "tokens_trained": total("train/tokens_trained")}


def online_keys(steps: list[dict[str, float]]) -> set[str]:
    return {k for r in steps for k in r if k.endswith("/online_teacher_tokens")}


def reused_keys(steps: list[dict[str, float]]) -> set[str]:
    return {k for r in steps for k in r if k.endswith("/online_reused_tokens")}


ROW_FILE = "sweep_row.json"


def finished_row(cfg: TrainRunConfig) -> dict[str, Any] | None:
    """The summary of a finished run of exactly this config in its out_dir, else None.

    A run counts as finished when it wrote its sweep row after the final evaluation and its
    saved config.yaml equals `cfg` (any change of method, option, seed or budget reruns it).
    """
    run_dir = Path(cfg.run.out_dir)
    row_file, saved = run_dir / ROW_FILE, run_dir / "config.yaml"
    if not (row_file.is_file() and saved.is_file()):
        return None
    try:
        same = yaml.safe_load(saved.read_text(encoding="utf-8")) == to_dict(cfg)
        return json.loads(row_file.read_text(encoding="utf-8")) if same else None
    except (OSError, ValueError, yaml.YAMLError):
        return None


RESERVED = ("run.out_dir", "run.seed", "run.overwrite", "method.")
"""Keys the sweep sets per run; a command-line --set of them would collide across runs."""


def run_sweep(path: Path, argv: list[str], *, train: Callable[..., Any], skip_done: bool = False,
              extra: list[str] | None = None, echo: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Train every (method, seed) of the sweep file with `train` (the CLI passes
    opdcli.loops.train.run_train); `extra` are --set overrides for every run."""
    sweep = load_sweep(path)
    for item in extra or []:
        key = item.split("=", 1)[0].strip()
        if any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESERVED):
            raise ConfigError(f"--set {key} cannot apply to a sweep: the sweep sets it per run; change "
                              "out_dir, seeds or methods in the sweep file instead")
    if extra:
        sweep = dataclasses.replace(sweep, set=[*sweep.set, *extra])
    # validate every run's config before the first one trains
    plans = []
    for method in sweep.methods:
        for seed in sweep.seeds:
            cfg, explicit = load_config(TrainRunConfig, sweep.base, run_overrides(sweep, method, seed))
            plans.append((method, seed, cfg, explicit))
    rows, curves = [], []
    say = echo if echo is not None else (lambda text: None)
    for i, (method, seed, cfg, explicit) in enumerate(plans, 1):
        row = {"method": method.label or method.name, "seed": seed}
        done = finished_row(cfg) if skip_done else None
        if done is not None:
            say(f"[{i}/{len(plans)}] {row['method']} seed {seed}: finished in {cfg.run.out_dir}, reused (--skip-done)")
            # from the run's metrics again: the sweep's target_accuracy may have changed since
            metrics = read_metrics(Path(cfg.run.out_dir) / "metrics.jsonl")
            rows.append(row | summarize_run(metrics, done["wall_s"], sweep.target_accuracy))
            curves.append((row["method"], seed, metrics))
            continue
        say(f"[{i}/{len(plans)}] {row['method']} seed {seed}: training -> {cfg.run.out_dir}")
        (Path(cfg.run.out_dir) / ROW_FILE).unlink(missing_ok=True)  # a rerun must not leave a stale row
        start = time.perf_counter()
        result = train(cfg, explicit, argv=argv)
        wall = time.perf_counter() - start
        metrics = read_metrics(Path(result.run_dir) / "metrics.jsonl")
        summary = summarize_run(metrics, wall, sweep.target_accuracy)
        curves.append((row["method"], seed, metrics))
        (Path(result.run_dir) / ROW_FILE).write_text(json.dumps(summary) + "\n", encoding="utf-8")
        rows.append(row | summary)
        say(f"[{i}/{len(plans)}] {row['method']} seed {seed}: held-out accuracy {100 * summary['acc_before']:.1f}% -> "
            f"{100 * summary['acc_after']:.1f}% in {summary['wall_s']:.0f} s")
    write_table(rows, Path(sweep.out_dir))
    write_curves(curves, Path(sweep.out_dir))
    return rows


COLUMNS = ["acc_before", "acc_after", "wall_s", "train_s", "tokens_generated", "tokens_scored", "tokens_trained"]
OPTIONAL_COLUMNS = ["acc_after_sampled", "time_to_target_s", "steps_to_target"]
"""Present when the runs have them; NaN (target not reached) is left out of the mean and std,
and `reached` counts the runs that reached the target."""


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for label in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == label]
        agg: dict[str, Any] = {"method": label, "seeds": len(group)}
        for col in COLUMNS + [c for c in OPTIONAL_COLUMNS if all(c in r for r in group)]:
            values = [float(r[col]) for r in group if not math.isnan(float(r[col]))]
            agg[col] = statistics.fmean(values) if values else math.nan
            agg[f"{col}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            if col == "time_to_target_s":
                agg["reached"] = len(values)
        out.append(agg)
    return out


def write_table(rows: list[dict[str, Any]], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out_dir / "sweep_runs.csv", index=False)
    agg = aggregate(rows)
    pd.DataFrame(agg).to_csv(out_dir / "sweep.csv", index=False)
    sampled = all("acc_after_sampled" in a for a in agg)
    target = all("time_to_target_s" in a for a in agg)
    head = "| method | seeds | acc before | acc after" + (" | sampled acc after" if sampled else "") + \
        (" | time to target s (reached)" if target else "") + " | wall s | tokens generated | tokens scored | tokens trained |"
    lines = [head, "|" + "---|" * (8 + sampled + target)]

    def pm(a: dict[str, Any], col: str, scale: float, unit: str, digits: int) -> str:
        if math.isnan(a[col]):
            return "-"
        spread = f" ± {scale * a[col + '_std']:.{digits}f}" if a["seeds"] > 1 else ""
        return f"{scale * a[col]:.{digits}f}{unit}{spread}"

    for a in agg:
        cells = [a["method"], str(a["seeds"]), f"{100 * a['acc_before']:.1f}%", pm(a, "acc_after", 100, "%", 1)]
        if sampled:
            cells.append(pm(a, "acc_after_sampled", 100, "%", 1))
        if target:
            cells.append(f"{pm(a, 'time_to_target_s', 1, '', 0)} ({a['reached']}/{a['seeds']})")
        cells += [f"{a['wall_s']:.0f}", f"{a['tokens_generated']:.0f}", f"{a['tokens_scored']:.0f}",
                  f"{a['tokens_trained']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [a["method"] for a in agg]
    axes[0].bar(names, [100 * a["acc_after"] for a in agg], yerr=[100 * a["acc_after_std"] for a in agg],
                color="tab:blue", label="after")
    axes[0].plot(names, [100 * a["acc_before"] for a in agg], "k_", markersize=20, label="before")
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[0].legend()
    axes[1].bar(names, [a["tokens_trained"] for a in agg], color="tab:orange", label="trained on")
    axes[1].plot(names, [a["tokens_generated"] for a in agg], "k_", markersize=20, label="generated")
    axes[1].set_ylabel("tokens")
    axes[1].legend()
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out_dir / "sweep.png", dpi=120)
    plt.close(fig)
