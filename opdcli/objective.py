"""The one forward pass with grad: the student on its own samples, then the base objective.

Dispatches `loss.objective` to the pure functions of `opdcli.losses`:
sampled (Variant A), topk (B), rkl (C), fkl (D), jsd (E). The denominator is the step's
number of trained tokens over all processes, passed in as `normalizer`, so micro-batches (and
ranks) sum to the step's token-mean loss. The whole computation runs inside the student's
`ResponseLM.forward`, so a sharded student sees every parameter use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from opdcli import losses
from opdcli.config import LossConfig
from opdcli.engines.types import RolloutBatch, ScoredBatch
from opdcli.freshness import drift_penalty_loss
from opdcli.lm import as_response_lm, map_chunks, token_stats
from opdcli.signals import sampled_advantage

TeacherLogits = Callable[[torch.Tensor], torch.Tensor]
"""Teacher hidden states (B, C, H) -> teacher logits (B, C, V), float32, no grad."""
ChunkExtra = Callable[[torch.Tensor, slice], torch.Tensor]
"""(student logits of a position chunk (B, C, V), the chunk's positions) -> a loss term."""


@dataclass(frozen=True)
class StudentStats:
    """The student's scores taken from the training forward (scoring.student_scores):
    what HFScorer would have computed with a separate no-grad forward on the same tokens."""

    lp_B_T: torch.Tensor
    topk_ids_B_T_K: torch.Tensor
    topk_lp_B_T_K: torch.Tensor
    teacher_lp_on_topk_B_T_K: torch.Tensor

    @staticmethod
    def cat(parts: list[StudentStats]) -> StudentStats:
        """Rows of consecutive micro-batches, in order."""
        return StudentStats(*(torch.cat([getattr(p, f.name) for p in parts], 0) for f in fields(StudentStats)))


def chunk_student_stats(zs_B_C_V: torch.Tensor, zt_B_C_V: torch.Tensor, ids_B_C: torch.Tensor, k: int,
                        lsm_B_C_V: torch.Tensor | None = None):
    """(lp of the sampled ids, top-k ids, top-k lp, teacher lp on those ids) of one chunk, no grad
    (`lsm_B_C_V`: the student's log-softmax when the caller has it already)."""
    with torch.no_grad():
        lsm = zs_B_C_V.detach().float().log_softmax(-1) if lsm_B_C_V is None else lsm_B_C_V.detach()
        top = lsm.topk(k, dim=-1)
        t_on = zt_B_C_V.float().log_softmax(-1).gather(-1, top.indices)
        return lsm.gather(-1, ids_B_C[..., None]).squeeze(-1), top.indices, top.values, t_on


def _cat_chunks(chunks: list[tuple], B: int, k: int, like: torch.Tensor) -> StudentStats:
    if not chunks:  # no response positions
        z = like.new_zeros(B, 0, dtype=torch.float32)
        return StudentStats(z, torch.zeros(B, 0, k, dtype=torch.long, device=like.device),
                            z[..., None].expand(B, 0, k), z[..., None].expand(B, 0, k))
    return StudentStats(*(torch.cat(c, 1) for c in zip(*chunks, strict=True)))


def chunked_logit_loss(student_hidden_B_T_H, student_head, teacher_hidden_B_T_H, teacher_logits: TeacherLogits,
                       loss_fn, mask_B_T, weights_B_T, normalizer, chunk_tokens: int,
                       extra: ChunkExtra | None = None, stats_of: tuple[torch.Tensor, int] | None = None,
                       **loss_kwargs):
    """Sum a full-vocabulary loss (losses.analytic_rkl_loss etc.) over position chunks.

    Each chunk is normalised by the global `normalizer`, so the sum equals the loss on the
    whole batch. `extra(student_logits_chunk, positions)` adds a further term per chunk.
    `stats_of` = (sampled ids (B, T), k) also collects the student's StudentStats per chunk.
    Returns (loss, metrics, stats or None) with metrics["loss/objective"] the summed value of
    `loss_fn` (and metrics["loss/extra"] that of `extra`).
    """
    def chunk_loss(zs, sl):
        with torch.no_grad():
            zt = teacher_logits(teacher_hidden_B_T_H[:, sl])
        w = None if weights_B_T is None else weights_B_T[:, sl]
        part = loss_fn(zs, zt, mask_B_T[:, sl], w, normalizer=normalizer, **loss_kwargs)[0]
        added = extra(zs, sl) if extra is not None else part.new_zeros(())
        stats = () if stats_of is None else chunk_student_stats(zs, zt, stats_of[0][:, sl], stats_of[1])
        return part + added, added.detach(), stats

    total = student_hidden_B_T_H.new_zeros((), dtype=torch.float32)
    outs = map_chunks(student_hidden_B_T_H, student_head, chunk_loss, chunk_tokens)
    for part, _, _ in outs:
        total = total + part
    added = float(sum(float(a) for _, a, _ in outs))
    stats = None if stats_of is None else _cat_chunks([c for _, _, c in outs], mask_B_T.shape[0], stats_of[1],
                                                      student_hidden_B_T_H)
    metrics = {"loss/objective": float(total.detach()) - added} | ({"loss/extra": added} if extra else {})
    return total, metrics, stats


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
                   drift_penalty: float = 0.0, collect: list[StudentStats] | None = None,
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch (already divided by the whole step's `normalizer`).

    Args:
        student: the student (a transformers model or its, possibly sharded, ResponseLM).
        batch / scored: the micro-batch's rows of the rollout and of its scores.
        weights_B_T / advantages_B_T: the method's output for these rows.
        teacher_logits: the scorer's teacher head (full-distribution objectives only).
        drift_penalty: f-OPD's coefficient beta of the drift penalty on the trained tokens
            (`freshness.drift_penalty_loss`), added to the objective; 0 adds nothing.
        collect: when given, the student's statistics on these rows are taken from this
            forward and appended to it (one StudentStats); `scored`'s student fields are then
            placeholders, and with the sampled objective and `advantages_B_T` None the default
            advantage (`signals.sampled_advantage`) is computed from this forward's log-probs.
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

    ids_B_T = batch.response_ids_B_T
    k = scored.student_topk_ids_B_T_K.shape[-1]
    if collect is not None:
        assert scored.teacher_hidden_B_T_H is not None and teacher_logits is not None, \
            "student statistics from the training forward need the teacher's kept hidden states"

    def sampled_lp(hidden_B_T_H, head) -> torch.Tensor:
        """The sampled tokens' log-probs with grad (and, when collecting, the student's stats)."""
        if collect is None:
            return token_stats(hidden_B_T_H, head, ids_B_T, 1, chunk_tokens).lp_B_T

        def chunk(zs, sl):
            with torch.no_grad():
                zt = teacher_logits(scored.teacher_hidden_B_T_H[:, sl])
            lsm = zs.log_softmax(-1)
            lp = lsm.gather(-1, ids_B_T[:, sl, None]).squeeze(-1)
            return lp, chunk_student_stats(zs, zt, ids_B_T[:, sl], k, lsm)

        outs = map_chunks(hidden_B_T_H, head, chunk, chunk_tokens)
        collect.append(_cat_chunks([c for _, c in outs], ids_B_T.shape[0], k, hidden_B_T_H))
        return torch.cat([lp for lp, _ in outs], 1) if outs else collect[-1].lp_B_T

    def compute(hidden_B_T_H, head):
        if cfg.objective == "sampled":
            lp_B_T = sampled_lp(hidden_B_T_H, head)
            adv_B_T = advantages_B_T
            if adv_B_T is None and collect is not None:  # the default advantage, from this forward
                adv_B_T = sampled_advantage(scored.teacher_lp_B_T, lp_B_T.detach(), mask_B_T, cfg.kl_coef,
                                            cfg.discount)
            assert adv_B_T is not None, "sampled objective needs advantages"
            return with_penalty(losses.sampled_token_loss(
                lp_B_T, scored.behavior_lp_B_T, adv_B_T, mask_B_T, weights_B_T,
                surrogate=cfg.surrogate, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                dual_clip=cfg.dual_clip, normalizer=normalizer), lp_B_T)
        if cfg.objective == "topk":
            assert collect is None, "the top-K objective reads the student's scores before training"
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

        loss, metrics, stats = chunked_logit_loss(
            hidden_B_T_H, head, scored.teacher_hidden_B_T_H, teacher_logits, loss_fn, mask_B_T, weights_B_T,
            normalizer, chunk_tokens, extra=chunk_penalty if drift_penalty else None,
            stats_of=None if collect is None else (ids_B_T, k), **kwargs)
        if collect is not None:
            collect.append(stats)
        out = {f"loss/{cfg.objective}": metrics["loss/objective"]}
        return loss, out | ({"loss/drift_penalty": metrics["loss/extra"]} if drift_penalty else {})

    return as_response_lm(student)(batch, compute=compute)
