"""f-OPD freshness arithmetic (methods.md §4.2, arXiv 2605.17862): pure tensor functions.

Per sample i with response mask m, at learner time with the current student's log-probs:

    delta_t  = log p_theta(y_t) - log p_beh(y_t)
    D_roll_i = (1/|m|) sum_t (exp(delta_t) - 1 - delta_t)      k3 estimate of KL(p_beh || p_theta), >= 0
    D_sup_i  = (1/|m|) sum_t |A_stored_t - A_fresh_t|            0 when the signal is recomputed
    f_i      = exp(-D_roll_i / tau_r - D_sup_i / tau_s - eta * lag_i)   in (0, 1]

The tokens y_t were sampled from p_beh, so the k3 estimator of KL(p_beh || p_theta) uses the
ratio r_t = p_theta / p_beh = exp(delta_t), whose mean under p_beh is 1: k3 = r - 1 - log r.
(methods.md §4.2 writes exp(-delta) - 1 + delta, the k3 estimator for samples drawn from
p_theta; under p_beh its expectation is E[p_beh / p_theta] - 1 - KL, a chi-square-like quantity
dominated by the tokens the current student has made unlikely, and its gradient as a penalty
grows like p_beh / p_theta. We use the estimator that matches the sampling distribution; a test
checks its expectation, and that of its gradient, against the exact KL by enumeration.)

Samples with f_i < f_min or lag_i > max_lag are dropped; the kept ones weigh u_i = f_i / mean(f)
over the kept samples. The truncated importance ratio is min(exp(delta_t), C) per token, or
min(prod_{t' < t} exp(delta_t'), C) for the state s_t (`prefix_ratio`); the drift penalty's
coefficient doubles or halves when the batch mean of D_roll is above or below a target, within
[floor, beta_max] (`drift_penalty_loss` is that penalty as a loss term). Method fopd
(opdcli.methods.fopd) applies them in the asynchronous loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opdcli.errors import ConfigError


def _row_mean(x_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    m = (mask_B_T > 0).to(x_B_T.dtype)
    return (torch.where(m > 0, x_B_T, torch.zeros_like(x_B_T)) * m).sum(-1) / m.sum(-1).clamp(min=1)


def rollout_drift(student_lp_B_T: torch.Tensor, behavior_lp_B_T: torch.Tensor,
                  mask_B_T: torch.Tensor) -> torch.Tensor:
    """D_roll per sample (B,): the k3 estimator of KL(p_beh || p_theta), 0 for empty rows."""
    return _row_mean(_k3(student_lp_B_T - behavior_lp_B_T), mask_B_T)


def _k3(delta: torch.Tensor) -> torch.Tensor:
    """r - 1 - log r with r = exp(delta); >= 0 in exact arithmetic, rounding clamped so that f <= 1."""
    return (torch.expm1(delta) - delta).clamp(min=0)


def supervision_drift(stored_adv_B_T: torch.Tensor | None, fresh_adv_B_T: torch.Tensor,
                      mask_B_T: torch.Tensor) -> torch.Tensor:
    """D_sup per sample (B,): mean |A_stored - A_fresh| (zeros without a stored signal)."""
    if stored_adv_B_T is None:
        return torch.zeros(fresh_adv_B_T.shape[0], dtype=fresh_adv_B_T.dtype, device=fresh_adv_B_T.device)
    return _row_mean((stored_adv_B_T - fresh_adv_B_T).abs(), mask_B_T)


def freshness(d_roll_B: torch.Tensor, d_sup_B: torch.Tensor, lag_B: torch.Tensor, *, tau_r: float,
              tau_s: float, eta: float) -> torch.Tensor:
    """f_i = exp(-D_roll / tau_r - D_sup / tau_s - eta * lag); a tau of 0 switches its term off."""
    z = -eta * lag_B.to(d_roll_B.dtype)
    if tau_r > 0:
        z = z - d_roll_B / tau_r
    if tau_s > 0:
        z = z - d_sup_B / tau_s
    return z.exp()


def keep_and_weights(f_B: torch.Tensor, lag_B: torch.Tensor, *, f_min: float, max_lag: int | None,
                     reweight: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept rows bool B, sample weights B): u_i = f_i / mean(f over kept), 0 on dropped rows.

    `max_lag` None keeps every lag; `reweight` False gives every kept row weight 1.
    """
    keep = f_B >= f_min
    if max_lag is not None:
        keep = keep & (lag_B <= max_lag)
    if not bool(keep.any()):
        return keep, torch.zeros_like(f_B)
    if not reweight:
        return keep, keep.to(f_B.dtype)
    mean = f_B[keep].mean()
    return keep, torch.where(keep, f_B / mean, torch.zeros_like(f_B))


def truncated_ratio(student_lp_B_T: torch.Tensor, behavior_lp_B_T: torch.Tensor, cap: float,
                    mask_B_T: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(min(exp(delta), cap) detached, 0 off-mask; fraction of valid tokens that hit the cap)."""
    return _capped((student_lp_B_T - behavior_lp_B_T).detach().exp(), cap, mask_B_T)


def prefix_ratio(student_lp_B_T: torch.Tensor, behavior_lp_B_T: torch.Tensor, cap: float,
                 mask_B_T: torch.Tensor, *, include_current: bool) -> tuple[torch.Tensor, float]:
    """The state's truncated ratio min(prod_{t' < t} p_theta / p_beh, cap) per token (detached).

    A distribution-level loss at s_t (rkl, fkl, jsd, top-K) is an expectation over the states
    the sampler visited; p_theta would reach s_t with the product of the ratios of the tokens
    before t. `include_current` multiplies the ratio of y_t as well (a sampled-token loss, whose
    action y_t was sampled too). Computed in log space; 0 off-mask. Returns (ratio, clip fraction).
    """
    valid = mask_B_T > 0
    delta = torch.where(valid, (student_lp_B_T - behavior_lp_B_T).detach(), torch.zeros_like(student_lp_B_T))
    log_ratio = delta.cumsum(-1) if include_current else delta.cumsum(-1) - delta
    return _capped(log_ratio.clamp(max=math.log(cap) + 1.0).exp(), cap, mask_B_T)


def _capped(ratio: torch.Tensor, cap: float, mask_B_T: torch.Tensor) -> tuple[torch.Tensor, float]:
    valid = mask_B_T > 0
    clipped = (ratio > cap) & valid
    frac = float(clipped.sum()) / max(1, int(valid.sum()))
    return torch.where(valid, ratio.clamp(max=cap), torch.zeros_like(ratio)), frac


def drift_penalty_loss(student_lp_B_T: torch.Tensor, behavior_lp_B_T: torch.Tensor, mask_B_T: torch.Tensor,
                       beta: float, normalizer: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The drift penalty beta * sum_t m_t (exp(delta_t) - 1 - delta_t) / normalizer, with grad.

    delta_t = student_lp - behavior_lp (the sampler's log-probs, a constant); each term is the
    k3 estimate of KL(p_beh || p_theta) at that token, so the penalty pulls the student back
    towards the weights that sampled the batch. Its gradient in student_lp is
    beta * (exp(delta_t) - 1) / normalizer, whose expectation under p_beh is the gradient of
    KL(p_beh || p_theta). `normalizer` None: the number of masked tokens.
    Returns (loss, {"loss/drift_penalty": value}).
    """
    if beta < 0:
        raise ConfigError(f"beta={beta} must be >= 0.")
    if student_lp_B_T.shape != behavior_lp_B_T.shape or student_lp_B_T.shape != mask_B_T.shape:
        raise ConfigError(f"student_lp {tuple(student_lp_B_T.shape)}, behavior_lp {tuple(behavior_lp_B_T.shape)} "
                          f"and mask {tuple(mask_B_T.shape)} must have one shape")
    valid = mask_B_T > 0
    delta = torch.where(valid, student_lp_B_T - behavior_lp_B_T.detach(), torch.zeros_like(student_lp_B_T))
    total = (torch.expm1(delta) - delta).sum()
    loss = beta * total / (normalizer if normalizer is not None else max(1, int(valid.sum())))
    return loss, {"loss/drift_penalty": float(loss.detach())}


@dataclass
class AdaptiveDriftPenalty:
    """beta for the penalty beta * D_roll: doubled above the target drift, halved below it.

    A beta of 0 starts at `floor` the first time the drift exceeds the target (doubling 0 would
    never move); below `floor` it returns to 0, and it never exceeds `beta_max` (a lag that
    keeps the drift above the target would otherwise double it without end; None: no ceiling).
    """

    target: float
    beta: float = 0.0
    floor: float = 1e-3
    beta_max: float | None = 1.0

    def update(self, mean_d_roll: float) -> float:
        if mean_d_roll > self.target:
            self.beta = self.floor if self.beta == 0 else 2 * self.beta
            if self.beta_max is not None:
                self.beta = min(self.beta, self.beta_max)
        elif mean_d_roll < self.target and self.beta > 0:
            self.beta = self.beta / 2 if self.beta / 2 >= self.floor else 0.0
        return self.beta

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])
