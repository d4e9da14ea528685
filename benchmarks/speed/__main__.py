"""Where a training step's time goes, and how close it is to the sum of its parts.

    python -m benchmarks.speed --out runs/speed                    # toy and large setups
    python -m benchmarks.speed --setups toy --reps 20 --set run.dtype=bfloat16

Setups: `toy` (the shipped toy pair, 64 sequences x up to 40 new tokens, full-vocabulary reverse
KL, as issue-style comparisons use) and `large` (a random toy-shaped pair of about 6M / 19M
parameters, 16 sequences x 256 new tokens). For each it times, in one process and alternating,
the full `opd train` step and its parts alone (parts.py), `--reps` times after `--warmup`
rounds, and prints medians: step / sum(parts) (the pipeline's overhead), tokens trained per
second, peak memory of scoring vs the bare forwards (memory.py). Writes results.csv,
results.json and parts.png under --out. Run it alone on quiet cores: the figures are wall times.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

from benchmarks.speed.parts import PARTS, large_setup, run, toy_setup


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n")[0])
    ap.add_argument("--setups", default="toy,large", help="comma-separated: toy, large")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/speed"))
    ap.add_argument("--vs-trl", action="store_true", help="also time TRL's DistillationTrainer on the same work")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra config override (key=value)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="opd-speed-") as tmp:
        for name in args.setups.split(","):
            setup = toy_setup() if name == "toy" else large_setup(Path(tmp) / "large")
            bench = run(setup, Path(tmp) / f"run-{name}", args.reps, args.warmup, args.sets, args.vs_trl)
            rows.append({"setup": name, "student_params": bench.params["student"],
                         "student_from_train": bench.params["student_from_train"], **bench.summary()})
            _print(rows[-1])
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (args.out / "results.json").write_text(json.dumps({"sets": args.sets, "reps": args.reps, "rows": rows}, indent=2))
    _plot(rows, args.out / "parts.png")
    print(f"wrote {args.out / 'results.csv'}, results.json and parts.png")


def _print(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"setup {r['setup']} (student {r['student_params'] / 1e6:.2f}M parameters)")
    for col in ("step", *PARTS, "sum(parts)", "step/sum", "tokens/s", "score MB", "bare fwd MB"):
        t.add_column(col, justify="right")
    t.add_row(*(f"{r[f'{k}_s']:.3f}" for k in ("step", *PARTS)), f"{r['sum_parts_s']:.3f}",
              f"{r['step_over_parts']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['mem_score_mb']:.1f}",
              f"{r['mem_bare_forwards_mb']:.1f}")
    Console(width=150).print(t)
    if "trl_step_s" in r:
        Console(width=150).print(f"TRL DistillationTrainer step {r['trl_step_s']:.3f} s (median): opd is "
                                 f"{r['trl_over_opd']:.2f}x as fast (same models, prompts, batch, sampling, loss)")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.6), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        bottom = 0.0
        for p in PARTS:
            ax.bar("parts alone", r[f"{p}_s"], bottom=bottom, label=p)
            bottom += r[f"{p}_s"]
        ax.bar("full step", r["step_s"], color="0.4")
        ax.set_title(f"{r['setup']}: step/sum(parts) {r['step_over_parts']:.2f}")
        ax.set_ylabel("seconds (median)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
