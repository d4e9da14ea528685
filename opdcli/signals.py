"""Pure tensor functions that turn scored tokens into per-token signals.

Everything here is detached arithmetic on (B, T) / (B, T, K) tensors with a 0/1 mask; methods
and diagnostics build on these.
"""

from __future__ import annotations

import torch


def masked_mean(x_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask == 1 (0 when the mask is empty)."""
    m = mask_B_T.to(x_B_T.dtype)
    return (torch.where(m > 0, x_B_T, torch.zeros_like(x_B_T)) * m).sum() / m.sum().clamp(min=1)


def discounted_future_sum(r_B_T: torch.Tensor, mask_B_T: torch.Tensor, gamma: float) -> torch.Tensor:
    """A_t = sum_{j >= t} gamma^(j - t) r_j over valid tokens (gamma = 0 returns r)."""
    r = torch.where(mask_B_T > 0, r_B_T, torch.zeros_like(r_B_T))
    if gamma == 0:
        return r
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return out * (mask_B_T > 0)


def reverse_kl_reward(teacher_lp_B_T: torch.Tensor, student_lp_B_T: torch.Tensor,
                      mask_B_T: torch.Tensor) -> torch.Tensor:
    """r_t = log q(y_t) - log p(y_t): minus the one-sample reverse-KL estimate (0 off-mask)."""
    r = teacher_lp_B_T - student_lp_B_T
    return torch.where(mask_B_T > 0, r, torch.zeros_like(r))


def sampled_advantage(teacher_lp_B_T, student_lp_B_T, mask_B_T, coef: float, discount: float):
    """Variant A advantage: c * r_t, optionally summed over the future with a discount."""
    return discounted_future_sum(coef * reverse_kl_reward(teacher_lp_B_T, student_lp_B_T, mask_B_T),
                                 mask_B_T, discount)


def topk_overlap(student_ids_B_T_K: torch.Tensor, teacher_ids_B_T_K: torch.Tensor) -> torch.Tensor:
    """Fraction of the student's top-K ids that are in the teacher's top-K: (B, T) in [0, 1]."""
    hit = (student_ids_B_T_K[..., :, None] == teacher_ids_B_T_K[..., None, :]).any(-1)
    return hit.float().mean(-1)
