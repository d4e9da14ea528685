"""The one forward pass with grad: the student on its own samples, then the base objective.

Dispatches `loss.objective` to the pure functions of `opdcli.losses`:
sampled (Variant A), topk (B), rkl (C), fkl (D), jsd (E). The denominator is the step's
number of trained tokens over all processes, passed in as `normalizer`, so micro-batches (and
ranks) sum to the step's token-mean loss. The whole computation runs inside the student's
`ResponseLM.forward`, so a sharded student sees every parameter use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from opdcli import losses
from opdcli.config import LossConfig
from opdcli.engines.types import RolloutBatch, ScoredBatch
from opdcli.freshness import drift_penalty_loss
from opdcli.lm import as_response_lm, map_chunks, token_stats

TeacherLogits = Callable[[torch.Tensor], torch.Tensor]
"""Teacher hidden states (B, C, H) -> teacher logits (B, C, V), float32, no grad."""
ChunkExtra = Callable[[torch.Tensor, slice], torch.Tensor]
"""(student logits of a position chunk (B, C, V), the chunk's positions) -> a loss term."""


def chunked_logit_loss(student_hidden_B_T_H, student_head, teacher_hidden_B_T_H, teacher_logits: TeacherLogits,
                       loss_fn, mask_B_T, weights_B_T, normalizer, chunk_tokens: int,
                       extra: ChunkExtra | None = None, **loss_kwargs):
    """Sum a full-vocabulary loss (losses.analytic_rkl_loss etc.) over position chunks.

    Each chunk is normalised by the global `normalizer`, so the sum equals the loss on the
    whole batch. `extra(student_logits_chunk, positions)` adds a further term per chunk.
    Returns (loss, metrics) with metrics["loss/objective"] the summed value of `loss_fn`
    (and metrics["loss/extra"] that of `extra`).
    """
    extras: list[torch.Tensor] = []

    def chunk_loss(zs, sl):
        with torch.no_grad():
            zt = teacher_logits(teacher_hidden_B_T_H[:, sl])
        w = None if weights_B_T is None else weights_B_T[:, sl]
        part = loss_fn(zs, zt, mask_B_T[:, sl], w, normalizer=normalizer, **loss_kwargs)[0]
        if extra is not None:
            extras.append(extra(zs, sl))
            part = part + extras[-1]
        return part

    total = student_hidden_B_T_H.new_zeros((), dtype=torch.float32)
    for part in map_chunks(student_hidden_B_T_H, student_head, chunk_loss, chunk_tokens):
        total = total + part
    added = float(sum(float(e.detach()) for e in extras))
    return total, {"loss/objective": float(total.detach()) - added} | ({"loss/extra": added} if extra else {})


def full_distribution_loss_fn(cfg: LossConfig):
    """The pure loss function and keyword arguments of an analytic objective."""
    kwargs: dict = {"support": cfg.support, "k": cfg.support_k, "tail_bucket": cfg.tail_bucket}
    loss_fn = {"rkl": losses.analytic_rkl_loss, "fkl": losses.forward_kl_loss,
               "jsd": losses.generalized_jsd_loss}[cfg.objective]
    if cfg.objective == "jsd":
        kwargs |= {"beta": cfg.beta, "temperature": cfg.jsd_temperature}
    return loss_fn, kwargs


def objective_loss(student, batch: RolloutBatch, scored: ScoredBatch, weights_B_T: torch.Tensor,
                   advantages_B_T: torch.Tensor | None, cfg: LossConfig, normalizer: float,
                   chunk_tokens: int, teacher_logits: TeacherLogits | None = None,
                   drift_penalty: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch (already divided by the whole step's `normalizer`).

    Args:
        student: the student (a transformers model or its, possibly sharded, ResponseLM).
        batch / scored: the micro-batch's rows of the rollout and of its scores.
        weights_B_T / advantages_B_T: the method's output for these rows.
        teacher_logits: the scorer's teacher head (full-distribution objectives only).
        drift_penalty: f-OPD's coefficient beta of the drift penalty on the trained tokens
            (`freshness.drift_penalty_loss`), added to the objective; 0 adds nothing.
    """
    mask_B_T = scored.mask_B_T
    penalised_B_T = (mask_B_T > 0) & (weights_B_T > 0)

    def penalty(lp_B_T: torch.Tensor, sl: slice = slice(None)) -> tuple[torch.Tensor, dict[str, float]]:
        return drift_penalty_loss(lp_B_T, scored.behavior_lp_B_T[:, sl], penalised_B_T[:, sl],
                                         drift_penalty, normalizer)

    def with_penalty(result, lp_B_T: torch.Tensor):
        if drift_penalty == 0:
            return result
        extra, metrics = penalty(lp_B_T)
        return result[0] + extra, result[1] | metrics

    def compute(hidden_B_T_H, head):
        if cfg.objective == "sampled":
            st = token_stats(hidden_B_T_H, head, batch.response_ids_B_T, 1, chunk_tokens)
            assert advantages_B_T is not None, "sampled objective needs advantages"
            return with_penalty(losses.sampled_token_loss(
                st.lp_B_T, scored.behavior_lp_B_T, advantages_B_T, mask_B_T, weights_B_T,
                surrogate=cfg.surrogate, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                normalizer=normalizer), st.lp_B_T)
        if cfg.objective == "topk":
            st = token_stats(hidden_B_T_H, head, batch.response_ids_B_T, 1, chunk_tokens,
                             cand_ids_B_T_K=scored.student_topk_ids_B_T_K)
            assert st.cand_lp_B_T_K is not None
            return with_penalty(losses.topk_pg_loss(
                st.cand_lp_B_T_K, scored.student_topk_lp_B_T_K, scored.teacher_lp_on_student_topk_B_T_K,
                mask_B_T, weights_B_T, weight_mode=cfg.topk_weight, clip_low=cfg.clip_low,
                clip_high=cfg.clip_high, normalizer=normalizer), st.lp_B_T)
        assert scored.teacher_hidden_B_T_H is not None and teacher_logits is not None, \
            "full-distribution objectives keep the teacher's hidden states and its head"
        loss_fn, kwargs = full_distribution_loss_fn(cfg)

        def chunk_penalty(zs_B_C_V: torch.Tensor, sl: slice) -> torch.Tensor:
            ids = batch.response_ids_B_T[:, sl].unsqueeze(-1)
            lp = zs_B_C_V.float().log_softmax(-1).gather(-1, ids).squeeze(-1)
            return penalty(lp, sl)[0]

        loss, metrics = chunked_logit_loss(hidden_B_T_H, head, scored.teacher_hidden_B_T_H, teacher_logits,
                                           loss_fn, mask_B_T, weights_B_T, normalizer, chunk_tokens,
                                           extra=chunk_penalty if drift_penalty else None, **kwargs)
        out = {f"loss/{cfg.objective}": metrics["loss/objective"]}
        return loss, out | ({"loss/drift_penalty": metrics["loss/extra"]} if drift_penalty else {})

    return as_response_lm(student)(batch, compute=compute)
