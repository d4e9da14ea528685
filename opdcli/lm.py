"""A causal LM run on prompt + response rows, with every parameter use inside `forward`.

Alignment: the log-prob "at response position t" is the log-prob of `response_ids[t]` given the
prompt and `response_ids[:t]`, i.e. it comes from the logits at index `P + t - 1` of the
concatenated sequence (P = prompt block width). `response_hidden` does that shift once.

Memory: `map_chunks` applies the output head chunk by chunk along T, so no (B, T, V) tensor
outlives its chunk; under autograd each chunk is checkpointed, so its logits are recomputed in
backward instead of stored.

Wrapping: `ResponseLM` runs the body, then a caller's `compute(hidden, head)` inside its own
`forward`. FSDP2 unshards parameters in module forward hooks, so a model sharded as
`fully_shard(layer)` for each decoder layer plus `fully_shard(ResponseLM(model))` sees every
use of its embeddings, final norm and (tied or untied) head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def response_hidden(model, batch) -> torch.Tensor:
    """Final hidden states that predict each response token: (B, T, H).

    `batch` is a RolloutBatch (input_ids_B_L, attention_mask_B_L, prompt_len, response_len).
    """
    am = batch.attention_mask_B_L
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    out = model.base_model(input_ids=batch.input_ids_B_L, attention_mask=am, position_ids=pos)
    P, T = batch.prompt_len, batch.response_len
    return out.last_hidden_state[:, P - 1 : P - 1 + T]


def map_chunks(hidden_B_T_H: torch.Tensor, head: torch.nn.Module, fn: Callable[[torch.Tensor, slice], Any],
               chunk_tokens: int) -> list[Any]:
    """[fn(head(hidden[:, sl]).float(), sl) for each chunk sl of `chunk_tokens` positions].

    Under autograd every chunk is checkpointed (logits recomputed in backward).
    """
    grad = torch.is_grad_enabled() and hidden_B_T_H.requires_grad
    step = max(1, chunk_tokens)
    out = []
    for a in range(0, hidden_B_T_H.shape[1], step):
        sl = slice(a, a + step)

        def chunk(h: torch.Tensor, sl: slice = sl) -> Any:
            return fn(head(h).float(), sl)

        h = hidden_B_T_H[:, sl]
        out.append(checkpoint(chunk, h, use_reentrant=False) if grad else chunk(h))
    return out


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


def token_stats(hidden_B_T_H: torch.Tensor, head: torch.nn.Module, target_ids_B_T: torch.Tensor,
                k: int, chunk_tokens: int, cand_ids_B_T_K: torch.Tensor | None = None) -> TokenStats:
    """Chunked log-softmax over the vocabulary; keeps only gathered values and top-K.

    Args:
        hidden_B_T_H: output of `response_hidden` (may require grad).
        head: the model's output embedding, called as a module.
        target_ids_B_T: the sampled response tokens.
        k: top-K size (>= 1).
        chunk_tokens: positions per chunk along T.
        cand_ids_B_T_K: optional ids whose log-probs to gather as well.
    """
    def stats(logits: torch.Tensor, sl: slice):
        lsm = logits.log_softmax(-1)
        lp = lsm.gather(-1, target_ids_B_T[:, sl, None]).squeeze(-1)
        top = lsm.topk(k, dim=-1)
        cand = lsm.gather(-1, cand_ids_B_T_K[:, sl]) if cand_ids_B_T_K is not None else None
        return lp, top.indices, top.values, cand

    parts = map_chunks(hidden_B_T_H, head, stats, chunk_tokens)
    if not parts:  # T == 0
        B = target_ids_B_T.shape[0]
        empty = hidden_B_T_H.new_zeros(B, 0, dtype=torch.float32)
        ids = torch.zeros(B, 0, k, dtype=torch.long, device=hidden_B_T_H.device)
        return TokenStats(empty, ids, empty[..., None].expand(B, 0, k),
                          None if cand_ids_B_T_K is None else empty[..., None].expand(B, 0, k))
    lp, ids, top, cand = zip(*parts, strict=True)
    return TokenStats(torch.cat(lp, 1), torch.cat(ids, 1), torch.cat(top, 1),
                      None if cand_ids_B_T_K is None else torch.cat(cand, 1))


VOCAB_ATTR = "opd_vocab_size"


def set_vocab(model: torch.nn.Module, n: int) -> None:
    """Score `model` over the first `n` output rows only (its tokenizer's length): checkpoints
    often pad the head past the tokenizer (e.g. 151,936 or 152,064 rows around 151,669 tokens),
    and two models of one tokenizer must normalise over the same ids."""
    setattr(unwrap(model), VOCAB_ATTR, int(n))


def vocab_size(model: torch.nn.Module) -> int:
    """The number of token ids `model` is scored and sampled over (set_vocab, else its head rows)."""
    lm = unwrap(model)
    n = getattr(lm, VOCAB_ATTR, None)
    return int(n) if n is not None else int(lm.get_output_embeddings().weight.shape[0])


AUTOCAST_ATTR = "opd_compute_dtype"
"""Set on a mixed-precision student and its head (opdcli.precision): the autocast dtype."""


class _SlicedHead:
    """An output head cut to its first `n` rows (the padded rows never reach a softmax)."""

    def __init__(self, head: torch.nn.Module, n: int) -> None:
        self.head, self.n = head, n

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if type(self.head) is torch.nn.Linear:  # only the kept rows are multiplied
            bias = None if self.head.bias is None else self.head.bias[: self.n]
            dtype = getattr(self.head, AUTOCAST_ATTR, None)  # bypasses the head's own autocast hooks
            with torch.autocast(h.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
                return torch.nn.functional.linear(h, self.head.weight[: self.n], bias)
        return self.head(h)[..., : self.n]


def output_head(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's output head, cut to `vocab_size(model)` rows when its head is wider."""
    lm = unwrap(model)
    head = lm.get_output_embeddings()
    n = vocab_size(lm)
    return head if n == head.weight.shape[0] else _SlicedHead(head, n)


class ResponseLM(torch.nn.Module):
    """Wraps a transformers causal LM: forward(batch | hidden, compute) -> compute(hidden, head).

    `batch` is a RolloutBatch; with `hidden_B_T_H` given instead, the body is skipped (the
    teacher's logits on kept hidden states). `compute` receives the (B, T, H) hidden states and
    the output head (cut to the tokenizer's ids: `output_head`) and returns whatever the caller
    needs (stats, a loss).
    """

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, batch: Any = None, hidden_B_T_H: torch.Tensor | None = None, *,
                compute: Callable[[torch.Tensor, torch.nn.Module], Any]) -> Any:
        hidden = response_hidden(self.lm, batch) if hidden_B_T_H is None else hidden_B_T_H
        return compute(hidden, output_head(self.lm))


def as_response_lm(model: torch.nn.Module) -> ResponseLM:
    """The model itself when already wrapped (possibly sharded), else a fresh wrapper."""
    return model if isinstance(model, ResponseLM) else ResponseLM(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a ResponseLM (or the model itself)."""
    return model.lm if isinstance(model, ResponseLM) else model
