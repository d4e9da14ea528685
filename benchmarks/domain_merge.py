"""G-OPD's merge of domain teachers on the toy world: one student, each prompt routed to its
domain's expert (model.teachers), lambda 1 (OPD) against lambda 1.25 (ExOPD).

    python -m benchmarks.domain_merge --out runs/domain-merge                 # 2 arms x 3 seeds
    python -m benchmarks.domain_merge --out runs/dm --seeds 0 --steps 40      # a quick look
    python -m benchmarks.domain_merge --out runs/dm --arms opd-merge --lrs 1e-4 3e-4 1e-3 --steps 60
    python -m benchmarks.domain_merge --out runs/domain-merge --report-only

The two domains are the toy task's additions / subtractions (`ops: "+-"`) and multiplications
(`ops: "*"`); their experts `toy:teacher-add` and `toy:teacher-mul` are the student
`toy:student` trained further on one domain each (the paper's teachers are domain RL runs from
the student's base). Writes the data files (train.jsonl: both domains, every row tagged with its
teacher in `opd_teacher`; heldout-<domain>.jsonl: each domain's held-out split, which training
never sees), runs every (arm, lr, seed) as an `opd train` subprocess one after the other, then
reads every final checkpoint, the start and both experts on each domain's held-out problems
(greedy and sampled avg@n). Writes runs.csv, models.csv, summary.md and domains.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from opdcli.toy.task import ToyTask

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = {"add": ("+-", "toy:teacher-add"), "mul": ("*", "toy:teacher-mul")}
START = "toy:student"
ARMS = {"opd-merge": 1.0, "exopd-merge": 1.25}
HELDOUT_SEED = 0


def write_data(out: Path, heldout: int, train_per_domain: int) -> dict[str, Path]:
    """train.jsonl (both domains interleaved, tagged) and heldout-<domain>.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    train: list[list[dict]] = []
    paths = {}
    for tag, (ops, _) in DOMAINS.items():
        task = ToyTask(ops=ops)
        held = task.heldout(HELDOUT_SEED, heldout)
        paths[tag] = out / f"heldout-{tag}.jsonl"
        _write(paths[tag], [{"prompt": p.prompt, "answer": p.answer, "opd_teacher": tag} for p in held])
        stream = task.stream(1, exclude={p.question for p in held})
        train.append([{"prompt": p.prompt, "answer": p.answer, "opd_teacher": tag}
                      for p, _ in zip(stream, range(train_per_domain), strict=False)])
    paths["train"] = out / "train.jsonl"
    _write(paths["train"], [row for pair in zip(*train, strict=True) for row in pair])
    mixed = [row for tag in DOMAINS for row in _read(paths[tag])[: heldout // 2]]
    paths["mixed"] = out / "heldout-mixed.jsonl"
    _write(paths["mixed"], mixed)
    return paths


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_sets(paths: dict[str, Path], lam: float, lr: float) -> list[str]:
    """The `opd train` settings of one arm (configs/toy/opd.yaml underneath)."""
    return [f"data.source={paths['train']}", f"data.eval_source={paths['mixed']}",
            f"model.teacher={DOMAINS['add'][1]}", *(f"model.teachers.{t}={m}" for t, (_, m) in DOMAINS.items()),
            "method.name=gopd", f"method.options.lam={lam}", "method.options.reference=student_init",
            "loss.objective=sampled", f"optim.lr={lr}", "run.threads=2", "train.rollouts_every=0"]


def run_one(out: Path, paths: dict[str, Path], arm: str, lr: float, seed: int, steps: int, eval_every: int) -> Path:
    run_dir = out / "runs" / f"{arm}-lr{lr:g}-seed{seed}"
    args = [str(Path(sys.executable).parent / "opd"), "train", "--config", str(ROOT / "configs/toy/opd.yaml"),
            "--set", f"run.out_dir={run_dir}", "--set", "run.overwrite=true", "--set", f"run.seed={seed}",
            "--set", f"train.max_steps={steps}", "--set", f"eval.every={eval_every}", "--set", "eval.size=512"]
    for s in run_sets(paths, ARMS[arm], lr):
        args += ["--set", s]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    if proc.returncode != 0:
        raise SystemExit(f"{run_dir.name} failed:\n{proc.stderr[-3000:]}")
    print(f"{run_dir.name}: done", flush=True)
    return run_dir


def read_run(run_dir: Path) -> dict:
    """Training figures of one run: mixed held-out curve, per-teacher KL at the start and end."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    curve = [(0, r["eval_before/heldout/accuracy"]) for r in rows if "eval_before/heldout/accuracy" in r]
    curve += [(r["progress/step"], r["eval/heldout/accuracy"]) for r in rows if "eval/heldout/accuracy" in r]
    curve += [(r["progress/step"], r["eval_after/heldout/accuracy"]) for r in rows
              if "eval_after/heldout/accuracy" in r and r["progress/step"] != curve[-1][0]]
    out = {"curve": curve, "train_s": sum(r.get("time/step_total", 0.0) for r in steps)}
    for tag in DOMAINS:
        kl = [r[f"signal/teacher_kl/{tag}"] for r in steps]
        out[f"kl_{tag}_first10"], out[f"kl_{tag}_last10"] = statistics.fmean(kl[:10]), statistics.fmean(kl[-10:])
    ref = [r["method/gopd/kl_to_ref"] for r in steps if "method/gopd/kl_to_ref" in r]
    out["kl_to_ref_last10"] = statistics.fmean(ref[-10:]) if ref else float("nan")
    return out


def evaluate_models(models: list[str], paths: dict[str, Path], samples: int) -> list[dict]:
    """Greedy and sampled held-out accuracy of each model on each domain."""
    from benchmarks.heldout import evaluate
    from opdcli.config import TrainRunConfig, load_config

    rows = []
    for name in models:
        row: dict = {"model": name}
        for tag in DOMAINS:
            cfg, _ = load_config(TrainRunConfig, str(ROOT / "configs/toy/opd.yaml"),
                                 [f"data.source={paths[tag]}", f"data.eval_source={paths[tag]}", "eval.size=100000"])
            got = evaluate(name, cfg, samples, 1.0, 1234)
            row[f"{tag}_greedy"] = got["greedy/accuracy"]
            if samples:
                row[f"{tag}_sampled"] = got["sampled/accuracy"]
        rows.append(row)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def _ms(xs: list[float], pct: bool = True) -> str:
    if any(x != x for x in xs):  # NaN: not measured (no reference at lambda 1)
        return "-"
    scale = 100 if pct else 1
    mean = statistics.fmean(xs) * scale
    sd = statistics.stdev(xs) * scale if len(xs) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}%" if pct else f"{mean:.3f} ± {sd:.3f}"


def report(out: Path, runs: list[dict], models: dict[str, dict]) -> None:
    keys = [k for k in next(iter(models.values())) if k != "model"]
    with (out / "models.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["model", *keys])
        w.writeheader()
        w.writerows(models.values())
    flat = [{k: v for k, v in r.items() if k != "curve"} | {"curve": json.dumps(r["curve"])} for r in runs]
    with (out / "runs.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    lines = ["| model | add greedy | mul greedy | mean greedy | add sampled | mul sampled | mean sampled |",
             "|---|---|---|---|---|---|---|"]
    for name in (START, *(m for _, m in DOMAINS.values())):
        r = models[name]
        lines.append(f"| {name} | " + " | ".join(
            f"{100 * v:.1f}%" for v in (r["add_greedy"], r["mul_greedy"], (r["add_greedy"] + r["mul_greedy"]) / 2,
                                        r.get("add_sampled", float("nan")), r.get("mul_sampled", float("nan")),
                                        (r.get("add_sampled", float("nan")) + r.get("mul_sampled", float("nan"))) / 2)) + " |")
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["arm"], r["lr"]), []).append(r)
    lines += ["", "| arm | lr | seeds | add greedy | mul greedy | mean greedy | add sampled | mul sampled | "
              "KL to add expert, steps 1-10 -> last 10 | KL to mul expert | KL to reference (last 10) | training s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (arm, lr), rs in sorted(groups.items()):
        ms = [models[r["checkpoint"]] for r in rs]

        def col(key: str, ms: list[dict] = ms) -> str:
            return _ms([m[key] for m in ms]) if key in ms[0] else "-"

        mean = _ms([(m["add_greedy"] + m["mul_greedy"]) / 2 for m in ms])
        kl = {t: f"{statistics.fmean(r[f'kl_{t}_first10'] for r in rs):.3f} -> "
                 f"{_ms([r[f'kl_{t}_last10'] for r in rs], pct=False)}" for t in DOMAINS}
        lines.append(f"| {arm} | {lr:g} | {len(rs)} | {col('add_greedy')} | {col('mul_greedy')} | {mean} | "
                     f"{col('add_sampled')} | {col('mul_sampled')} | {kl['add']} | {kl['mul']} | "
                     f"{_ms([r['kl_to_ref_last10'] for r in rs], pct=False)} | "
                     f"{statistics.fmean(r['train_s'] for r in rs):.0f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(out, runs, models)


def _plot(out: Path, runs: list[dict], models: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [START, *(m for _, m in DOMAINS.values())]
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(f"{r['arm']} (lr {r['lr']:g})", []).append(r)
    labels = [n.removeprefix("toy:") for n in names] + list(groups)
    for j, tag in enumerate(DOMAINS):
        vals = [models[n][f"{tag}_greedy"] for n in names]
        errs = [0.0] * len(names)
        for rs in groups.values():
            xs = [models[r["checkpoint"]][f"{tag}_greedy"] for r in rs]
            vals.append(statistics.fmean(xs))
            errs.append(statistics.stdev(xs) if len(xs) > 1 else 0.0)
        ax.bar([i + 0.4 * j for i in range(len(labels))], [100 * v for v in vals], 0.4,
               yerr=[100 * e for e in errs], label=f"{tag} domain")
    ax.set_xticks([i + 0.2 for i in range(len(labels))], labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("greedy held-out accuracy (%)")
    ax.set_title("each domain: start, experts, merged students (mean ± std over seeds)")
    ax.legend()
    for name, rs in groups.items():
        for k, r in enumerate(rs):
            steps, acc = zip(*r["curve"], strict=True)
            bx.plot(steps, [100 * a for a in acc], color=f"C{list(groups).index(name)}", alpha=0.7,
                    label=name if k == 0 else None)
    bx.set_xlabel("optimizer step")
    bx.set_ylabel("greedy accuracy, both domains' held-out (%)")
    bx.legend()
    fig.tight_layout()
    fig.savefig(out / "domains.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--lrs", nargs="+", type=float, default=[3e-4])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--heldout", type=int, default=512, help="held-out problems per domain")
    ap.add_argument("--samples", type=int, default=4, help="sampled answers per problem (avg@n, T = 1)")
    ap.add_argument("--report-only", action="store_true", help="tables and plot of the runs already there")
    args = ap.parse_args(argv)
    paths = write_data(args.out / "data", args.heldout, 20_000)
    runs = []
    for arm in args.arms:
        for lr in args.lrs:
            for seed in args.seeds:
                run_dir = args.out / "runs" / f"{arm}-lr{lr:g}-seed{seed}"
                if not args.report_only:
                    run_dir = run_one(args.out, paths, arm, lr, seed, args.steps, args.eval_every)
                if (run_dir / "metrics.jsonl").is_file():
                    runs.append({"arm": arm, "lr": lr, "seed": seed, "checkpoint": str(run_dir / "checkpoints" /
                                 f"step_{args.steps}")} | read_run(run_dir))
    if not runs:
        raise SystemExit(f"no finished runs under {args.out / 'runs'}")
    names = [START, *(m for _, m in DOMAINS.values()), *(r["checkpoint"] for r in runs)]
    cache = args.out / "models.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if not args.report_only:  # checkpoints trained now replace what an earlier invocation read
        known = {n: row for n, row in known.items() if n not in {r["checkpoint"] for r in runs}}
    todo = [n for n in names if n not in known]
    for row in evaluate_models(todo, paths, args.samples):
        known[row["model"]] = row
    cache.write_text(json.dumps(known, indent=1))
    report(args.out, runs, {n: known[n] for n in names})


if __name__ == "__main__":
    main()
