"""Analysis 8: staleness and freshness of the samples (f-OPD, arXiv 2605.17862, methods.md §4.3).

* Histograms of `version_lag` and `freshness` when records carry them (skipped with a note
  otherwise), with mean / p10 / p90.
* Always (every record has `behavior_lp`): the rollout drift per record,
  D_roll = mean_t (exp(-delta_t) - 1 + delta_t) with delta_t = student_lp - behavior_lp (the k3
  estimate of KL(p_beh || p_theta), methods.md §4.2), the importance ratio
  rho_t = exp(delta_t) (mean, and the fraction above the truncation cap C = 2), and
  step - policy_version.
"""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np

from diagnostics.lines import Rollout
from diagnostics.section import Section, write_csv
from diagnostics.stats import Options, column_arrays, histogram_rows, quantile

TITLE = "Freshness and staleness"
DESCRIPTION = (
    "Histograms of version_lag and freshness when records carry them; for every record the "
    "rollout drift D_roll = mean(exp(-d) - 1 + d), d = student_lp - behavior_lp, the "
    "importance ratio exp(d) (mean and fraction above 2) and step - policy_version "
    "(methods.md §4.2, §4.3).")
IS_CAP = 2.0
_COLUMNS = ("step", "version_lag", "freshness", "d_roll", "ratio_sum", "ratio_over", "tokens",
            "policy_lag")


class FreshnessAnalysis:
    key = "freshness"

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.cols: dict[str, array] = {c: array("d") for c in _COLUMNS}

    def add(self, rec: Rollout) -> None:
        delta = rec.student_lp - rec.behavior_lp
        n = delta.size
        ratio_t = np.exp(np.minimum(delta, 50.0))
        d_roll = float((np.exp(-np.maximum(delta, -50.0)) - 1.0 + delta).mean()) if n else float("nan")
        values = (rec.step, np.nan if rec.version_lag is None else rec.version_lag,
                  np.nan if rec.freshness is None else rec.freshness, d_roll, ratio_t.sum(),
                  np.count_nonzero(ratio_t > IS_CAP), n, rec.step - rec.policy_version)
        for name, value in zip(_COLUMNS, values, strict=True):
            self.cols[name].append(float(value))

    def merge(self, other: FreshnessAnalysis) -> None:
        for name in _COLUMNS:
            self.cols[name].extend(other.cols[name])

    def _columns(self, step: int | None = None) -> dict[str, np.ndarray]:
        return column_arrays(self.cols, step)

    @staticmethod
    def _headline(c: dict[str, np.ndarray]) -> dict[str, float]:
        lag = c["version_lag"][np.isfinite(c["version_lag"])]
        fresh = c["freshness"][np.isfinite(c["freshness"])]
        d_roll = c["d_roll"][np.isfinite(c["d_roll"])]
        tokens = c["tokens"].sum()
        out = {"d_roll_mean": float(d_roll.mean()) if d_roll.size else float("nan"),
               "is_ratio_mean": float(c["ratio_sum"].sum() / tokens) if tokens else float("nan"),
               "is_ratio_over_cap": float(c["ratio_over"].sum() / tokens) if tokens else float("nan"),
               "policy_lag_mean": float(c["policy_lag"].mean()) if c["policy_lag"].size else float("nan")}
        if lag.size:
            out |= {"version_lag_mean": float(lag.mean()), "version_lag_max": float(lag.max())}
        if fresh.size:
            out |= {"freshness_mean": float(fresh.mean()), "freshness_p10": quantile(fresh, 0.1),
                    "freshness_p90": quantile(fresh, 0.9)}
        return out

    def step_metrics(self) -> dict[int, dict[str, float]]:
        steps = np.unique(self._columns()["step"])
        return {int(s): self._headline(self._columns(int(s))) for s in steps}

    def report(self, out: Path) -> Section:
        c = self._columns()
        sec = Section(self.key, TITLE, DESCRIPTION)
        lag = c["version_lag"][np.isfinite(c["version_lag"])]
        fresh = c["freshness"][np.isfinite(c["freshness"])]
        if not lag.size:
            sec.notes.append("version_lag histogram skipped: no record carries version_lag")
        if not fresh.size:
            sec.notes.append("freshness histogram skipped: no record carries freshness")
        rows = []
        if lag.size:
            edges = np.arange(lag.min(), lag.max() + 2) - 0.5
            rows += [{"quantity": "version_lag", **r} for r in _rows(lag, edges)]
        if fresh.size:
            rows += [{"quantity": "freshness", **r} for r in _rows(fresh, 20)]
        d_roll = c["d_roll"][np.isfinite(c["d_roll"])]
        rows += [{"quantity": "d_roll", **r} for r in _rows(d_roll, 20)]
        sec.files.append(write_csv(out / "freshness.csv", rows, ["quantity", "lo", "hi", "count"]))
        sec.files.append(self._plot(out, lag, fresh, d_roll, c["policy_lag"]))
        head = self._headline(c)
        sec.headline = head
        sec.rows = [("rollout drift D_roll, mean", head["d_roll_mean"]),
                    ("importance ratio exp(student_lp - behavior_lp), mean", head["is_ratio_mean"]),
                    (f"fraction of tokens with ratio > {IS_CAP:g}", head["is_ratio_over_cap"]),
                    ("step - policy_version, mean", head["policy_lag_mean"])]
        if lag.size:
            sec.rows += [("version_lag mean / max", f"{head['version_lag_mean']:.3g} / {head['version_lag_max']:.0f}"),
                         ("records with version_lag", int(lag.size))]
        if fresh.size:
            sec.rows += [("freshness mean (p10, p90)", f"{head['freshness_mean']:.3g} "
                          f"({head['freshness_p10']:.3g}, {head['freshness_p90']:.3g})")]
        return sec

    def _plot(self, out: Path, lag: np.ndarray, fresh: np.ndarray, d_roll: np.ndarray,
              policy_lag: np.ndarray) -> str:
        from diagnostics import plots

        with plots.figure(out / "freshness.png", 4, "Freshness and staleness") as (a, b, d, e):
            plots.hist(a, lag, bins=np.arange(lag.min(), lag.max() + 2) - 0.5 if lag.size else 10,
                       xlabel="version_lag", title="staleness (version lag)")
            plots.hist(b, fresh, xlabel="freshness", title="freshness score")
            plots.hist(d, d_roll, xlabel="D_roll (nats/token)", title="rollout drift per record")
            plots.hist(e, policy_lag, xlabel="step - policy_version", title="policy lag")
        return "freshness.png"


def _rows(values: np.ndarray, bins) -> list[dict]:
    return [{"lo": r["v_lo"], "hi": r["v_hi"], "count": r["count"]} for r in histogram_rows(values, bins, "v")]
