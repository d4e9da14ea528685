"""TOPD: trajectory-aware OPD via near-future guidance (arXiv 2606.00305).

The paper observes that about 30% of high-loss tokens sit in a low-divergence regime
(surface-form mismatches, not reasoning forks) and that real forks unfold as short-horizon
drift, so it looks at the near future to tell them apart and spreads the guidance over
several tokens. Only the abstract is public; this is the design of methods.md §5.2:

    l_t      = log p(y_t) - log q(y_t)                      (sampled-token loss, = -r_t)
    D_t      = truncated reverse KL of student and teacher on U_t = S_t union T_t, the union of
               the student's and the teacher's top-K, both renormalised over U_t
    Dbar_t   = mean of D over the valid positions t+1..t+H   (D_t itself where none follow)
    h_t      = l_t >= quantile_{1-rho}(l over valid tokens)   (high-loss)
    d_t      = Dbar_t >= delta   (delta: an absolute threshold in nats, 0.1 by default; null:
               the batch median of D)

Suppression: tokens with h and not d get weight `suppress_eps` (0 by default). Guidance at
high-loss divergent tokens, `spread`:

* backward (default): their advantage becomes the windowed return
  sum_{j<H} gamma^j r_{t+j}, crediting the fork with the drift it causes; others keep r_t.
* forward: the following tokens' weights grow, w_{t+j} += kappa * gamma^j for j = 1..H
  (added after suppression, on valid positions only).
* none: suppression only (the paper's first ablation step).

Departures (the paper's choices are unknown; these are ours):

* The scorer computes the student's log-probs of the teacher's top-K ids for this method
  (`reads_student_on_teacher_topk`: one more pass of the student's head on its kept hidden
  states), so D covers the union; a teacher scored elsewhere (vLLM) gives none and is refused.
* The default delta is an absolute threshold, so the share of high-loss tokens that are
  non-divergent is measured, not fixed by the threshold (the batch median makes about half of
  all windows divergent whatever the pair); calibrate it per pair with `opd diagnose`'s topd
  analysis. delta: null keeps the batch median.
* The last valid token of a sequence has no near future; its own divergence stands in, so a
  high loss there is suppressed only when the token itself is not divergent.
* The backward spread rewrites the sampled-token advantage, so it needs
  loss.objective = sampled and loss.discount = 0 (a discounted advantage already carries
  the future; a window over it would count the future twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from opdcli.engines.types import ScoredBatch
from opdcli.errors import ConfigError
from opdcli.methods.base import Method, MethodOutput, register, require_topk


@dataclass(frozen=True)
class TopdConfig:
    rho: float = 0.2
    """Top fraction of the sampled-token loss that counts as high-loss (0 < rho <= 1)."""
    horizon: int = 8
    """Near-future window H in tokens."""
    delta: float | None = 0.1
    """Divergence threshold on the near-future mean in nats (None: the batch median of D)."""
    gamma: float = 0.9
    """Discount inside the window (backward return and forward boost)."""
    kappa: float = 0.5
    """Forward spread: weight added to the next token after a divergent high-loss token."""
    spread: Literal["backward", "forward", "none"] = "backward"
    """How guidance at divergent high-loss tokens is spread over the near future."""
    suppress_eps: float = 0.0
    """Weight of high-loss non-divergent tokens."""
    k: int = 16
    """Top-K size of the divergence D (at most scoring.top_k)."""


def topk_union_rkl(student_topk_ids_B_T_K: torch.Tensor, student_topk_lp_B_T_K: torch.Tensor,
                   teacher_topk_ids_B_T_K: torch.Tensor, teacher_topk_lp_B_T_K: torch.Tensor,
                   teacher_lp_on_student_topk_B_T_K: torch.Tensor,
                   student_lp_on_teacher_topk_B_T_K: torch.Tensor) -> torch.Tensor:
    """D_t = sum_{v in U_t} p(v) (log p(v) - log q(v)), U_t = S_t union T_t, p and q renormalised
    over U_t, (B, T). S_t / T_t are the student's / teacher's top-K ids; an id in both counts once."""
    in_s_B_T_K = (teacher_topk_ids_B_T_K[..., :, None] == student_topk_ids_B_T_K[..., None, :]).any(-1)
    minus_inf = torch.tensor(float("-inf"), device=in_s_B_T_K.device)
    log_p = torch.cat([student_topk_lp_B_T_K.float(),
                       torch.where(in_s_B_T_K, minus_inf, student_lp_on_teacher_topk_B_T_K.float())], -1)
    log_q = torch.cat([teacher_lp_on_student_topk_B_T_K.float(),
                       torch.where(in_s_B_T_K, minus_inf, teacher_topk_lp_B_T_K.float())], -1)
    log_p, log_q = log_p.log_softmax(-1), log_q.log_softmax(-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1).clamp(min=0.0)


def near_future_divergence(d_B_T: torch.Tensor, mask_B_T: torch.Tensor, horizon: int) -> torch.Tensor:
    """Dbar_t: the mean of d over the valid positions t+1..t+H, or d_t where none follows (the
    last valid token), (B, T); 0 where t is invalid."""
    m_B_T = (mask_B_T > 0).to(d_B_T.dtype)
    counts_B_T = torch.nn.functional.pad(m_B_T, (0, horizon))[:, 1:].unfold(1, horizon, 1).sum(-1)
    return torch.where(counts_B_T > 0, future_window_mean(d_B_T, mask_B_T, horizon), d_B_T * m_B_T)


def future_window_mean(d_B_T: torch.Tensor, mask_B_T: torch.Tensor, horizon: int) -> torch.Tensor:
    """Mean of d over the valid positions among t+1..t+H, (B, T); 0 where none or t is invalid."""
    m_B_T = (mask_B_T > 0).to(d_B_T.dtype)
    x_B_T = torch.where(m_B_T > 0, d_B_T, torch.zeros_like(d_B_T))
    pad = (0, horizon)
    # windows over positions t+1..t+H: drop position 0, pad H zeros at the end
    sums_B_T = torch.nn.functional.pad(x_B_T, pad)[:, 1:].unfold(1, horizon, 1).sum(-1)
    counts_B_T = torch.nn.functional.pad(m_B_T, pad)[:, 1:].unfold(1, horizon, 1).sum(-1)
    return sums_B_T / counts_B_T.clamp(min=1) * m_B_T


def windowed_discounted_sum(r_B_T: torch.Tensor, mask_B_T: torch.Tensor, horizon: int,
                            gamma: float) -> torch.Tensor:
    """sum_{j=0}^{H-1} gamma^j r_{t+j} over valid tokens, (B, T); 0 where t is invalid."""
    m_B_T = (mask_B_T > 0).to(r_B_T.dtype)
    x_B_T = torch.where(m_B_T > 0, r_B_T, torch.zeros_like(r_B_T))
    win_B_T_H = torch.nn.functional.pad(x_B_T, (0, horizon - 1)).unfold(1, horizon, 1)
    disc_H = gamma ** torch.arange(horizon, dtype=r_B_T.dtype, device=r_B_T.device)
    return (win_B_T_H * disc_H).sum(-1) * m_B_T


def _quantile(x_N: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile (as torch.quantile, without its input-size limit)."""
    sorted_N = x_N.sort().values
    pos = q * (sorted_N.numel() - 1)
    lo, hi = int(pos), min(int(pos) + 1, sorted_N.numel() - 1)
    return sorted_N[lo] + (pos - lo) * (sorted_N[hi] - sorted_N[lo])


def forward_boost(fork_B_T: torch.Tensor, mask_B_T: torch.Tensor, horizon: int, kappa: float,
                  gamma: float) -> torch.Tensor:
    """Sum over forks t of kappa * gamma^j at t+j (j = 1..H), on valid positions only, (B, T)."""
    fork_B_T = fork_B_T.float()
    boost_B_T = torch.zeros_like(fork_B_T)
    T = fork_B_T.shape[-1]
    for j in range(1, min(horizon, T - 1) + 1):
        boost_B_T[:, j:] += kappa * gamma**j * fork_B_T[:, :-j]
    return boost_B_T * (mask_B_T > 0)


def _check_config(cfg: TopdConfig, loss) -> None:
    problems = [
        (not 0.0 < cfg.rho <= 1.0, f"rho is {cfg.rho}; it must lie in (0, 1]"),
        (cfg.horizon < 1, f"horizon is {cfg.horizon}; it must be at least 1"),
        (cfg.delta is not None and cfg.delta < 0, f"delta is {cfg.delta}; it must be >= 0 nats or null"),
        (cfg.gamma < 0, f"gamma is {cfg.gamma}; it must be >= 0"),
        (cfg.kappa < 0, f"kappa is {cfg.kappa}; it must be >= 0"),
        (cfg.suppress_eps < 0, f"suppress_eps is {cfg.suppress_eps}; it must be >= 0"),
        (cfg.k < 1, f"k is {cfg.k}; it must be at least 1"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(f"method.options.{message}")
    if cfg.spread == "backward" and loss.objective != "sampled":
        raise ConfigError(
            f"topd spread: backward replaces the sampled-token advantage, which only "
            f"loss.objective=sampled uses; with loss.objective={loss.objective} it would have no "
            "effect. Use loss.objective=sampled or method.options.spread: forward / none")
    if cfg.spread == "backward" and loss.discount != 0:
        raise ConfigError(
            f"topd spread: backward sums the advantage over a window, but loss.discount is "
            f"{loss.discount} so each advantage already sums the future; set loss.discount=0 "
            "or method.options.spread: forward / none")


@register
class TOPD(Method):
    name = "topd"
    default_objective = "sampled"  # the default backward spread rewrites the sampled-token advantage
    reads_student_on_teacher_topk = True  # D on the union of both top-K sets
    summary = "TOPD: suppress non-divergent high-loss tokens; spread guidance over the near future"
    Config = TopdConfig

    def __init__(self, cfg: TopdConfig, loss) -> None:
        super().__init__(cfg, loss)
        _check_config(cfg, loss)

    def _divergence(self, scored: ScoredBatch) -> torch.Tensor:
        k = self.cfg.k
        stored = min(scored.student_topk_ids_B_T_K.shape[-1], scored.teacher_topk_ids_B_T_K.shape[-1])
        require_topk(k, stored)
        if scored.teacher_lp_on_student_topk_B_T_K is None or scored.student_lp_on_teacher_topk_B_T_K is None:
            raise ConfigError("topd needs the teacher's log-probs of the student's top-K and the student's of "
                              "the teacher's top-K, which only the transformers scorer computes; use "
                              "scoring.teacher_engine=hf")
        return topk_union_rkl(scored.student_topk_ids_B_T_K[..., :k], scored.student_topk_lp_B_T_K[..., :k],
                              scored.teacher_topk_ids_B_T_K[..., :k], scored.teacher_topk_lp_B_T_K[..., :k],
                              scored.teacher_lp_on_student_topk_B_T_K[..., :k],
                              scored.student_lp_on_teacher_topk_B_T_K[..., :k])

    def apply(self, scored: ScoredBatch, advantages_B_T: torch.Tensor, step: int) -> MethodOutput:
        c, m_B_T = self.cfg, scored.mask_B_T
        valid_B_T = m_B_T > 0
        zero_B_T = torch.zeros_like(m_B_T, dtype=torch.float)
        loss_B_T = torch.where(valid_B_T, (scored.student_lp_B_T - scored.teacher_lp_B_T).float(), zero_B_T)
        d_B_T = torch.where(valid_B_T, self._divergence(scored), zero_B_T)
        future_B_T = near_future_divergence(d_B_T, m_B_T, c.horizon)
        n_valid = int(valid_B_T.sum())
        if n_valid > 0:
            threshold = _quantile(loss_B_T[valid_B_T], 1.0 - c.rho)
            delta = float(_quantile(d_B_T[valid_B_T], 0.5)) if c.delta is None else c.delta
        else:
            threshold, delta = torch.tensor(float("inf")), float(c.delta or 0.0)
        high_B_T = (loss_B_T >= threshold) & valid_B_T
        div_B_T = (future_B_T >= delta) & valid_B_T
        quiet_B_T, fork_B_T = high_B_T & ~div_B_T, high_B_T & div_B_T
        weights_B_T = torch.where(quiet_B_T, torch.full_like(zero_B_T, c.suppress_eps), m_B_T.float())
        advantages_out = None
        if c.spread == "backward":
            ret_B_T = windowed_discounted_sum(advantages_B_T, m_B_T, c.horizon, c.gamma)
            advantages_out = torch.where(fork_B_T, ret_B_T, advantages_B_T).detach()
            boosted = int(fork_B_T.sum())
        elif c.spread == "forward":
            boost_B_T = forward_boost(fork_B_T, m_B_T, c.horizon, c.kappa, c.gamma)
            weights_B_T = weights_B_T + boost_B_T
            boosted = int((boost_B_T > 0).sum())
        else:
            boosted = 0
        n_high = int(high_B_T.sum())
        p = f"method/{self.name}/"
        metrics = {
            p + "high_loss_frac": n_high / max(1, n_valid),
            p + "nondivergent_high_loss_frac": int(quiet_B_T.sum()) / max(1, n_high),
            p + "suppressed_frac": int(quiet_B_T.sum()) / max(1, n_valid),
            p + "boosted_frac": boosted / max(1, n_valid),
            p + "delta": float(delta),
        }
        return MethodOutput(
            weights_B_T=(weights_B_T * valid_B_T).detach(), advantages_B_T=advantages_out, metrics=metrics,
            token_outputs={"loss": loss_B_T, "future_div": future_B_T, "high_loss": high_B_T.float(),
                           "divergent": div_B_T.float()},
        )
