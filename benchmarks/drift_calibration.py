"""Calibrate Prune-OPD's drift test per K on two pairs: which (K, theta) separates them.

    opd rollout --config configs/toy/forms/opd.yaml --out runs/forms-compatible.jsonl --set data.max_prompts=128
    opd rollout --config configs/toy/forms/opd.yaml --out runs/forms-incompatible.jsonl \\
        --set data.max_prompts=128 --set model.teacher=toy:teacher-forms-symbolic
    python -m benchmarks.drift_calibration runs/forms-compatible.jsonl runs/forms-incompatible.jsonl

For each K (top-K overlap of the student's and the teacher's top-K ids, `diagnostics.prune.overlap`)
and each threshold theta, the drift-event rate (o_t < theta) of each pair, the mean effective
reliable length L_eff / T at w_drop (Prune-OPD's reliability reaches 0 after 1 / w_drop events)
and the separation: the incompatible pair's event rate minus the compatible pair's. A drift test
worth its name fires rarely on the compatible pair and often on the incompatible one; on a small
vocabulary the tail of a large top-K set is noise and fires on both. Prints the table and the
best (K, theta) by separation among tests whose compatible event rate stays under --max-compatible;
writes drift_calibration.csv and drift_calibration.png under --out.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from diagnostics.lines import parse_line
from diagnostics.prune import overlap
from opdcli.methods.drift import effective_length, reliability_weights


def read_overlaps(path: Path, ks: list[int]) -> dict[int, list[np.ndarray]]:
    """{K: [o_t per record]} of a rollouts file."""
    out: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    with path.open("rb") as fh:
        for i, raw in enumerate(fh):
            if not raw.strip():
                continue
            rec = parse_line(raw, (0, i), lambda i=i: f"{path}:{i + 1}", first=i == 0)
            if rec is None or rec.topk == 0:
                continue
            for k in ks:
                if k > rec.topk:
                    raise SystemExit(f"{path} stores top-{rec.topk}; drop K {k} or record more (scoring.top_k)")
                out[k].append(overlap(rec, k))
    if not out[ks[0]]:
        raise SystemExit(f"{path} holds no record with top-K lists; write it with opd rollout")
    return out


def rates(overlaps: list[np.ndarray], theta: float, w_drop: float) -> tuple[float, float]:
    """Token-level event rate and mean L_eff / T over records."""
    events = np.concatenate([o < theta for o in overlaps])
    eff = []
    for o in overlaps:  # Prune-OPD's own reliability and L_eff, one record at a time
        hit_1_T = torch.from_numpy(o < theta)[None]
        mask_1_T = torch.ones_like(hit_1_T, dtype=torch.float32)
        w_1_T = reliability_weights(hit_1_T, mask_1_T, w_drop)
        eff.append(int(effective_length(w_1_T, mask_1_T)[0]) / len(o))
    return float(events.mean()), float(np.mean(eff))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("compatible", type=Path)
    ap.add_argument("incompatible", type=Path)
    ap.add_argument("--k", default="1,2,4,8,16", help="comma-separated K values")
    ap.add_argument("--theta", default="0.3,0.5,0.7,0.9", help="comma-separated overlap thresholds")
    ap.add_argument("--w-drop", type=float, default=0.01, help="reliability lost per event (Prune-OPD's w_drop)")
    ap.add_argument("--max-compatible", type=float, default=0.1,
                    help="largest event rate allowed on the compatible pair when picking the best test")
    ap.add_argument("--out", type=Path, default=Path("drift_calibration"))
    args = ap.parse_args(argv)
    ks = [int(x) for x in args.k.split(",")]
    thetas = [float(x) for x in args.theta.split(",")]
    comp, incomp = read_overlaps(args.compatible, ks), read_overlaps(args.incompatible, ks)
    rows = []
    for k in ks:
        mean_overlap = {"overlap_compatible": float(np.concatenate(comp[k]).mean()),
                        "overlap_incompatible": float(np.concatenate(incomp[k]).mean())}
        # at K 1 the overlap is 0 or 1: every theta in (0, 1] is the same test
        for theta in thetas[:1] if k == 1 else thetas:
            rc, ec = rates(comp[k], theta, args.w_drop)
            ri, ei = rates(incomp[k], theta, args.w_drop)
            rows.append({"k": k, "theta": theta, "events_compatible": rc, "events_incompatible": ri,
                         "separation": ri - rc, "eff_frac_compatible": ec, "eff_frac_incompatible": ei,
                         **mean_overlap})
    print(f"{'K':>3} {'theta':>5} {'events comp':>11} {'events incomp':>13} {'separation':>10} "
          f"{'Leff/T comp':>11} {'Leff/T incomp':>13}")
    for r in rows:
        print(f"{r['k']:>3} {r['theta']:>5.2f} {r['events_compatible']:>11.3f} {r['events_incompatible']:>13.3f} "
              f"{r['separation']:>10.3f} {r['eff_frac_compatible']:>11.3f} {r['eff_frac_incompatible']:>13.3f}")
    fit = [r for r in rows if r["events_compatible"] <= args.max_compatible]
    if fit:
        best = max(fit, key=lambda r: r["separation"])
        print(f"best test with compatible events <= {args.max_compatible}: K {best['k']}, theta {best['theta']} "
              f"(events {best['events_compatible']:.3f} vs {best['events_incompatible']:.3f})")
    else:
        print(f"no test keeps the compatible pair's event rate under {args.max_compatible}")
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "drift_calibration.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, ks, args.out / "drift_calibration.png")
    print(f"wrote {args.out / 'drift_calibration.csv'} and {args.out / 'drift_calibration.png'}")


def _plot(rows: list[dict], ks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k in ks:
        mine = [r for r in rows if r["k"] == k]
        x = [r["theta"] for r in mine]
        axes[0].plot(x, [r["events_compatible"] for r in mine], "o--", label=f"K {k} compatible")
        axes[0].plot(x, [r["events_incompatible"] for r in mine], "o-", label=f"K {k} incompatible")
        axes[1].plot(x, [r["separation"] for r in mine], "o-", label=f"K {k}")
    axes[0].set(xlabel="theta", ylabel="drift-event rate (o_t < theta)", title="event rate per pair")
    axes[1].set(xlabel="theta", ylabel="incompatible - compatible", title="separation")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
