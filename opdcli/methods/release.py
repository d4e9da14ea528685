"""The release rule of "Prefix Teach, Suffix Fade" (arXiv 2605.13643, methods.md §3).

Late in a strong-to-weak rollout the teacher stops discriminating among the student's
candidates. Per trajectory, in the paper's five steps:

1. token margin m_t = top1 - top2 of g over the student's top-K candidates, with g the
   teacher's probability (default) or log-probability of each candidate;
2. segment the decoded response into sentences and average the margins of each segment;
3. find one downward change point of the segment means by profiled RSS-BIC
   (`opdcli.changepoint.profiled_rss_bic`);
4. if accepted, keep only the tokens before the first released segment;
5. rescale the kept prefix so it carries the trajectory's original token count:
   w_t = keep_t * T_valid / max(1, sum_t keep_t), so sum_t w_t = T_valid (capped at `cap`
   per token only when a cap is set: the mass is then preserved only up to the cap).

Departures from the paper (our choices, methods.md §3.3 and §3.7): K = 16, the probability
margin, the BIC penalties k0 = 1 / k1 = 3, g_min = 10, tau_min = 2, n_min = 4, the
token-count rescale and its optional cap (none by default) are not given by the paper. Segmentation uses an
untrained NLTK Punkt tokenizer with a hand abbreviation list plus newline splits (no data
download), with a regex fallback, instead of NLTK's pretrained model. The weights multiply
whichever base objective is configured rather than only the sampled-token reverse KL.
The decision is post hoc on finished rollouts, as in the paper, so generation is not shortened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from opdcli.changepoint import ChangePoint, profiled_rss_bic
from opdcli.engines.types import ScoredBatch
from opdcli.errors import ConfigError
from opdcli.methods.base import Method, MethodOutput, register, require_topk
from opdcli.segments import segment_response

LOG_FLOOR = -1e4
"""Floor of teacher log-probs in the log margin space (keeps -inf - -inf out of margins)."""


@dataclass(frozen=True)
class ReleaseConfig:
    k: int = 16
    """Student top-K candidates the margin is taken over (2..scoring.top_k)."""
    margin_space: Literal["prob", "log"] = "prob"
    """Margin of teacher probabilities (prob) or teacher log-probabilities (log)."""
    k0: int = 1
    """BIC parameter count of the one-mean model."""
    k1: int = 3
    """BIC parameter count of the two-mean model (two means and the change location)."""
    tau_min: int = 2
    """Fewest segments on either side of the change point."""
    g_min: float = 10.0
    """A release needs a BIC gain above this (10: 'very strong' on the Kass-Raftery scale)."""
    n_min: int = 4
    """Responses with fewer segments are never released."""
    rescale: Literal["tokens", "none"] = "tokens"
    """tokens: scale the kept prefix up to the trajectory's valid token count; none: weight 1."""
    cap: float | None = None
    """Largest per-token weight of the token-count rescale (None: uncapped, so every row keeps
    its token mass exactly; a cap bounds the weight of a short kept prefix and then breaks the
    mass preservation of that row, counted in method/release/capped_frac)."""
    segmenter: Literal["punkt", "regex"] = "punkt"
    """Sentence splitter: NLTK Punkt (regex fallback without nltk) or the regex splitter."""


def _check_config(cfg: ReleaseConfig) -> None:
    problems = [
        (cfg.k < 2, f"k is {cfg.k}; the top1 - top2 margin needs at least 2 candidates"),
        (cfg.k0 < 0 or cfg.k1 < 0, f"k0, k1 are {cfg.k0}, {cfg.k1}; they must be >= 0"),
        (cfg.tau_min < 1, f"tau_min is {cfg.tau_min}; it must be at least 1"),
        (cfg.n_min < 2 * cfg.tau_min,
         f"n_min is {cfg.n_min}; it must be >= 2 * tau_min ({2 * cfg.tau_min}) for a split to exist"),
        (cfg.cap is not None and cfg.cap < 1.0,
         f"cap is {cfg.cap}; it must be >= 1 (the rescale factor is never below 1), or null for no cap"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(f"method.options.{message}")


def teacher_margin(teacher_lp_on_student_topk_B_T_K: torch.Tensor, k: int,
                   space: Literal["prob", "log"]) -> torch.Tensor:
    """m_t = top1 - top2 of g over the first k student candidates, (B, T); g = q or log q."""
    lp_B_T_K = teacher_lp_on_student_topk_B_T_K[..., :k].float()
    g_B_T_K = lp_B_T_K.exp() if space == "prob" else lp_B_T_K.clamp(min=LOG_FLOOR)
    top_B_T_2 = g_B_T_K.topk(2, dim=-1).values
    return top_B_T_2[..., 0] - top_B_T_2[..., 1]


def segment_means(margin_T: list[float], segments: list[tuple[int, int]]) -> list[float]:
    """x_j: the mean token margin of each segment (token index ranges into `margin_T`)."""
    return [sum(margin_T[a:b]) / (b - a) for a, b in segments]


def keep_weights(t_valid: int, cut: int, rescale: str, cap: float | None) -> tuple[float, int]:
    """(weight of each kept token, number kept) for a prefix of `cut` of `t_valid` tokens."""
    kept = max(0, min(cut, t_valid))
    if rescale == "none":
        return 1.0, kept
    factor = t_valid / max(1, kept)
    return (factor if cap is None else min(cap, factor)), kept


@register
class ReleaseRule(Method):
    """Keep-and-rescale token weights from a per-trajectory release point.

    Needs `attach(tokenizer)` before `apply`. Outputs per row: release_segment (kept segment
    count tau*, the best split even when rejected), bic_improvement, accepted, cut_token (the
    response position of the first released token, or the end of the valid tokens when
    nothing is released) and n_segments; per token: the margin (0 on padding).
    """

    name = "release"
    summary = ("Prefix Teach, Suffix Fade: train only up to a downward change point of the "
               "teacher margin, rescaled")
    Config = ReleaseConfig

    def __init__(self, cfg: ReleaseConfig, loss) -> None:
        super().__init__(cfg, loss)
        _check_config(cfg)
        self.tokenizer: Any | None = None

    def attach(self, tokenizer: Any) -> None:
        """Store the tokenizer that decodes responses for segmentation (call before apply)."""
        self.tokenizer = tokenizer

    def _margin(self, scored: ScoredBatch) -> torch.Tensor:
        k = self.cfg.k
        stored = scored.teacher_lp_on_student_topk_B_T_K.shape[-1]
        require_topk(k, stored, "student top-K")
        return teacher_margin(scored.teacher_lp_on_student_topk_B_T_K, k, self.cfg.margin_space)

    def _release_row(self, ids: list[int], margin_T: list[float]) -> tuple[ChangePoint, int, int]:
        """(change point, cut as a valid-token index, number of segments) of one response."""
        c = self.cfg
        if not ids:
            return profiled_rss_bic([], n_min=c.n_min), 0, 0
        segments = segment_response(self.tokenizer, ids, c.segmenter)
        x = segment_means(margin_T, segments)
        cp = profiled_rss_bic(x, k0=c.k0, k1=c.k1, tau_min=c.tau_min, g_min=c.g_min,
                              n_min=c.n_min, downward=True)
        cut = segments[cp.release_segment][0] if cp.accepted else len(ids)
        return cp, cut, len(segments)

    def apply(self, scored: ScoredBatch, advantages_B_T: torch.Tensor, step: int) -> MethodOutput:
        if self.tokenizer is None:
            raise AssertionError("the release method needs the tokenizer to segment responses; "
                                 "call method.attach(tokenizer) before apply")
        c = self.cfg
        valid_B_T = scored.mask_B_T > 0
        m_B_T = (self._margin(scored) * valid_B_T).detach()
        w_B_T = torch.zeros(valid_B_T.shape, dtype=torch.float32, device=valid_B_T.device)
        traj: dict[str, list[Any]] = {key: [] for key in
                                      ("release_segment", "bic_improvement", "accepted", "cut_token",
                                       "n_segments")}
        kept_total, valid_total, capped = 0, 0, 0
        ids_B_T, m_cpu_B_T, valid_cpu_B_T = (scored.response_ids_B_T.cpu(), m_B_T.cpu(), valid_B_T.cpu())
        for b in range(valid_B_T.shape[0]):
            pos_T = valid_cpu_B_T[b].nonzero().squeeze(-1)
            cp, cut, n_seg = self._release_row(ids_B_T[b, pos_T].tolist(), m_cpu_B_T[b, pos_T].tolist())
            weight, kept = keep_weights(len(pos_T), cut, c.rescale, c.cap)
            w_B_T[b, pos_T[:kept].to(w_B_T.device)] = weight
            kept_total, valid_total = kept_total + kept, valid_total + len(pos_T)
            capped += int(c.rescale == "tokens" and c.cap is not None and kept > 0 and len(pos_T) / kept > c.cap)
            end = int(pos_T[-1]) + 1 if len(pos_T) else 0
            cut_token = int(pos_T[cut]) if cut < len(pos_T) else end
            for key, value in (("release_segment", cp.release_segment),
                               ("bic_improvement", float(cp.bic_improvement)),
                               ("accepted", bool(cp.accepted)), ("cut_token", cut_token),
                               ("n_segments", n_seg)):
                traj[key].append(value)
        metrics = self._metrics(traj, kept_total, valid_total)
        metrics[f"method/{self.name}/capped_frac"] = capped / max(1, valid_B_T.shape[0])
        metrics[f"method/{self.name}/mass_ratio"] = float(w_B_T.sum()) / max(1, valid_total)
        return MethodOutput(weights_B_T=w_B_T.detach(), metrics=metrics,
                            token_outputs={"margin": m_B_T}, trajectory_outputs=traj)

    def _metrics(self, traj: dict[str, list[Any]], kept: int, valid: int) -> dict[str, float]:
        rows = max(1, len(traj["accepted"]))
        p = f"method/{self.name}/"
        return {
            p + "accept_rate": sum(traj["accepted"]) / rows,
            p + "kept_fraction": kept / valid if valid else 0.0,
            p + "bic_gain_mean": sum(traj["bic_improvement"]) / rows,
            p + "segments_mean": sum(traj["n_segments"]) / rows,
        }
