"""One-step-off pipelining: sample step n+1 while step n trains, against the synchronous loop.

    python -m benchmarks.speed.pipeline --steps 40 --skip 5 --rounds 3 --out runs/speed-pipeline

Runs `opd train` on the toy config (loss.objective=rkl, held-out evaluation off) in turns:
`train.mode=sync`, then `train.mode=async` with one Ray rollout worker, one batch in flight
and rows at most one version old (`asynchronous.workers=1 buffer=1 max_lag=1`), `--rounds`
times. For each run it reads metrics.jsonl and reports the median wall time of a step
(time/step_total, the first `--skip` steps left out), trained tokens per second, the mean
version lag of the trained rows and the last steps' teacher KL. Writes pipeline.csv and
pipeline.png under --out. Run it alone on quiet cores: the figures are wall times.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODES = {
    "sync": ["train.mode=sync"],
    "one-step-off": ["train.mode=async", "asynchronous.workers=1", "asynchronous.buffer=1",
                     "asynchronous.max_lag=1"],
}


def run_mode(mode: str, out: Path, steps: int, sets: list[str]) -> list[dict]:
    """One `opd train` run of `mode`; its per-step metric rows."""
    from opdcli.run.tracking import read_metrics

    cmd = [sys.executable, "-m", "opdcli.cli", "train", "--config", str(ROOT / "configs/toy/opd.yaml"),
           "--set", f"run.out_dir={out}", "--set", "run.overwrite=true", "--set", f"train.max_steps={steps}",
           "--set", "eval.enabled=false", "--set", "train.rollouts_every=0", "--set", "train.save_every=0",
           *(a for s in MODES[mode] + sets for a in ("--set", s))]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss/total" in r]


def summarise(mode: str, rows: list[dict], skip: int) -> dict:
    kept = rows[skip:]
    step = statistics.median(r["time/step_total"] for r in kept)
    tokens = statistics.median(r["train/tokens_trained"] for r in kept)
    tail = kept[-5:]
    return {"mode": mode, "steps": len(rows), "step_s": step, "tokens_per_s": tokens / step,
            "lag_mean": statistics.fmean(r.get("async/lag_mean", 0.0) for r in kept),
            "teacher_kl_last5": statistics.fmean(r["signal/teacher_kl"] for r in tail)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the medians (warm-up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/speed-pipeline"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra config override (key=value)")
    args = ap.parse_args(argv)
    if args.steps <= args.skip:
        raise SystemExit(f"--steps ({args.steps}) must exceed --skip ({args.skip})")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="opd-pipeline-") as tmp:
        for r in range(args.rounds):
            for mode in MODES:
                rows = run_mode(mode, Path(tmp) / f"{mode}-{r}", args.steps, args.sets)
                results.append({"round": r, **summarise(mode, rows, args.skip)})
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in results[-1].items()}, flush=True)
    with open(args.out / "pipeline.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    med = {m: statistics.median(x["step_s"] for x in results if x["mode"] == m) for m in MODES}
    print(f"median step: sync {med['sync']:.3f} s, one-step-off {med['one-step-off']:.3f} s "
          f"({med['sync'] / med['one-step-off']:.2f}x)")
    _plot(results, args.out / "pipeline.png")
    print(f"wrote {args.out / 'pipeline.csv'} and pipeline.png")


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for i, mode in enumerate(MODES):
        ys = [x["step_s"] for x in results if x["mode"] == mode]
        ax.scatter([i] * len(ys), ys, label=mode)
    ax.set_xticks(range(len(MODES)), list(MODES))
    ax.set_ylabel("median step wall time (s)")
    ax.set_title("one-step-off pipelining (toy, rkl)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
