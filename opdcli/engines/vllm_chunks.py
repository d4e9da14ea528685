"""Per-token stop rules on the vLLM engine, in chunks (see opdcli.engines.vllm_engine).

Each round asks the engine for at most `rule.chunk` tokens for every live row (one request per
row, its prompt being the row's prompt + everything sampled so far), runs the transformers
teacher over each live row's whole sequence to get its logits before every new token, and feeds
the rule's state exactly what the hf engine's follower feeds it: the chunk's tokens, the
student's top-K ids at those positions (from vLLM's `logprobs=K`), the teacher's logits, and
which positions are real tokens. A row ends on EOS, on its budget, or when the rule stops it.
"""

from __future__ import annotations

from typing import Any

import torch

from opdcli.engines.types import RolloutBatch, SamplingParams, StopRule


def _student_topk(step: dict, k: int) -> list[int]:
    ranked = sorted((v.rank, tid) for tid, v in step.items() if v.rank is not None and v.rank <= k)
    ids = [tid for _, tid in ranked[:k]]
    return ids + [ids[-1] if ids else 0] * (k - len(ids))


@torch.no_grad()
def _teacher_logits(teacher, seqs: list[list[int]], starts: list[int], width: int, pad: int) -> torch.Tensor:
    """The teacher's logits before positions starts[b] .. starts[b] + width - 1 of each sequence
    (B, width, V), left-padding the batch."""
    dev = next(teacher.parameters()).device
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    am = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, L - len(s):] = torch.tensor(s)
        am[b, L - len(s):] = 1
    ids, am = ids.to(dev), am.to(dev)
    logits = teacher(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    out = torch.zeros(len(seqs), width, logits.shape[-1], dtype=torch.float32, device=dev)
    for b, s in enumerate(seqs):
        first = L - len(s) + starts[b]  # absolute index of the chunk's first token
        n = min(width, len(s) - starts[b])
        out[b, :n] = logits[b, first - 1:first - 1 + n].float()
    return out


def sample_with_stop_rule(sampler: Any, ids_P_L: torch.Tensor, am_P_L: torch.Tensor, index_B: list[int],
                          texts: list[str], params: SamplingParams, max_new: int, rule: StopRule) -> RolloutBatch:
    B = len(index_B)
    prompts = [ids_P_L[p][am_P_L[p] > 0].tolist() for p in index_B]
    gen: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    finished = [False] * B
    live = [True] * B
    teacher = sampler.follower
    dev = next(teacher.parameters()).device
    state = rule.open(B, dev)
    chunk, k = max(1, rule.chunk), rule.student_topk
    greedy = params.temperature == 0
    follower_tokens = 0
    while any(live):
        rows = [b for b in range(B) if live[b]]
        sps = [sampler.sampling_params_cls(
            n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=min(chunk, max_new - len(gen[b])), logprobs=k if k else (None if greedy else 0), stop_token_ids=sampler.stops, ignore_eos=False, skip_special_tokens=False, detokenize=False)
            for b in rows]
        outs = sampler.llm.generate([{"prompt_token_ids": prompts[b] + gen[b]} for b in rows], sps, use_tqdm=False)
        tok = torch.full((B, chunk), sampler.tokenizer.pad_token_id, dtype=torch.long)
        valid = torch.zeros(B, chunk, dtype=torch.bool)
        s_ids = torch.zeros(B, chunk, max(k, 1), dtype=torch.long)
        starts = {}
        for b, out in zip(rows, outs, strict=True):
            o = out.outputs[0]
            new = list(o.token_ids)
            starts[b] = len(prompts[b]) + len(gen[b])
            tok[b, :len(new)] = torch.tensor(new, dtype=torch.long)
            valid[b, :len(new)] = True
            for j, t in enumerate(new):
                lps[b].append(0.0 if greedy else float(o.logprobs[j][t].logprob))
                if k:
                    s_ids[b, j] = torch.tensor(_student_topk(o.logprobs[j], k))
            gen[b] += new
            if new and new[-1] in sampler.stops:
                finished[b], live[b] = True, False
            elif len(gen[b]) >= max_new or not new:
                live[b] = False
        t_rows = _teacher_logits(teacher, [prompts[b] + gen[b] for b in rows], [starts[b] for b in rows], chunk,
                                 sampler.tokenizer.pad_token_id)
        logits = torch.zeros(B, chunk, t_rows.shape[-1], device=dev)
        logits[rows] = t_rows
        follower_tokens += sum(len(prompts[b]) + len(gen[b]) for b in rows)
        stop = state.update(tok.to(dev), s_ids.to(dev) if k else None, logits, valid.to(dev))
        for b in rows:
            if bool(stop[b]):
                live[b] = False
    rows_out = [(gen[b], lps[b], finished[b]) for b in range(B)]
    return sampler.rows_to_batch(ids_P_L[index_B], am_P_L[index_B], rows_out, index_B, texts,
                                 stopped_B=state.stopped_B.cpu(), follower_tokens=follower_tokens)
