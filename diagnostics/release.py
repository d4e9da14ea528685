"""Analysis 5: the release rule of "Prefix Teach, Suffix Fade" applied post hoc to every record.

Per record (methods.md §3.3, §3.5 Figs. 3 and 6):

* When the record's `method.trajectory` already holds `release_segment`, `bic_improvement` and
  `accepted` (a run with `--method release`), those are used; the cut is `cut_token` when
  present.
* Otherwise token margins m_t (teacher probability top1 - top2 over the student's top-K, K =
  min(16, stored K)) are averaged over sentence segments and `opdcli.changepoint.
  profiled_rss_bic` (k0 = 1, k1 = 3, tau_min = 2, g_min = 10, n_min = 4) picks one downward
  change point. Approximation: no tokenizer is available here, so the segments come from
  `opdcli.segments.regex_sentence_spans` on `response_text` and token t is placed at character
  floor(t * len(text) / T), i.e. characters are shared out in proportion to the tokens.

Reported: the histogram of the BIC gain BIC_0 - min_tau BIC_1(tau), the acceptance rate, the
relative release position cut / T of accepted records, the kept-token fraction, and one
example rollout (the first accepted record) with its margin series and change point, and a
calibration curve: the acceptance rate and kept-token fraction if g_min were each of G_GRID (the
best split and its direction do not depend on g_min; computed records only).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diagnostics.lines import Rollout
from diagnostics.margin import has_margin, main_k, token_margin
from diagnostics.section import Section, ratio, skipped, write_csv
from diagnostics.stats import Options
from opdcli.changepoint import profiled_rss_bic
from opdcli.segments import regex_sentence_spans

TITLE = "Release rule (downward change point of the teacher margin)"
DESCRIPTION = (
    "Per record: token margins averaged over sentence segments, then one downward change point "
    "by profiled RSS-BIC (k0 = 1, k1 = 3, tau_min = 2, g_min = 10, n_min = 4; methods.md §3.3). "
    "Records written by the release method reuse their method.trajectory outputs. Segments "
    "come from the regex sentence splitter on response_text, with tokens placed at characters "
    "in proportion to their index (no tokenizer is needed). Reported: BIC-gain histogram, "
    "acceptance rate, relative release position, kept-token fraction, one example rollout and the "
    "acceptance / kept fraction as a function of g_min (release_calibration.csv).")
G_MIN = 10.0
_COLUMNS = ("file", "offset", "step", "tokens", "segments", "gain", "accepted", "cut", "source", "downward",
            "split_cut")
G_GRID = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
"""Thresholds of the calibration curve (acceptance and kept tokens if g_min were each value)."""
_NEEDED = ("release_segment", "bic_improvement", "accepted")


@dataclass
class Example:
    """One rollout for the example plot."""

    key: tuple[int, int]
    margin: np.ndarray
    seg_starts: np.ndarray
    seg_means: np.ndarray
    cut: int
    gain: float
    accepted: bool


def token_segments(text: str, n: int) -> np.ndarray:
    """Start token of each sentence segment of a response of n tokens (segment 0 starts at 0).

    Same assignment as `opdcli.segments.token_segments` (a token joins the sentence holding its
    first character, or the next one when it starts between sentences), with token t starting
    at character floor(t * len(text) / n).
    """
    spans = regex_sentence_spans(text)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if not spans:
        return np.zeros(1, dtype=np.int64)
    ends = np.array([end for _, end in spans])
    chars = np.arange(n) * len(text) // n
    sid = np.minimum(np.searchsorted(ends, chars, side="right"), ends.size - 1)
    return np.flatnonzero(np.r_[True, sid[1:] > sid[:-1]])


def segment_means(margin: np.ndarray, starts: np.ndarray) -> np.ndarray:
    lengths = np.diff(np.r_[starts, margin.size])
    return np.add.reduceat(margin, starts) / lengths


class ReleaseAnalysis:
    key = "release"

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.cols: dict[str, array] = {c: array("d") for c in _COLUMNS}
        self.without = 0
        self.example: Example | None = None
        self.fallback: Example | None = None

    def add(self, rec: Rollout) -> None:
        n = rec.n_tokens
        if n == 0:
            return
        traj = rec.trajectory
        margin = token_margin(rec, main_k(rec, self.opts)) if has_margin(rec) else None
        if all(traj.get(k) is not None for k in _NEEDED):
            starts = token_segments(rec.response_text, n)
            tau, gain, accepted = int(traj["release_segment"]), float(traj["bic_improvement"]), bool(traj["accepted"])
            cut = n
            if accepted:
                cut = int(traj["cut_token"]) if traj.get("cut_token") is not None else \
                    int(starts[tau]) if tau < starts.size else n
            n_seg = int(traj.get("n_segments") or starts.size)
            source, downward, split_cut = 1.0, float("nan"), float("nan")  # only known at the run's g_min
            if margin is None and isinstance(rec.token_outputs.get("margin"), list):
                margin = np.asarray(rec.token_outputs["margin"], dtype=np.float64)
        elif margin is not None:
            starts = token_segments(rec.response_text, n)
            # g_min = -inf: `accepted` is then "a downward split exists", kept for the calibration curve
            cp = profiled_rss_bic(segment_means(margin, starts), g_min=-np.inf)
            gain, downward = float(cp.bic_improvement), bool(cp.accepted)
            split_cut = int(starts[cp.release_segment]) if downward else n
            accepted = downward and gain > G_MIN
            cut = split_cut if accepted else n
            n_seg, source = int(starts.size), 0.0
        else:
            self.without += 1
            return
        cut = min(max(cut, 0), n)
        for name, value in zip(_COLUMNS, (rec.key[0], rec.key[1], rec.step, n, n_seg, gain,
                                          float(accepted), cut, source, float(downward), float(split_cut)),
                               strict=True):
            self.cols[name].append(value)
        if margin is not None and margin.size == n:
            self._offer(Example(rec.key, margin, starts, segment_means(margin, starts), cut, gain, accepted))

    def _offer(self, ex: Example) -> None:
        if ex.accepted and (self.example is None or ex.key < self.example.key):
            self.example = ex
        elif ex.seg_starts.size >= 4 and (self.fallback is None or ex.key < self.fallback.key):
            self.fallback = ex

    def merge(self, other: ReleaseAnalysis) -> None:
        self.without += other.without
        for name in _COLUMNS:
            self.cols[name].extend(other.cols[name])
        for ex in (other.example, other.fallback):
            if ex is not None:
                self._offer(ex)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {name: np.frombuffer(col, dtype=np.float64) if len(col) else np.zeros(0)
                for name, col in self.cols.items()}

    @staticmethod
    def _headline(c: dict[str, np.ndarray], mask: np.ndarray | None = None) -> dict[str, float]:
        if mask is not None:
            c = {k: v[mask] for k, v in c.items()}
        acc = c["accepted"] > 0
        tokens = c["tokens"].sum()
        rel = c["cut"][acc] / np.maximum(c["tokens"][acc], 1)
        return {
            "release_records": float(c["gain"].size),
            "release_accept_rate": float(acc.mean()) if acc.size else float("nan"),
            "release_gain_mean": float(c["gain"].mean()) if acc.size else float("nan"),
            "release_gain_median": float(np.median(c["gain"])) if acc.size else float("nan"),
            "release_position_mean": float(rel.mean()) if rel.size else float("nan"),
            "release_kept_fraction": ratio(float(c["cut"].sum()), float(tokens)),
            "release_segments_mean": float(c["segments"].mean()) if acc.size else float("nan"),
        }

    def step_metrics(self) -> dict[int, dict[str, float]]:
        c = self._arrays()
        return {int(s): self._headline(c, c["step"] == s) for s in np.unique(c["step"])}

    def report(self, out: Path) -> Section:
        c = self._arrays()
        if c["gain"].size == 0:
            return skipped(self.key, TITLE, DESCRIPTION,
                           "skipped: no record has teacher_lp_on_student_topk (topk >= 2) or "
                           "release outputs in method.trajectory")
        sec = Section(self.key, TITLE, DESCRIPTION)
        if self.without:
            sec.notes.append(f"{self.without} records without margins or release outputs left out")
        n_method = int(c["source"].sum())
        sec.notes.append(f"{n_method} records from method.trajectory, "
                         f"{c['source'].size - n_method} computed here")
        rows = [dict(zip(_COLUMNS, vals, strict=True)) for vals in zip(*(c[k] for k in _COLUMNS), strict=True)]
        for row in rows:
            row.update({k: int(row[k]) for k in ("file", "offset", "step", "tokens", "segments", "cut")})
            row["accepted"] = bool(row["accepted"])
            row["source"] = "method" if row["source"] else "computed"
            row["rel_position"] = row["cut"] / row["tokens"] if row["tokens"] else float("nan")
        sec.files.append(write_csv(out / "release_records.csv", rows, [*_COLUMNS, "rel_position"]))
        curve = calibration(c)
        if curve:
            sec.files.append(write_csv(out / "release_calibration.csv", curve))
            sec.notes.append("release_calibration.csv: acceptance rate and kept-token fraction if g_min "
                             f"were each of {', '.join(f'{g:g}' for g in G_GRID)} (computed records only)")
        sec.files += self._plot(out, c, curve)
        head = self._headline(c)
        sec.headline = head
        sec.rows = [
            ("records analysed", int(head["release_records"])),
            ("acceptance rate", head["release_accept_rate"]),
            ("BIC gain mean / median", f"{head['release_gain_mean']:.4g} / {head['release_gain_median']:.4g}"),
            ("relative release position (accepted), mean", head["release_position_mean"]),
            ("kept-token fraction", head["release_kept_fraction"]),
            ("segments per record, mean", head["release_segments_mean"]),
        ]
        return sec

    def _plot(self, out: Path, c: dict[str, np.ndarray], curve: list[dict[str, float]]) -> list[str]:
        from diagnostics import plots

        acc = c["accepted"] > 0
        files = ["release.png"]
        with plots.figure(out / "release.png", 4, "Release rule", cols=2) as (a, b, d, e):
            plots.hist(a, c["gain"], xlabel="BIC_0 - min BIC_1", title="BIC gain", vline=G_MIN)
            plots.hist(b, c["cut"][acc] / np.maximum(c["tokens"][acc], 1), bins=np.linspace(0, 1, 21),
                       xlabel="cut / T", title=f"release position (accepted, {acc.mean():.0%})")
            plots.hist(d, c["cut"] / np.maximum(c["tokens"], 1), bins=np.linspace(0, 1, 21),
                       xlabel="kept fraction", title="kept fraction per record")
            if curve:
                plots.lines(e, [r["g_min"] for r in curve],
                            {"acceptance rate": [r["accept_rate"] for r in curve],
                             "kept-token fraction": [r["kept_fraction"] for r in curve]},
                            xlabel="g_min", ylabel="fraction", title="calibration (computed records)")
            else:
                e.set_axis_off()
        ex = self.example or self.fallback
        if ex is not None:
            files.append("release_example.png")
            _plot_example(out / "release_example.png", ex)
        return files


def calibration(c: dict[str, np.ndarray]) -> list[dict[str, float]]:
    """Acceptance rate and kept-token fraction at each g_min of G_GRID over the computed records.

    The best split and its direction do not depend on g_min, so one pass serves every threshold.
    """
    mine = c["source"] == 0
    if not mine.any():
        return []
    gain, down = c["gain"][mine], c["downward"][mine] > 0
    tokens, split_cut = c["tokens"][mine], c["split_cut"][mine]
    rows = []
    for g in G_GRID:
        take = down & (gain > g)
        kept = np.where(take, split_cut, tokens)
        rows.append({"g_min": g, "accept_rate": float(take.mean()),
                     "kept_fraction": ratio(float(kept.sum()), float(tokens.sum()))})
    return rows


def _plot_example(path: Path, ex: Example) -> None:
    from diagnostics import plots

    title = (f"example rollout (file {ex.key[0]}, byte {ex.key[1]}): gain {ex.gain:.1f}, "
             + ("released" if ex.accepted else "not released"))
    with plots.figure(path, 1, title) as (a,):
        a.plot(np.arange(ex.margin.size), ex.margin, color="tab:blue", alpha=0.4, linewidth=0.8,
               label="token margin")
        ends = np.r_[ex.seg_starts[1:], ex.margin.size]
        a.hlines(ex.seg_means, ex.seg_starts, ends, color="tab:orange", linewidth=2,
                 label="segment mean")
        if ex.accepted:
            a.axvline(ex.cut, color="tab:red", linestyle="--", label=f"change point (token {ex.cut})")
        a.set_xlabel("token position")
        a.set_ylabel("teacher margin")
        a.legend(fontsize=7)


def as_dict(ex: Example | None) -> dict[str, Any] | None:
    """A JSON-able description of the example rollout."""
    if ex is None:
        return None
    return {"file": ex.key[0], "offset": ex.key[1], "gain": ex.gain, "accepted": ex.accepted,
            "cut": ex.cut, "tokens": int(ex.margin.size), "segments": int(ex.seg_starts.size)}
