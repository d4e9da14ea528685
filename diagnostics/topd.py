"""Analysis 7: TOPD's high-loss tokens in the low-divergence regime (arXiv 2606.00305).

The paper's abstract reports that about 30% of high-loss tokens sit in a low-divergence regime.
Per scored token, as in `opdcli.methods.topd` (methods.md §5.2, §5.3):

    l_t    = student_lp - teacher_lp                         (sampled-token loss)
    D_t    = sum_v p(v) (log p(v) - log q(v)) over the union of the student's and the teacher's
             top-K (K = min(16, stored K)) where the record has `student_lp_on_teacher_topk`,
             else over the student's top-K; p and q renormalised over it (truncated reverse KL)
    Dbar_t = mean of D over the next 8 scored tokens t+1..t+8 (D_t at the last token)
    high   = l_t >= the 80th percentile of l;  low-divergence = Dbar_t < delta

Reported with both thresholds the method offers: delta = 0.1 nats (`Options.topd_delta`, the
method's default: the share is measured) and delta = median(D) (about half of all windows are
low-divergence by construction, so the share mostly reflects the threshold); the share of
high-loss tokens that are low-divergence, and the joint 2-D histogram of l_t and Dbar_t. The
percentile and the median are global; they come from a uniform sample of at most
`Options.sample_size` tokens (exact when the input has fewer tokens), which keeps memory
bounded. Per step the same share uses that step's own thresholds, like the method's
per-batch thresholds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diagnostics.lines import Rollout
from diagnostics.margin import student_candidates
from diagnostics.section import Section, ratio, skipped, write_csv
from diagnostics.stats import BinMoments, Options, TokenSample, positions, quantile

TITLE = "TOPD: high-loss tokens in the low-divergence regime"
DESCRIPTION = (
    "l_t = student_lp - teacher_lp; D_t = top-K truncated reverse KL over the union of the "
    "student's and the teacher's candidates where recorded, else the student's (both "
    "distributions renormalised over them); Dbar_t = mean of D over the next 8 tokens. Share of "
    "high-loss tokens (top 20% of l) whose near-future divergence is below delta (0.1 nats), and "
    "below the median of D, and the joint histogram of l and Dbar (methods.md §5.2, §5.3). "
    "Percentiles come from a uniform token sample (exact for small inputs).")
_COLUMNS = ("loss", "future", "div", "step")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=1, keepdims=True))


def truncated_rkl(rec: Rollout, k: int) -> np.ndarray:
    """D_t over the union of both top-k sets (the student's alone when the record lacks the
    student's log-probs of the teacher's ids), p and q renormalised over it, clamped at 0, (T,)."""
    log_p = student_candidates(rec, rec.student_topk_lp, k)
    log_q = student_candidates(rec, rec.teacher_lp_on_student_topk, k)
    if rec.student_lp_on_teacher_topk is not None:
        order = np.argsort(-rec.teacher_topk_lp, axis=1, kind="stable")[:, :k]
        t_ids = np.take_along_axis(rec.teacher_topk_ids, order, axis=1)
        s_ids = student_candidates(rec, rec.student_topk_ids, k)
        shared = (t_ids[:, :, None] == s_ids[:, None, :]).any(-1)
        log_p = np.concatenate([log_p, np.where(shared, -np.inf, np.take_along_axis(
            rec.student_lp_on_teacher_topk, order, axis=1))], axis=1)
        log_q = np.concatenate([log_q, np.where(shared, -np.inf, np.take_along_axis(
            rec.teacher_topk_lp, order, axis=1))], axis=1)
    log_p, log_q = _log_softmax(log_p), _log_softmax(log_q)
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    return np.maximum(terms.sum(axis=1), 0.0)


def future_mean(d: np.ndarray, horizon: int) -> np.ndarray:
    """Mean of d over positions t+1..t+horizon that exist (d_t itself at the last token), (T,)."""
    n = d.size
    c = np.concatenate(([0.0], np.cumsum(d)))
    t = np.arange(n)
    hi = np.minimum(t + horizon, n - 1)
    count = hi - t
    return np.where(count > 0, (c[hi + 1] - c[t + 1]) / np.maximum(count, 1), d)


def low_divergence_share(c: dict[str, np.ndarray], rho: float, delta: float) -> dict[str, float]:
    """Thresholds and the share of high-loss tokens with Dbar below delta (nats) and below the
    median of D."""
    loss, future, div = c["loss"], c["future"], c["div"]
    threshold = quantile(loss, 1.0 - rho)
    median = quantile(div, 0.5)
    high = loss >= threshold
    quiet = high & (future < delta)
    quiet_median = high & (future < median)
    return {"topd_tokens": float(loss.size), "topd_loss_threshold": threshold,
            "topd_delta": delta, "topd_high_loss": float(high.sum()),
            "topd_low_div_share": ratio(float(quiet.sum()), float(high.sum())),
            "topd_suppressed_frac": ratio(float(quiet.sum()), float(loss.size)),
            "topd_delta_median": median,
            "topd_low_div_share_median": ratio(float(quiet_median.sum()), float(high.sum()))}


class TopdAnalysis:
    key = "topd"

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.sample = TokenSample(opts.sample_size, _COLUMNS)
        self.div_rel = BinMoments()
        self.without = 0
        self.tokens = 0

    def add(self, rec: Rollout) -> None:
        if rec.teacher_lp_on_student_topk is None or rec.topk < 2:
            self.without += 1
            return
        n = rec.n_tokens
        if n == 0:
            return
        d = truncated_rkl(rec, min(self.opts.k_main, rec.topk))
        pos = positions(n, self.opts, rec.memo)
        self.div_rel.add(pos["rel"], d, pos["rel_n"])
        self.tokens += n
        self.sample.add(rec.key, {"loss": rec.student_lp - rec.teacher_lp,
                                  "future": future_mean(d, self.opts.horizon), "div": d,
                                  "step": np.full(n, float(rec.step))})

    def merge(self, other: TopdAnalysis) -> None:
        self.without += other.without
        self.tokens += other.tokens
        self.sample.merge(other.sample)
        self.div_rel.merge(other.div_rel)

    def step_metrics(self) -> dict[int, dict[str, float]]:
        c = self.sample.columns_dict()
        return {int(s): low_divergence_share({k: v[c["step"] == s] for k, v in c.items()}, self.opts.rho,
                                             self.opts.topd_delta)
                for s in np.unique(c["step"])}

    def report(self, out: Path) -> Section:
        c = self.sample.columns_dict()
        if c["loss"].size == 0:
            return skipped(self.key, TITLE, DESCRIPTION,
                           "skipped: no record has student_topk_lp and teacher_lp_on_student_topk "
                           "(topk >= 2)")
        sec = Section(self.key, TITLE, DESCRIPTION)
        if self.without:
            sec.notes.append(f"{self.without} records without teacher_lp_on_student_topk left out")
        if c["loss"].size < self.tokens:
            sec.notes.append(f"thresholds and shares from a uniform sample of {c['loss'].size} "
                             f"of {self.tokens} tokens")
        head = low_divergence_share(c, self.opts.rho, self.opts.topd_delta)
        sec.headline = head
        xe = np.linspace(*np.quantile(c["loss"], [0.005, 0.995]), 41)
        ye = np.linspace(0.0, max(float(np.quantile(c["future"], 0.995)), 1e-6), 41)
        counts, _, _ = np.histogram2d(np.clip(c["loss"], xe[0], xe[-1]),
                                      np.clip(c["future"], ye[0], ye[-1]), bins=(xe, ye))
        joint = [{"loss_lo": xe[i], "loss_hi": xe[i + 1], "future_div_lo": ye[j],
                  "future_div_hi": ye[j + 1], "count": int(counts[i, j])}
                 for i in range(counts.shape[0]) for j in range(counts.shape[1])]
        self.div_rel.ensure(self.opts.bins)
        by_pos = [{"bin": b, "rel_lo": b / self.opts.bins, "rel_hi": (b + 1) / self.opts.bins,
                   "tokens": int(n), "div_mean": m}
                  for b, (n, m) in enumerate(zip(self.div_rel.count, self.div_rel.mean(), strict=True))]
        sec.files += [write_csv(out / "topd_joint.csv", joint),
                      write_csv(out / "topd_divergence_position.csv", by_pos)]
        sec.files.append(self._plot(out, counts, xe, ye, head))
        sec.rows = [
            ("tokens in the sample", int(head["topd_tokens"])),
            ("high-loss threshold (80th percentile of l)", head["topd_loss_threshold"]),
            ("divergence threshold delta (nats)", head["topd_delta"]),
            ("share of high-loss tokens with low near-future divergence", head["topd_low_div_share"]),
            ("share of all tokens (high-loss, low divergence)", head["topd_suppressed_frac"]),
            ("median of D (the batch-median threshold)", head["topd_delta_median"]),
            ("share of high-loss tokens below the median of D", head["topd_low_div_share_median"]),
        ]
        return sec

    def _plot(self, out: Path, counts: np.ndarray, xe: np.ndarray, ye: np.ndarray,
              head: dict[str, float]) -> str:
        from matplotlib.colors import LogNorm

        from diagnostics import plots

        with plots.figure(out / "topd.png", 2, "TOPD: loss vs near-future divergence") as (a, b):
            mesh = a.pcolormesh(xe, ye, counts.T, norm=LogNorm(vmin=1, vmax=max(counts.max(), 1)),
                                cmap="viridis")
            a.figure.colorbar(mesh, ax=a, label="tokens")
            a.axvline(head["topd_loss_threshold"], color="tab:red", linestyle="--", linewidth=1)
            a.axhline(head["topd_delta"], color="white", linestyle="--", linewidth=1)
            a.set_xlabel("l = student_lp - teacher_lp")
            a.set_ylabel("near-future divergence (8 tokens)")
            a.set_title(f"low-divergence share of high-loss tokens: {head['topd_low_div_share']:.1%}",
                        fontsize=10)
            plots.lines(b, plots.bin_centers(self.opts.bins), {"mean D": self.div_rel.mean()},
                        xlabel="relative position", ylabel="top-K truncated RKL",
                        title="divergence by position")
        return "topd.png"
