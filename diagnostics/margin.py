"""Analyses 3 and 4: the teacher's margin over the student's candidates, and its K sensitivity.

"Prefix Teach, Suffix Fade" (arXiv 2605.13643, methods.md §3.3 and §3.5, Figs. 2 and 5):
m_t = top1 - top2 of the teacher's probability q(v | s_t) over the student's K most likely
candidates v (`teacher_lp_on_student_topk`), the same margin the release rule uses
(`opdcli.methods.release.teacher_margin`, probability space). The main curve uses K = 16 (the
stored K when smaller); the K-sensitivity curves use every K in {2, 4, 8, 16, 32, 64} up to the
stored K. Curves are per relative-position bin, normalised by the first bin; the early / late
table compares the two halves of each response.

The student's candidates are taken in order of the student's log-prob (re-sorted when a writer
stored them unsorted), so "the first K" is the student's top-K for every K.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diagnostics.lines import Rollout
from diagnostics.section import Section, ratio, skipped, write_csv
from diagnostics.stats import BinMoments, Options, positions

TITLE = "Teacher margin over the student's top-K"
DESCRIPTION = (
    "m_t = top1 - top2 of the teacher's probability over the student's top-K candidates "
    "(teacher_lp_on_student_topk), per relative-position bin, normalised by the first bin "
    "(methods.md §3.3, §3.5 Fig. 2). K sensitivity: the same curve for every K in "
    "{2, 4, 8, 16, 32, 64} up to the stored K, and the mean margin of the early and late "
    "half of the responses (Fig. 5).")


def student_order(rec: Rollout) -> np.ndarray | None:
    """Column order that sorts the student's candidates by decreasing student log-prob.

    None when they are already sorted (the usual case: writers store torch.topk output).
    """
    if "order" not in rec.memo:
        lp = rec.student_topk_lp
        order = None
        if lp is not None and lp.shape[1] > 1 and not (np.diff(lp, axis=1) <= 0).all():
            order = np.argsort(-lp, axis=1, kind="stable")
        rec.memo["order"] = order
    return rec.memo["order"]


def student_candidates(rec: Rollout, matrix: np.ndarray, k: int) -> np.ndarray:
    """The first k columns of a (T, K) matrix aligned with the student's candidates, sorted."""
    order = student_order(rec)
    if order is not None:
        matrix = np.take_along_axis(matrix, order, axis=1)
    return matrix[:, :k]


def token_margin(rec: Rollout, k: int) -> np.ndarray:
    """m_t over the student's top-k (teacher probabilities), (T,); memoised on the record."""
    memo_key = f"margin{k}"
    if memo_key not in rec.memo:
        if "teacher_q" not in rec.memo:  # q over all stored candidates, in the student's order
            rec.memo["teacher_q"] = np.exp(student_candidates(rec, rec.teacher_lp_on_student_topk, rec.topk))
        g = rec.memo["teacher_q"][:, :k]
        if k == 2:
            rec.memo[memo_key] = np.abs(g[:, 0] - g[:, 1])
        else:
            top2 = np.partition(g, k - 2, axis=1)[:, k - 2:]
            rec.memo[memo_key] = np.abs(top2[:, 1] - top2[:, 0])
    return rec.memo[memo_key]


def has_margin(rec: Rollout) -> bool:
    """Whether the record stores the teacher's log-probs on at least 2 student candidates."""
    return rec.teacher_lp_on_student_topk is not None and rec.topk >= 2


def main_k(rec: Rollout, opts: Options) -> int:
    return min(opts.k_main, rec.topk)


@dataclass
class _Step:
    main: BinMoments = field(default_factory=BinMoments)
    main_half: BinMoments = field(default_factory=BinMoments)
    by_k: dict[int, BinMoments] = field(default_factory=dict)
    by_k_half: dict[int, BinMoments] = field(default_factory=dict)

    def merge(self, other: _Step) -> None:
        self.main.merge(other.main)
        self.main_half.merge(other.main_half)
        for mine, theirs in ((self.by_k, other.by_k), (self.by_k_half, other.by_k_half)):
            for k, m in theirs.items():
                mine.setdefault(k, BinMoments()).merge(m)


class MarginAnalysis:
    key = "margin"

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.steps: dict[int, _Step] = {}
        self.without = 0
        self.main_ks: set[int] = set()

    def add(self, rec: Rollout) -> None:
        if not has_margin(rec):
            self.without += 1
            return
        if rec.n_tokens == 0:
            return
        pos = positions(rec.n_tokens, self.opts, rec.memo)
        st = self.steps.setdefault(rec.step, _Step())
        k = main_k(rec, self.opts)
        self.main_ks.add(k)
        m = token_margin(rec, k)
        st.main.add(pos["rel"], m, pos["rel_n"])
        st.main_half.add(pos["late"], m, pos["late_n"])
        for kk in self.opts.ks:
            if kk <= rec.topk:
                mk = token_margin(rec, kk)
                st.by_k.setdefault(kk, BinMoments()).add(pos["rel"], mk, pos["rel_n"])
                st.by_k_half.setdefault(kk, BinMoments()).add(pos["late"], mk, pos["late_n"])

    def merge(self, other: MarginAnalysis) -> None:
        self.without += other.without
        self.main_ks |= other.main_ks
        for step, st in other.steps.items():
            self.steps.setdefault(step, _Step()).merge(st)

    def _total(self, steps: list[int]) -> _Step:
        total = _Step()
        for step in steps:
            total.merge(self.steps[step])
        total.main.ensure(self.opts.bins)
        total.main_half.ensure(2)
        for k in total.by_k:
            total.by_k[k].ensure(self.opts.bins)
            total.by_k_half[k].ensure(2)
        return total

    @staticmethod
    def _headline(st: _Step) -> dict[str, float]:
        mean, half = st.main.mean(), st.main_half.mean()
        return {"margin_early": float(mean[0]), "margin_late": float(mean[-1]),
                "margin_late_over_early": ratio(float(mean[-1]), float(mean[0])),
                "margin_late_half_over_early_half": ratio(float(half[-1]), float(half[0]))}

    def step_metrics(self) -> dict[int, dict[str, float]]:
        return {step: self._headline(self._total([step])) for step in sorted(self.steps)}

    def report(self, out: Path) -> Section:
        if not self.steps:
            return skipped(self.key, TITLE, DESCRIPTION,
                           "skipped: no record has teacher_lp_on_student_topk with topk >= 2")
        total = self._total(list(self.steps))
        sec = Section(self.key, TITLE, DESCRIPTION)
        if self.without:
            sec.notes.append(f"{self.without} records without teacher_lp_on_student_topk "
                             "(or topk < 2) left out")
        ks = sorted(self.main_ks)
        sec.notes.append(f"main curve: K = {', '.join(map(str, ks))} (min(16, stored K))")
        bins = self.opts.bins
        main_rows = [{"bin": b, "rel_lo": b / bins, "rel_hi": (b + 1) / bins, "tokens": int(c),
                      "mean": mu, "std": sd, "norm": ratio(float(mu), float(total.main.mean()[0]))}
                     for b, (c, mu, sd) in enumerate(zip(total.main.count, total.main.mean(),
                                                         total.main.std(), strict=True))]
        sec.files.append(write_csv(out / "margin_position.csv", main_rows))
        curve_rows, table = [], []
        for k in sorted(total.by_k):
            mean = total.by_k[k].mean()
            curve_rows += [{"K": k, "bin": b, "tokens": int(c), "mean": mu, "norm": ratio(float(mu), float(mean[0]))}
                           for b, (c, mu) in enumerate(zip(total.by_k[k].count, mean, strict=True))]
            half = total.by_k_half[k].mean()
            table.append({"K": k, "early_half": float(half[0]), "late_half": float(half[-1]),
                          "late_over_early": ratio(float(half[-1]), float(half[0]))})
        sec.files.append(write_csv(out / "margin_k_sensitivity.csv", curve_rows))
        sec.files.append(write_csv(out / "margin_k_early_late.csv", table))
        sec.table = table
        sec.files += self._plot(out, total)
        head = self._headline(total)
        sec.headline = head
        sec.rows = [
            ("margin, first relative bin", head["margin_early"]),
            ("margin, last relative bin", head["margin_late"]),
            ("margin late / early (normalised, last bin)", head["margin_late_over_early"]),
            ("margin late half / early half", head["margin_late_half_over_early_half"]),
        ] + [(f"K={r['K']}: late / early half", r["late_over_early"]) for r in table]
        return sec

    def _plot(self, out: Path, total: _Step) -> list[str]:
        from diagnostics import plots

        x = plots.bin_centers(self.opts.bins)
        main = total.main.mean()
        with plots.figure(out / "margin_position.png", 2, "Teacher margin over the student's top-K") as (a, b):
            plots.lines(a, x, {"mean margin": main}, xlabel="relative position", ylabel="margin",
                        title="mean margin")
            plots.lines(b, x, {"margin / first bin": main / main[0]}, xlabel="relative position",
                        ylabel="normalised margin", title="normalised margin", ref=1.0)
        curves = {f"K={k}": total.by_k[k].mean() / total.by_k[k].mean()[0] for k in sorted(total.by_k)}
        with plots.figure(out / "margin_k_sensitivity.png", 1, "K sensitivity of the teacher margin") as (a,):
            plots.lines(a, x, curves, xlabel="relative position", ylabel="margin / first bin",
                        ref=1.0)
        return ["margin_position.png", "margin_k_sensitivity.png"]
