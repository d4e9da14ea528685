"""The one forward pass with grad: the student on its own samples, then the base objective.

Dispatches `loss.objective` to the pure functions of `opdcli.losses`:
sampled (Variant A), topk (B), rkl (C), fkl (D), jsd (E). The denominator is the step's
number of trained tokens, passed in as `normalizer`, so micro-batches sum to the step's
token-mean loss.
"""

from __future__ import annotations

import torch

from opdcli import losses
from opdcli.config import LossConfig
from opdcli.methods.base import MethodOutput
from opdcli.rollout.batch import RolloutBatch
from opdcli.scoring import ScoredBatch, chunked_logit_loss, response_hidden, token_stats

FULL_DISTRIBUTION = frozenset({"rkl", "fkl", "jsd"})


def objective_loss(student, teacher, batch: RolloutBatch, scored: ScoredBatch, out: MethodOutput,
                   cfg: LossConfig, normalizer: float, chunk_tokens: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch (already divided by the whole step's `normalizer`)."""
    hidden_B_T_H = response_hidden(student, batch)
    head = student.get_output_embeddings()
    mask_B_T, weights_B_T = scored.mask_B_T, out.weights_B_T
    if cfg.objective == "sampled":
        st = token_stats(hidden_B_T_H, head, batch.response_ids_B_T, 1, chunk_tokens)
        assert out.advantages_B_T is not None, "sampled objective needs advantages"
        return losses.sampled_token_loss(
            st.lp_B_T, scored.behavior_lp_B_T, out.advantages_B_T, mask_B_T, weights_B_T,
            surrogate=cfg.surrogate, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
            normalizer=normalizer)
    if cfg.objective == "topk":
        st = token_stats(hidden_B_T_H, head, batch.response_ids_B_T, 1, chunk_tokens,
                         cand_ids_B_T_K=scored.student_topk_ids_B_T_K)
        assert st.cand_lp_B_T_K is not None
        return losses.topk_pg_loss(
            st.cand_lp_B_T_K, scored.student_topk_lp_B_T_K, scored.teacher_lp_on_student_topk_B_T_K,
            mask_B_T, weights_B_T, weight_mode=cfg.topk_weight, clip_low=cfg.clip_low,
            clip_high=cfg.clip_high, normalizer=normalizer)
    assert scored.teacher_hidden_B_T_H is not None, "full-distribution objectives keep teacher hidden"
    kwargs: dict = {"support": cfg.support, "k": cfg.support_k, "tail_bucket": cfg.tail_bucket}
    loss_fn = {"rkl": losses.analytic_rkl_loss, "fkl": losses.forward_kl_loss,
               "jsd": losses.generalized_jsd_loss}[cfg.objective]
    if cfg.objective == "jsd":
        kwargs |= {"beta": cfg.beta, "temperature": cfg.jsd_temperature}
    loss, metrics = chunked_logit_loss(hidden_B_T_H, head, scored.teacher_hidden_B_T_H,
                                       teacher.get_output_embeddings(), loss_fn, mask_B_T,
                                       weights_B_T, normalizer, chunk_tokens, **kwargs)
    return loss, {f"loss/{cfg.objective}": metrics["loss/objective"]}
