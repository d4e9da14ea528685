"""Prune-OPD's drift arithmetic (arXiv 2605.07804): top-K overlap, the teacher top-p test,
reliability weights and the effective length. Pure tensor functions, shared by the offline
weights (`prune`) and the online stop rule (`prune_online`)."""

from __future__ import annotations

import torch

from opdcli.signals import topk_overlap


def overlap_ratio(student_ids_B_T_K: torch.Tensor, teacher_ids_B_T_K: torch.Tensor) -> torch.Tensor:
    """o_t: fraction of the student's top-K ids that are among the teacher's top-K, (B, T)."""
    return topk_overlap(student_ids_B_T_K, teacher_ids_B_T_K)


def top_p_accept_events(sampled_ids_B_T: torch.Tensor, teacher_topk_ids_B_T_K: torch.Tensor,
                        teacher_topk_lp_B_T_K: torch.Tensor, theta: float) -> torch.Tensor:
    """Drift events of the teacher_top_p_accept metric, bool (B, T).

    The nucleus is the shortest prefix of the teacher's top-K (sorted by probability) whose
    cumulative probability reaches theta; a candidate is inside iff the mass before it is
    still below theta, so when the top-K never reaches theta all K are accepted. The event
    is the sampled token lying outside the nucleus.
    """
    lp_B_T_K, order_B_T_K = teacher_topk_lp_B_T_K.sort(-1, descending=True)
    ids_B_T_K = teacher_topk_ids_B_T_K.gather(-1, order_B_T_K)
    p_B_T_K = lp_B_T_K.exp()
    before_B_T_K = p_B_T_K.cumsum(-1) - p_B_T_K
    inside_B_T_K = before_B_T_K < theta
    accepted_B_T = ((ids_B_T_K == sampled_ids_B_T[..., None]) & inside_B_T_K).any(-1)
    return ~accepted_B_T


def reliability_weights(events_B_T: torch.Tensor, mask_B_T: torch.Tensor, w_drop: float) -> torch.Tensor:
    """w_t = clip(1 - w_drop * N_t, 0, 1) * m_t with N_t the inclusive count of masked events."""
    m_B_T = (mask_B_T > 0).float()
    n_B_T = (events_B_T.float() * m_B_T).cumsum(-1)
    return (1.0 - w_drop * n_B_T).clamp(0.0, 1.0) * m_B_T


def effective_length(w_B_T: torch.Tensor, mask_B_T: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """L_eff: number of valid tokens whose reliability exceeds eps, (B,) long."""
    return ((w_B_T > eps) & (mask_B_T > 0)).sum(-1)
