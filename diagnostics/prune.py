"""Analysis 6: Prune-OPD's local compatibility signal (arXiv 2605.07804, methods.md §2.2, §2.5).

Per scored token, the top-K overlap o_t = |S_t ∩ T_t| / K of the student's and the teacher's
top-K ids (K = min(16, stored K); the student's and teacher's K most likely, by their own
log-probs); a drift event is o_t < 0.7. Per record the reliability
w_t = clip(1 - 0.01 * (number of events up to t), 0, 1) and the effective reliable length
L_eff = |{t : w_t > 1e-8}| (the authors' script values θ = 0.7, δ = 0.01).

Reported: mean overlap and drift-event rate by relative and absolute position, the top-1
agreement (the student's and the teacher's most likely token are the same) by relative position,
and the distribution of L_eff (and of L_eff / T) over records. On a small vocabulary the tail of a
top-16 set is noise and only the top-1 agreement moves; compare the two before choosing K.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diagnostics.lines import Rollout
from diagnostics.margin import student_candidates
from diagnostics.section import Section, ratio, skipped, write_csv
from diagnostics.stats import BinMoments, Options, column_arrays, positions

TITLE = "Prune-OPD: top-K overlap, drift events and effective reliable length"
DESCRIPTION = (
    "Overlap o_t = fraction of the student's top-K ids that are in the teacher's top-K "
    "(K = min(16, stored K)); a drift event is o_t < 0.7; per record the reliability "
    "w_t = clip(1 - 0.01 * cumulative events, 0, 1) and the effective reliable length "
    "L_eff = number of tokens with w_t > 0 (methods.md §2.2, §2.5).")
_COLUMNS = ("file", "offset", "step", "tokens", "events", "eff_len")


def top1_agreement(rec: Rollout) -> np.ndarray:
    """1 where the student's and the teacher's most likely tokens are the same, (T,) float."""
    s = student_candidates(rec, rec.student_topk_ids, 1)[:, 0]
    t = np.take_along_axis(rec.teacher_topk_ids, np.argmax(rec.teacher_topk_lp, axis=1)[:, None], axis=1)[:, 0]
    return (s == t).astype(np.float64)


def overlap(rec: Rollout, k: int) -> np.ndarray:
    """o_t over the two top-k id sets, (T,)."""
    s = student_candidates(rec, rec.student_topk_ids, k)
    t = rec.teacher_topk_ids
    if k < rec.topk:  # the teacher's own top-k by its log-probs
        order = np.argsort(-rec.teacher_topk_lp, axis=1, kind="stable")[:, :k]
        t = np.take_along_axis(t, order, axis=1)
    hit = np.zeros(s.shape, dtype=bool)
    for j in range(k):  # k passes over (T, k) beat one (T, k, k) comparison
        hit |= s == t[:, j:j + 1]
    return hit.mean(-1)


@dataclass
class _Step:
    overlap_rel: BinMoments = field(default_factory=BinMoments)
    events_rel: BinMoments = field(default_factory=BinMoments)
    overlap_abs: BinMoments = field(default_factory=BinMoments)
    events_abs: BinMoments = field(default_factory=BinMoments)
    top1_rel: BinMoments = field(default_factory=BinMoments)

    def merge(self, other: _Step) -> None:
        for name in ("overlap_rel", "events_rel", "overlap_abs", "events_abs", "top1_rel"):
            getattr(self, name).merge(getattr(other, name))


class PruneAnalysis:
    key = "prune"

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.steps: dict[int, _Step] = {}
        self.cols: dict[str, array] = {c: array("d") for c in _COLUMNS}
        self.without = 0

    def add(self, rec: Rollout) -> None:
        if rec.topk == 0:
            self.without += 1
            return
        if rec.n_tokens == 0:
            return
        o = overlap(rec, min(self.opts.k_main, rec.topk))
        events = (o < self.opts.drift_theta).astype(np.float64)
        w = np.clip(1.0 - self.opts.w_drop * np.cumsum(events), 0.0, 1.0)
        pos = positions(rec.n_tokens, self.opts, rec.memo)
        st = self.steps.setdefault(rec.step, _Step())
        st.overlap_rel.add(pos["rel"], o, pos["rel_n"])
        st.events_rel.add(pos["rel"], events, pos["rel_n"])
        st.overlap_abs.add(pos["abs"], o, pos["abs_n"])
        st.events_abs.add(pos["abs"], events, pos["abs_n"])
        st.top1_rel.add(pos["rel"], top1_agreement(rec), pos["rel_n"])
        for name, value in zip(_COLUMNS, (*rec.key, rec.step, rec.n_tokens, events.sum(),
                                          np.count_nonzero(w > 1e-8)), strict=True):
            self.cols[name].append(float(value))

    def merge(self, other: PruneAnalysis) -> None:
        self.without += other.without
        for step, st in other.steps.items():
            self.steps.setdefault(step, _Step()).merge(st)
        for name in _COLUMNS:
            self.cols[name].extend(other.cols[name])

    def _total(self, steps: list[int]) -> _Step:
        total = _Step()
        for step in steps:
            total.merge(self.steps[step])
        total.overlap_rel.ensure(self.opts.bins)
        total.events_rel.ensure(self.opts.bins)
        total.top1_rel.ensure(self.opts.bins)
        return total

    def _columns(self, step: int | None = None) -> dict[str, np.ndarray]:
        return column_arrays(self.cols, step)

    @staticmethod
    def _headline(st: _Step, c: dict[str, np.ndarray]) -> dict[str, float]:
        o, e = st.overlap_rel, st.events_rel
        tokens = float(o.count.sum())
        om = o.mean()
        frac = c["eff_len"] / np.maximum(c["tokens"], 1)
        return {
            "overlap_mean": ratio(float(o.s1.sum()), tokens),
            "overlap_early": float(om[0]),
            "overlap_late": float(om[-1]),
            "top1_early": float(st.top1_rel.mean()[0]),
            "top1_late": float(st.top1_rel.mean()[-1]),
            "drift_rate": ratio(float(e.s1.sum()), tokens),
            "eff_len_mean": float(c["eff_len"].mean()) if frac.size else float("nan"),
            "eff_len_frac_mean": float(frac.mean()) if frac.size else float("nan"),
            "pruned_record_rate": float((c["eff_len"] < c["tokens"]).mean()) if frac.size else float("nan"),
        }

    def step_metrics(self) -> dict[int, dict[str, float]]:
        return {step: self._headline(self._total([step]), self._columns(step))
                for step in sorted(self.steps)}

    def report(self, out: Path) -> Section:
        if not self.steps:
            return skipped(self.key, TITLE, DESCRIPTION,
                           "skipped: no record has top-K ids (topk is absent or 0)")
        total, c = self._total(list(self.steps)), self._columns()
        sec = Section(self.key, TITLE, DESCRIPTION)
        if self.without:
            sec.notes.append(f"{self.without} records without top-K ids left out")
        bins, w = self.opts.bins, self.opts.abs_bin
        rel = [{"bin": b, "rel_lo": b / bins, "rel_hi": (b + 1) / bins, "tokens": int(n),
                "overlap_mean": om, "drift_rate": er, "top1_agreement": a1}
               for b, (n, om, er, a1) in enumerate(zip(total.overlap_rel.count, total.overlap_rel.mean(),
                                                       total.events_rel.mean(), total.top1_rel.mean(),
                                                       strict=True))]
        absolute = [{"bin": b, "pos_lo": b * w, "pos_hi": (b + 1) * w, "tokens": int(n),
                     "overlap_mean": om, "drift_rate": er}
                    for b, (n, om, er) in enumerate(zip(total.overlap_abs.count, total.overlap_abs.mean(),
                                                        total.events_abs.mean(), strict=True))]
        records = [{"file": int(f), "offset": int(o), "step": int(s), "tokens": int(t), "drift_events": int(e),
                    "eff_len": int(le), "eff_frac": le / t if t else float("nan")}
                   for f, o, s, t, e, le in zip(*(c[k] for k in _COLUMNS), strict=True)]
        sec.files += [write_csv(out / "prune_position.csv", rel),
                      write_csv(out / "prune_absolute.csv", absolute),
                      write_csv(out / "prune_records.csv", records)]
        sec.files.append(self._plot(out, total, c))
        head = self._headline(total, c)
        sec.headline = head
        sec.rows = [
            ("top-K overlap, mean", head["overlap_mean"]),
            ("top-K overlap, first / last relative bin",
             f"{head['overlap_early']:.4g} / {head['overlap_late']:.4g}"),
            ("top-1 agreement, first / last relative bin", f"{head['top1_early']:.4g} / {head['top1_late']:.4g}"),
            ("drift-event rate (overlap < 0.7)", head["drift_rate"]),
            ("effective reliable length, mean (tokens)", head["eff_len_mean"]),
            ("effective reliable length / T, mean", head["eff_len_frac_mean"]),
            ("records with L_eff < T", head["pruned_record_rate"]),
        ]
        return sec

    def _plot(self, out: Path, total: _Step, c: dict[str, np.ndarray]) -> str:
        from diagnostics import plots

        x = plots.bin_centers(self.opts.bins)
        seen = total.overlap_abs.count > 0
        xa = ((np.arange(seen.size) + 0.5) * self.opts.abs_bin)[seen]
        with plots.figure(out / "prune.png", 4, "Prune-OPD signals") as (a, b, d, e):
            plots.lines(a, x, {"top-K overlap": total.overlap_rel.mean(), "top-1 agreement": total.top1_rel.mean()},
                        xlabel="relative position", ylabel="fraction", title="overlap by position",
                        ref=self.opts.drift_theta)
            plots.lines(b, x, {"relative bins": total.events_rel.mean()}, xlabel="relative position",
                        ylabel="drift-event rate", title="drift events (overlap < 0.7)")
            plots.lines(d, xa, {f"{self.opts.abs_bin}-token bins": total.events_abs.mean()[seen]},
                        xlabel="token position", ylabel="drift-event rate", title="drift events by position")
            plots.hist(e, c["eff_len"], xlabel="L_eff (tokens)", title="effective reliable length")
        return "prune.png"
