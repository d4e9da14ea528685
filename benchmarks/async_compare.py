"""Synchronous OPD vs asynchronous OPD without control vs f-OPD on the toy worlds.

    python -m benchmarks.async_compare --out runs/async-compare            # short and long, 3 seeds
    python -m benchmarks.async_compare --out runs/async-forms --tasks forms  # the forms world
    python -m benchmarks.async_compare --out runs/ac --tasks short --seeds 0 --steps 20
    python -m benchmarks.async_compare --out runs/ac --tasks short --arms fopd-no-penalty fopd-no-drop
    python -m benchmarks.async_compare --out runs/ac --report-only     # the tables of what has run

Every run is an `opd train` subprocess, one after the other (never two at once, so that the wall
times compare). The asynchronous arms push the version lag up on purpose: `--buffer` batches in
flight (the lag of a steady-state batch equals it) and `asynchronous.max_lag` at the same value,
so that "async without control" drops nothing and trains on every stale row as it is. Held-out
accuracy is read at equal optimizer steps (the end of every run) and at equal training wall time
(the last held-out evaluation reached within the shortest arm's training time; evaluation time
is not counted). Arms sync, async-no-control and fopd run by default; fopd-no-penalty, fopd-no-drop
and fopd-prefix-is switch one f-OPD piece off each. Writes runs.csv (one row per run), summary.csv and summary.md (mean and std
over seeds), curves.csv and accuracy.png (accuracy against steps and against wall time).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "short": {"config": "configs/toy/opd.yaml", "steps": 100, "eval_every": 25, "eval_size": 256},
    "long": {"config": "configs/toy/long/opd.yaml", "steps": 80, "eval_every": 20, "eval_size": 128},
    # the second toy world's compatible pair (answers of about 200 BPE tokens), opt-in: --tasks forms
    "forms": {"config": "configs/toy/forms/opd.yaml", "steps": 80, "eval_every": 20, "eval_size": 1024},
}
DEFAULT_TASKS = ["short", "long"]


MAIN_ARMS = ["sync", "async-no-control", "fopd"]


def arms(buffer: int, workers: int) -> dict[str, list[str]]:
    lagged = ["train.mode=async", f"asynchronous.workers={workers}", f"asynchronous.buffer={buffer}",
              f"asynchronous.max_lag={buffer}", "asynchronous.worker_threads=1", "run.threads=1"]
    return {"sync": ["method.name=opd", "run.threads=2"],
            "async-no-control": ["method.name=opd", *lagged],
            "fopd": ["method.name=fopd", *lagged],
            "fopd-no-penalty": ["method.name=fopd", "method.options.drift_target=null", *lagged],
            "fopd-no-drop": ["method.name=fopd", "method.options.f_min=0", *lagged],
            "fopd-prefix-is": ["method.name=fopd", "method.options.importance=prefix", *lagged]}


def run_one(out: Path, task: str, arm: str, sets: list[str], seed: int, steps: int | None) -> dict:
    t = TASKS[task]
    run_dir = out / task / arm / f"seed{seed}"
    n = steps or t["steps"]
    args = [str(Path(sys.executable).parent / "opd"), "train", "--config", str(ROOT / t["config"]),
            "--set", f"run.out_dir={run_dir}", "--set", "run.overwrite=true", "--set", f"run.seed={seed}",
            "--set", f"train.max_steps={n}", "--set", f"eval.every={min(t['eval_every'], n)}",
            "--set", f"eval.size={t['eval_size']}", "--set", "train.rollouts_every=0"]
    for s in sets:
        args += ["--set", s]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    if proc.returncode != 0:
        raise SystemExit(f"{task}/{arm}/seed{seed} failed:\n{proc.stderr[-3000:]}")
    return {"task": task, "arm": arm, "seed": seed, "process_s": time.perf_counter() - start}


def load(out: Path, run: dict) -> dict:
    """A finished run's figures, read from its metrics.jsonl."""
    path = out / run["task"] / run["arm"] / f"seed{run['seed']}" / "metrics.jsonl"
    return run | summarize([json.loads(line) for line in path.read_text().splitlines()])


def summarize(rows: list[dict]) -> dict:
    """One run's figures; `curve` holds (step, training seconds, accuracy) at every evaluation."""
    train_s, curve, tokens, idle, lags, dropped = 0.0, [], 0.0, [], [], []
    for r in rows:
        if "eval_before/heldout/accuracy" in r:
            curve.append((0, 0.0, r["eval_before/heldout/accuracy"]))
            continue
        if "eval_after/heldout/accuracy" in r:  # the last step's evaluation
            curve.append((r["progress/step"], train_s, r["eval_after/heldout/accuracy"]))
            continue
        train_s += r.get("time/step_total", 0.0)
        tokens += r.get("rollout/tokens", 0.0)
        if "async/learner_idle_frac" in r:
            idle.append(r["async/learner_idle_frac"])
            lags.append(r["async/lag_mean"])
            dropped.append(max(r.get("async/dropped_stale_frac", 0.0), r.get("method/fopd/dropped_frac", 0.0)))
        if "eval/heldout/accuracy" in r:
            curve.append((r["progress/step"], train_s, r["eval/heldout/accuracy"]))
    return {"acc_before": curve[0][2], "acc_after": curve[-1][2], "train_s": train_s,
            "tokens_per_s": tokens / max(train_s, 1e-9), "learner_idle": _mean(idle), "lag_mean": _mean(lags),
            "dropped": _mean(dropped), "curve": curve}


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else 0.0


def at_wall(curve: list[tuple], budget: float) -> float:
    """Accuracy of the last evaluation within `budget` training seconds."""
    return [acc for _, s, acc in curve if s <= budget + 1e-9][-1]


def report(out: Path, runs: list[dict]) -> None:
    keys = ["task", "arm", "seed", "acc_before", "acc_after", "acc_equal_wall", "train_s", "tokens_per_s",
            "learner_idle", "lag_mean", "dropped", "process_s"]
    for task in sorted({r["task"] for r in runs}):
        mine = [r for r in runs if r["task"] == task]
        budget = min(statistics.median(r["train_s"] for r in mine if r["arm"] == a) for a in {r["arm"] for r in mine})
        for r in mine:
            r["acc_equal_wall"], r["wall_budget"] = at_wall(r["curve"], budget), budget
    with (out / "runs.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(runs)
    with (out / "curves.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "arm", "seed", "step", "train_s", "accuracy"])
        for r in runs:
            w.writerows([r["task"], r["arm"], r["seed"], *point] for point in r["curve"])
    lines = ["| task | arm | seeds | acc after (equal steps) | acc at equal wall | wall budget s | "
             "train s | tokens/s | learner idle | lag mean | dropped |", "|---" * 11 + "|"]
    summary = []
    for task in sorted({r["task"] for r in runs}):
        for arm in arms(1, 1):
            mine = [r for r in runs if r["task"] == task and r["arm"] == arm]
            if not mine:
                continue
            row = {"task": task, "arm": arm, "seeds": len(mine), "wall_budget": mine[0]["wall_budget"]}
            for k in ("acc_after", "acc_equal_wall", "train_s", "tokens_per_s", "learner_idle", "lag_mean", "dropped"):
                vals = [r[k] for r in mine]
                row[k], row[k + "_std"] = statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
            summary.append(row)
            lines.append(f"| {task} | {arm} | {row['seeds']} | {100 * row['acc_after']:.1f}% ± "
                         f"{100 * row['acc_after_std']:.1f} | {100 * row['acc_equal_wall']:.1f}% ± "
                         f"{100 * row['acc_equal_wall_std']:.1f} | {row['wall_budget']:.0f} | {row['train_s']:.0f} | "
                         f"{row['tokens_per_s']:.0f} | {row['learner_idle']:.2f} | {row['lag_mean']:.1f} | "
                         f"{row['dropped']:.2f} |")
    with (out / "summary.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(out, runs)


def _plot(out: Path, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in runs})
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.6 * len(tasks)), squeeze=False)
    colors = {"sync": "C0", "async-no-control": "C3", "fopd": "C2", "fopd-no-penalty": "C1", "fopd-no-drop": "C4",
              "fopd-prefix-is": "C5"}
    for i, task in enumerate(tasks):
        for r in (r for r in runs if r["task"] == task):
            steps, secs, acc = zip(*r["curve"], strict=True)
            label = r["arm"] if r["seed"] == min(x["seed"] for x in runs) else None
            axes[i][0].plot(steps, acc, color=colors[r["arm"]], alpha=0.7, label=label)
            axes[i][1].plot(secs, acc, color=colors[r["arm"]], alpha=0.7, label=label)
        axes[i][0].set(title=f"{task}: accuracy vs optimizer steps", xlabel="step", ylabel="held-out accuracy")
        axes[i][1].set(title=f"{task}: accuracy vs training wall time", xlabel="seconds (evaluation excluded)")
        axes[i][0].legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="override every task's optimizer steps")
    p.add_argument("--buffer", type=int, default=8, help="batches in flight = the steady-state lag")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--arms", nargs="+", default=MAIN_ARMS, choices=list(arms(8, 1)),
                   help="the arms to run (the ablations of f-OPD's pieces are off by default)")
    p.add_argument("--report-only", action="store_true", help="run nothing; report the finished runs")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    done = a.out / "runs.jsonl"
    runs = [json.loads(line) for line in done.read_text().splitlines()] if done.exists() else []
    for task in a.tasks:
        for seed in a.seeds:
            for arm, sets in arms(a.buffer, a.workers).items():
                if arm not in a.arms:
                    continue
                if a.report_only or any(r["task"] == task and r["arm"] == arm and r["seed"] == seed for r in runs):
                    continue  # finished in an earlier invocation
                print(f"{task} {arm} seed {seed} ...", flush=True)
                runs.append(run_one(a.out, task, arm, sets, seed, a.steps))
                with done.open("a") as fh:
                    fh.write(json.dumps({k: runs[-1][k] for k in ("task", "arm", "seed", "process_s")}) + "\n")
    report(a.out, [load(a.out, r) for r in runs if r["task"] in a.tasks and r["seed"] in a.seeds
                   and r["arm"] in a.arms])


if __name__ == "__main__":
    main()
