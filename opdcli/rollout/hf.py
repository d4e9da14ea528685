"""Sampling engine on transformers models (CPU or GPU), with a KV cache and our own loop.

Our own loop (rather than `model.generate`) records the sampler's log-prob of each token
without keeping a (B, T, V) score tensor, and lets a caller stop rows early (Prune-OPD's
online truncation) through a `stop` factory that sees every sampled token as it is made.

Typical use:
    batch = sample(model, tokenizer, texts, SamplingParams(n=4, temperature=1.0), generator=g)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opdcli.rollout.batch import RolloutBatch

StopFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(step t, token sampled at t (B), rows for which it is a real token (B), the student's raw
logits that sampled it (B x V)) -> rows to stop after this token (bool B)."""
StopFactory = Callable[[torch.Tensor, torch.Tensor], StopFn]
"""(prompt ids B x P, prompt attention mask B x P) of one generation block -> its StopFn."""


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    batch_size: int = 64


def process_logits(logits_B_V: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering; filtered entries are -inf."""
    logits_B_V = logits_B_V.float() / max(temperature, 1e-8)
    if top_k > 0 and top_k < logits_B_V.shape[-1]:
        kth = logits_B_V.topk(top_k, dim=-1).values[..., -1:]
        logits_B_V = logits_B_V.masked_fill(logits_B_V < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits_B_V.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_B_V = logits_B_V.masked_fill(drop, float("-inf"))
    return logits_B_V


def eos_token_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = model.generation_config.eos_token_id if model.generation_config is not None else None
    if isinstance(gen, int):
        ids.add(gen)
    elif isinstance(gen, list):
        ids |= set(gen)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def _sample_block(model, ids_B_P, am_B_P, params: SamplingParams, eos: torch.Tensor,
                  pad_id: int, generator: torch.Generator | None, stop: StopFactory | None):
    B = ids_B_P.shape[0]
    device = ids_B_P.device
    stop_fn = stop(ids_B_P, am_B_P) if stop is not None else None
    out = model(input_ids=ids_B_P, attention_mask=am_B_P,
                position_ids=(am_B_P.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    past, logits_B_V = out.past_key_values, out.logits[:, -1]
    am = am_B_P
    active = torch.ones(B, dtype=torch.bool, device=device)
    tokens, lps, masks = [], [], []
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(params.max_new_tokens):
        if params.temperature == 0:
            tok_B = logits_B_V.argmax(-1)
            lp_B = torch.zeros(B, device=device)
        else:
            lsm = process_logits(logits_B_V, params.temperature, params.top_p, params.top_k).log_softmax(-1)
            tok_B = torch.multinomial(lsm.exp(), 1, generator=generator).squeeze(-1)
            lp_B = lsm.gather(-1, tok_B[:, None]).squeeze(-1)
        tok_B = torch.where(active, tok_B, torch.full_like(tok_B, pad_id))
        tokens.append(tok_B)
        lps.append(torch.where(active, lp_B, torch.zeros_like(lp_B)))
        masks.append(active.clone())
        hit_eos = active & torch.isin(tok_B, eos)
        finished |= hit_eos
        active = active & ~hit_eos
        if stop_fn is not None:
            active = active & ~stop_fn(t, tok_B, masks[-1], logits_B_V)
        if not active.any() or t + 1 == params.max_new_tokens:
            break
        am = torch.cat([am, active[:, None].to(am.dtype)], dim=1)
        pos = (am.sum(-1, keepdim=True) - 1).clamp(min=0)
        out = model(input_ids=tok_B[:, None], attention_mask=am, position_ids=pos,
                    past_key_values=past, use_cache=True)
        past, logits_B_V = out.past_key_values, out.logits[:, -1]
    return torch.stack(tokens, 1), torch.stack(lps, 1), torch.stack(masks, 1), finished


def sample(model, tokenizer, prompt_texts: list[str], params: SamplingParams, *,
           generator: torch.Generator | None = None, stop: StopFactory | None = None) -> RolloutBatch:
    """Sample `params.n` responses per prompt text (already chat-rendered)."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt_texts, return_tensors="pt", padding=True, add_special_tokens=False,
                    padding_side="left")
    ids_P_L = enc["input_ids"].to(device)
    am_P_L = enc["attention_mask"].to(device)
    index_B = [p for p in range(len(prompt_texts)) for _ in range(params.n)]
    ids_B_P, am_B_P = ids_P_L[index_B], am_P_L[index_B]
    eos = torch.tensor(eos_token_ids(tokenizer, model), device=device)
    pad_id = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    blocks = []
    for a in range(0, len(index_B), params.batch_size):
        b = slice(a, a + params.batch_size)
        blocks.append(_sample_block(model, ids_B_P[b], am_B_P[b], params, eos, pad_id, generator, stop))
    model.train(was_training)
    T = max(blk[0].shape[1] for blk in blocks)

    def cat(i: int, fill) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(blk[i], (0, T - blk[i].shape[1]), value=fill)
                          for blk in blocks])

    resp_B_T, lp_B_T = cat(0, pad_id), cat(1, 0.0)
    mask_B_T = cat(2, False).long()
    finished_B = torch.cat([blk[3] for blk in blocks])
    return RolloutBatch(
        input_ids_B_L=torch.cat([ids_B_P, resp_B_T], dim=1),
        attention_mask_B_L=torch.cat([am_B_P, mask_B_T.to(am_B_P.dtype)], dim=1),
        prompt_len=ids_B_P.shape[1],
        response_ids_B_T=resp_B_T,
        response_mask_B_T=mask_B_T,
        behavior_lp_B_T=lp_B_T,
        finished_B=finished_B,
        prompt_index_B=tuple(index_B),
        prompt_texts_P=tuple(prompt_texts),
    )


def decode_responses(tokenizer, batch: RolloutBatch) -> list[str]:
    """Response texts without padding and without the EOS token."""
    texts = []
    for ids_T, m_T in zip(batch.response_ids_B_T.tolist(), batch.response_mask_B_T.tolist(), strict=True):
        texts.append(tokenizer.decode([i for i, m in zip(ids_T, m_T, strict=True) if m],
                                      skip_special_tokens=True))
    return texts
