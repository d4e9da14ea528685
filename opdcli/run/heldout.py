"""Held-out accuracy during training: greedy decoding, boxed-answer exact match.

Uses the same grader (`opdcli.grading.grade`) as `opd eval --bench toy-arith`.
"""

from __future__ import annotations

import torch

from opdcli.data import Prompt, render
from opdcli.engines.hf_sampler import HFSampler, decode_responses
from opdcli.engines.types import SamplingParams
from opdcli.grading import grade, last_boxed, strip_thinking


@torch.no_grad()
def heldout_accuracy(model, tokenizer, prompts: list[Prompt], max_new_tokens: int,
                     batch_size: int, prefix: str = "eval/heldout") -> dict[str, float]:
    """Accuracy, no-answer rate, truncation rate and mean response length (tokens)."""
    texts = [render(tokenizer, p) for p in prompts]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    batch = HFSampler(model, tokenizer).sample(texts, params)
    responses = decode_responses(tokenizer, batch)
    correct = [grade(r, p.answer or "") for r, p in zip(responses, prompts, strict=True)]
    no_answer = [last_boxed(strip_thinking(r)) is None for r in responses]
    n = max(1, len(prompts))
    return {
        f"{prefix}/accuracy": sum(correct) / n,
        f"{prefix}/no_answer_rate": sum(no_answer) / n,
        f"{prefix}/truncated_rate": float((~batch.finished_B).float().mean()),
        f"{prefix}/response_len": float(batch.response_mask_B_T.float().sum(-1).mean()),
    }
