"""Per-token log-probs and top-K of the student, teacher and reference on the student's tokens.

Alignment: the log-prob "at response position t" is the log-prob of `response_ids[t]` given the
prompt and `response_ids[:t]`, i.e. it comes from the logits at index `P + t - 1` of the
concatenated sequence (P = prompt block width). `response_hidden` does that shift once.

Memory: models return hidden states, and `token_stats` turns them into log-probs chunk by
chunk, so no (B, T, V) tensor outlives its chunk; under autograd each chunk is checkpointed, so
its logits are recomputed in backward instead of stored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from opdcli.rollout.batch import RolloutBatch


def response_hidden(model, batch: RolloutBatch) -> torch.Tensor:
    """Final hidden states that predict each response token: (B, T, H)."""
    am = batch.attention_mask_B_L
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    out = model.base_model(input_ids=batch.input_ids_B_L, attention_mask=am, position_ids=pos)
    P, T = batch.prompt_len, batch.response_len
    return out.last_hidden_state[:, P - 1 : P - 1 + T]


@dataclass(frozen=True)
class TokenStats:
    """Log-probs (full-vocabulary normalised) of one model on a batch of responses.

    lp_B_T: log-prob of each sampled token. topk_ids_B_T_K / topk_lp_B_T_K: the model's own
    top-K. cand_lp_B_T_K: log-probs of caller-given candidate ids (e.g. the student's top-K),
    or None.
    """

    lp_B_T: torch.Tensor
    topk_ids_B_T_K: torch.Tensor
    topk_lp_B_T_K: torch.Tensor
    cand_lp_B_T_K: torch.Tensor | None


def _chunk_stats(h_B_C_H, weight_V_H, bias_V, target_B_C, cand_B_C_K, k: int):
    logits = torch.nn.functional.linear(h_B_C_H, weight_V_H, bias_V).float()
    lsm = logits.log_softmax(-1)
    lp = lsm.gather(-1, target_B_C[..., None]).squeeze(-1)
    top = lsm.topk(k, dim=-1)
    cand = lsm.gather(-1, cand_B_C_K) if cand_B_C_K is not None else None
    return lp, top.indices, top.values, cand


def token_stats(hidden_B_T_H: torch.Tensor, lm_head: torch.nn.Module, target_ids_B_T: torch.Tensor,
                k: int, chunk_tokens: int, cand_ids_B_T_K: torch.Tensor | None = None) -> TokenStats:
    """Chunked log-softmax over the vocabulary; keeps only gathered values and top-K.

    Args:
        hidden_B_T_H: output of `response_hidden` (may require grad).
        lm_head: the model's output embedding (`model.get_output_embeddings()`).
        target_ids_B_T: the sampled response tokens.
        k: top-K size (>= 1).
        chunk_tokens: positions per chunk along T.
        cand_ids_B_T_K: optional ids whose log-probs to gather as well.
    """
    weight, bias = lm_head.weight, lm_head.bias
    grad = torch.is_grad_enabled() and hidden_B_T_H.requires_grad
    parts = []
    T = hidden_B_T_H.shape[1]
    step = max(1, chunk_tokens)
    for a in range(0, T, step):
        args = (hidden_B_T_H[:, a : a + step], weight, bias, target_ids_B_T[:, a : a + step],
                None if cand_ids_B_T_K is None else cand_ids_B_T_K[:, a : a + step], k)
        parts.append(checkpoint(_chunk_stats, *args, use_reentrant=False) if grad else _chunk_stats(*args))
    if not parts:  # T == 0
        B = target_ids_B_T.shape[0]
        empty = hidden_B_T_H.new_zeros(B, 0, dtype=torch.float32)
        ids = torch.zeros(B, 0, k, dtype=torch.long, device=hidden_B_T_H.device)
        return TokenStats(empty, ids, empty[..., None].expand(B, 0, k),
                          None if cand_ids_B_T_K is None else empty[..., None].expand(B, 0, k))
    lp, ids, top, cand = zip(*parts, strict=True)
    return TokenStats(torch.cat(lp, 1), torch.cat(ids, 1), torch.cat(top, 1),
                      None if cand_ids_B_T_K is None else torch.cat(cand, 1))


def chunked_logit_loss(student_hidden_B_T_H, student_head, teacher_hidden_B_T_H, teacher_head,
                       loss_fn, mask_B_T, weights_B_T, normalizer, chunk_tokens: int, **loss_kwargs):
    """Sum a full-vocabulary loss (losses.analytic_rkl_loss etc.) over position chunks.

    Each chunk is normalised by the global `normalizer`, so the sum equals the loss on the
    whole batch. Returns (loss, metrics) with metrics averaged over chunks by token count.
    """
    total = student_hidden_B_T_H.new_zeros((), dtype=torch.float32)
    metrics: dict[str, float] = {}
    T = student_hidden_B_T_H.shape[1]
    step = max(1, chunk_tokens)
    grad = torch.is_grad_enabled() and student_hidden_B_T_H.requires_grad

    def chunk_loss(hs, ht, m, w):
        zs = student_head(hs).float()
        with torch.no_grad():
            zt = teacher_head(ht).float()
        return loss_fn(zs, zt, m, w, normalizer=normalizer, **loss_kwargs)[0]

    for a in range(0, T, step):
        sl = slice(a, a + step)
        args = (student_hidden_B_T_H[:, sl], teacher_hidden_B_T_H[:, sl], mask_B_T[:, sl],
                None if weights_B_T is None else weights_B_T[:, sl])
        total = total + (checkpoint(chunk_loss, *args, use_reentrant=False) if grad else chunk_loss(*args))
    metrics["loss/objective"] = float(total.detach())
    return total, metrics


@dataclass(frozen=True)
class ScoredBatch:
    """The per-token record every later stage reads (methods.md §7). All tensors detached.

    Shapes: B sequences, T response positions, K top-K. `teacher_lp_on_student_topk_B_T_K`
    holds the teacher's log-probs of the student's top-K ids. `version_B` is the policy
    version that sampled each row.
    """

    response_ids_B_T: torch.Tensor
    mask_B_T: torch.Tensor
    behavior_lp_B_T: torch.Tensor
    student_lp_B_T: torch.Tensor
    teacher_lp_B_T: torch.Tensor
    student_topk_ids_B_T_K: torch.Tensor
    student_topk_lp_B_T_K: torch.Tensor
    teacher_topk_ids_B_T_K: torch.Tensor
    teacher_topk_lp_B_T_K: torch.Tensor
    teacher_lp_on_student_topk_B_T_K: torch.Tensor
    version_B: torch.Tensor
    ref_lp_B_T: torch.Tensor | None = None
    teacher_hidden_B_T_H: torch.Tensor | None = None
    """Kept only for full-distribution objectives, which need the teacher's logits again."""

    @property
    def num_tokens(self) -> int:
        return int(self.mask_B_T.sum().item())

    def rows(self, sl: slice) -> ScoredBatch:
        """The same record restricted to rows `sl` (every field is indexed on dim 0)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return ScoredBatch(**{k: None if v is None else v[sl] for k, v in values.items()})


@torch.no_grad()
def score_rollouts(student, teacher, batch: RolloutBatch, *, k: int, chunk_tokens: int,
                   batch_size: int, version: int, reference=None,
                   keep_teacher_hidden: bool = False) -> ScoredBatch:
    """Score the student's samples with student, teacher (and reference), no grad."""
    pieces: dict[str, list[torch.Tensor]] = {}
    for a in range(0, batch.batch_size, batch_size):
        sub = batch.rows(slice(a, a + batch_size))
        ids = sub.response_ids_B_T
        s = token_stats(response_hidden(student, sub), student.get_output_embeddings(), ids, k, chunk_tokens)
        h_t = response_hidden(teacher, sub)
        t = token_stats(h_t, teacher.get_output_embeddings(), ids, k, chunk_tokens,
                        cand_ids_B_T_K=s.topk_ids_B_T_K)
        got = {"s_lp": s.lp_B_T, "s_ids": s.topk_ids_B_T_K, "s_top": s.topk_lp_B_T_K, "t_lp": t.lp_B_T,
               "t_ids": t.topk_ids_B_T_K, "t_top": t.topk_lp_B_T_K, "t_on_s": t.cand_lp_B_T_K}
        if keep_teacher_hidden:
            got["t_h"] = h_t
        if reference is not None:
            r = token_stats(response_hidden(reference, sub), reference.get_output_embeddings(), ids, 1,
                            chunk_tokens)
            got["r_lp"] = r.lp_B_T
        for key, value in got.items():
            pieces.setdefault(key, []).append(value)
    cat = {key: torch.cat(v, 0) for key, v in pieces.items()}
    mask = batch.response_mask_B_T.float()
    return ScoredBatch(
        response_ids_B_T=batch.response_ids_B_T, mask_B_T=mask, behavior_lp_B_T=batch.behavior_lp_B_T,
        student_lp_B_T=cat["s_lp"], teacher_lp_B_T=cat["t_lp"], student_topk_ids_B_T_K=cat["s_ids"],
        student_topk_lp_B_T_K=cat["s_top"], teacher_topk_ids_B_T_K=cat["t_ids"],
        teacher_topk_lp_B_T_K=cat["t_top"], teacher_lp_on_student_topk_B_T_K=cat["t_on_s"],
        version_B=torch.full((batch.batch_size,), version, dtype=torch.long),
        ref_lp_B_T=cat.get("r_lp"), teacher_hidden_B_T_H=cat.get("t_h"),
    )
