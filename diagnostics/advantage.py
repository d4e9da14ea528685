"""Analyses 1 and 2: advantage variance decay and teacher-student log-prob correlation.

"Prefix Teach, Suffix Fade" (arXiv 2605.13643, methods.md §3.5, Figs. 1 and 4): along a
rollout the sampled-token advantage A_t = log q(y_t) - log p(y_t) keeps a non-zero mean, but
its spread across samples at the same position shrinks, and teacher and student log-probs
become strongly correlated late in the response.

* A_t is binned by relative position (t / T over the scored tokens, `bins` bins) and by
  absolute position (`abs_bin` tokens per bin); per bin: mean, within-bin standard deviation,
  and the standard deviation divided by that of the first bin ("normalised std").
* Pearson correlation of teacher_lp and student_lp over the tokens of the early half
  (t < T/2) and of the late half of every response, pooled over all records; the mean of the
  per-record correlations is reported next to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diagnostics.lines import Rollout
from diagnostics.section import Section, ratio, write_csv
from diagnostics.stats import BinMoments, CorrMoments, Options, pearson, positions

TITLE = "Advantage variance decay and teacher-student correlation"
DESCRIPTION = (
    "A_t = teacher_lp - student_lp of each scored token, binned by relative position (t / T) "
    "and by absolute position; per bin the mean, the within-bin standard deviation and that "
    "standard deviation divided by the first bin's (normalised std; below 1 means the "
    "advantage loses contrast late in the rollout). Pearson correlation of teacher_lp and "
    "student_lp over the tokens of the early and of the late half of every response, pooled "
    "over records (methods.md §3.5, Figs. 1 and 4).")


@dataclass
class _Step:
    rel: BinMoments = field(default_factory=BinMoments)
    abs: BinMoments = field(default_factory=BinMoments)
    corr: CorrMoments = field(default_factory=CorrMoments)
    record_corr: np.ndarray = field(default_factory=lambda: np.zeros((2, 2)))
    """Per half: sum of per-record correlations, number of records with one."""

    def merge(self, other: _Step) -> None:
        self.rel.merge(other.rel)
        self.abs.merge(other.abs)
        self.corr.merge(other.corr)
        self.record_corr += other.record_corr


class AdvantageAnalysis:
    key = "advantage"

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.steps: dict[int, _Step] = {}

    def add(self, rec: Rollout) -> None:
        n = rec.n_tokens
        if n == 0:
            return
        pos = positions(n, self.opts, rec.memo)
        adv = rec.teacher_lp - rec.student_lp
        st = self.steps.setdefault(rec.step, _Step())
        st.rel.add(pos["rel"], adv, pos["rel_n"])
        st.abs.add(pos["abs"], adv, pos["abs_n"])
        st.corr.add(pos["late"], rec.teacher_lp, rec.student_lp)
        half = (n + 1) // 2
        for h, part in enumerate((slice(0, half), slice(half, n))):
            r = pearson(rec.teacher_lp[part], rec.student_lp[part])
            if not np.isnan(r):
                st.record_corr[h] += (r, 1.0)

    def merge(self, other: AdvantageAnalysis) -> None:
        for step, st in other.steps.items():
            self.steps.setdefault(step, _Step()).merge(st)

    def _total(self, steps: list[int] | None = None) -> _Step:
        total = _Step()
        for step in steps if steps is not None else list(self.steps):
            total.merge(self.steps[step])
        total.rel.ensure(self.opts.bins)
        return total

    @staticmethod
    def _headline(st: _Step) -> dict[str, float]:
        std, mean = st.rel.std(), st.rel.mean()
        corr = st.corr.corr()
        early = std[0] if std.size else float("nan")
        late = std[-1] if std.size else float("nan")
        return {
            "adv_mean": float(st.rel.s1.sum() / max(st.rel.count.sum(), 1)),
            "adv_mean_early": float(mean[0]) if mean.size else float("nan"),
            "adv_mean_late": float(mean[-1]) if mean.size else float("nan"),
            "adv_std_early": float(early),
            "adv_std_late": float(late),
            "adv_std_late_over_early": ratio(float(late), float(early)),
            "corr_early": float(corr[0]),
            "corr_late": float(corr[1]),
        }

    def step_metrics(self) -> dict[int, dict[str, float]]:
        return {step: self._headline(self._total([step])) for step in sorted(self.steps)}

    def report(self, out: Path) -> Section:
        total = self._total()
        sec = Section(self.key, TITLE, DESCRIPTION)
        if total.rel.count.sum() == 0:
            sec.skipped = True
            sec.notes.append("no scored tokens")
            return sec
        rel_rows = _bin_rows(total.rel, lambda b: (b / self.opts.bins, (b + 1) / self.opts.bins), "rel")
        w = self.opts.abs_bin
        abs_rows = _bin_rows(total.abs, lambda b: (b * w, (b + 1) * w), "pos")
        sec.files.append(write_csv(out / "advantage_relative.csv", rel_rows))
        sec.files.append(write_csv(out / "advantage_absolute.csv", abs_rows))
        corr = total.corr.corr()
        corr_rows = [{"half": name, "tokens": int(total.corr.sums[h, 0]), "pooled_r": corr[h],
                      "records": int(total.record_corr[h, 1]),
                      "mean_record_r": ratio(total.record_corr[h, 0], total.record_corr[h, 1])}
                     for h, name in enumerate(("early", "late"))]
        sec.files.append(write_csv(out / "correlation.csv", corr_rows))
        sec.files.append(self._plot(out, total, corr_rows))
        head = self._headline(total)
        sec.headline = head
        sec.rows = [
            ("A mean, all tokens", head["adv_mean"]),
            ("A mean, first / last relative bin", f"{head['adv_mean_early']:.4g} / {head['adv_mean_late']:.4g}"),
            ("std(A), first relative bin", head["adv_std_early"]),
            ("std(A), last relative bin", head["adv_std_late"]),
            ("std(A) late / early (normalised)", head["adv_std_late_over_early"]),
            ("corr(teacher_lp, student_lp), early half", head["corr_early"]),
            ("corr(teacher_lp, student_lp), late half", head["corr_late"]),
            ("mean per-record corr, early / late",
             f"{corr_rows[0]['mean_record_r']:.4g} / {corr_rows[1]['mean_record_r']:.4g}"),
        ]
        return sec

    def _plot(self, out: Path, total: _Step, corr_rows: list[dict]) -> str:
        from diagnostics import plots

        path = out / "advantage.png"
        x_rel = plots.bin_centers(total.rel.count.size)
        std_rel = total.rel.std()
        std_abs = total.abs.std()
        x_abs = (np.arange(std_abs.size) + 0.5) * self.opts.abs_bin
        seen = total.abs.count > 0
        with plots.figure(path, 4, "Advantage A = teacher_lp - student_lp") as (a, b, c, d):
            plots.lines(a, x_rel, {"mean A": total.rel.mean()}, xlabel="relative position",
                        ylabel="A", title="mean advantage", ref=0.0)
            plots.lines(b, x_rel, {"std / std(first bin)": std_rel / std_rel[0]},
                        xlabel="relative position", ylabel="normalised std",
                        title="advantage variance decay (relative)", ref=1.0)
            plots.lines(c, x_abs[seen], {"std / std(first bin)": (std_abs / std_abs[0])[seen]},
                        xlabel="token position", ylabel="normalised std",
                        title=f"variance decay ({self.opts.abs_bin}-token bins)", ref=1.0)
            d.bar(["early half", "late half"], [r["pooled_r"] for r in corr_rows], color="tab:orange")
            d.set_ylim(-1, 1)
            d.axhline(0, color="grey", linewidth=0.8)
            d.set_ylabel("Pearson r")
            d.set_title("corr(teacher_lp, student_lp)", fontsize=10)
        return path.name


def _bin_rows(m: BinMoments, edges, name: str) -> list[dict]:
    """CSV rows of one binned advantage table: edges, tokens, mean, std, normalised std."""
    mean, std = m.mean(), m.std()
    first = std[0] if std.size and m.count[0] > 0 else float("nan")
    rows = []
    for b in range(m.count.size):
        lo, hi = edges(b)
        rows.append({"bin": b, f"{name}_lo": lo, f"{name}_hi": hi, "tokens": int(m.count[b]),
                     "mean": mean[b], "std": std[b], "std_norm": ratio(float(std[b]), float(first))})
    return rows
