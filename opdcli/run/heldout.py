"""Held-out accuracy during training: greedy decoding (and, with eval.samples, sampled answers
at eval.temperature with a fixed seed), boxed-answer exact match.

Uses the same grader (`opdcli.grading.grade`) as `opd eval --bench toy-arith`. Under torchrun
every rank decodes its share of the problems and the counts are summed.
"""

from __future__ import annotations

import torch

from opdcli.data import Prompt, render
from opdcli.dist import ALONE, Dist
from opdcli.engines.hf_sampler import HFSampler, decode_responses
from opdcli.engines.types import SamplingParams
from opdcli.grading import grade, last_boxed, strip_thinking


@torch.no_grad()
def heldout_accuracy(model, tokenizer, prompts: list[Prompt], max_new_tokens: int,
                     batch_size: int, prefix: str = "eval/heldout", d: Dist = ALONE,
                     stop_tokens: tuple[str, ...] = (), samples: int = 1, temperature: float = 0.0,
                     seed: int = 0) -> dict[str, float]:
    """Accuracy, no-answer rate, truncation rate and mean response length (tokens) over every
    answer; responses end at the EOS ids and at `stop_tokens` (rollout.stop_tokens), as in
    training. Greedy by default; with `temperature` > 0, `samples` answers per problem drawn
    with noise seeded by `seed` (the accuracy is then avg@samples)."""
    from opdcli.engines.types import RowShard

    prompts = [p for p in prompts for _ in range(samples if temperature > 0 else 1)]
    texts = [render(tokenizer, p) for p in prompts]
    params = SamplingParams(n=1, temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            stop_tokens=stop_tokens)
    start, stop = d.shard(len(prompts))
    counts = {"accuracy": 0.0, "no_answer_rate": 0.0, "truncated_rate": 0.0, "response_len": 0.0}
    if stop > start:
        shard = RowShard(start, stop, len(prompts), reduce_max=None)
        generator = None
        if temperature > 0:
            device = next(model.parameters()).device
            generator = torch.Generator(device=device).manual_seed(seed)
        batch = HFSampler(model, tokenizer, generator=generator).sample(texts, params, shard=shard)
        responses = decode_responses(tokenizer, batch)
        mine = prompts[start:stop]
        counts = {
            "accuracy": float(sum(grade(r, p.answer or "") for r, p in zip(responses, mine, strict=True))),
            "no_answer_rate": float(sum(last_boxed(strip_thinking(r)) is None for r in responses)),
            "truncated_rate": float((~batch.finished_B).sum()),
            "response_len": float(batch.response_mask_B_T.sum()),
        }
    n = max(1, len(prompts))
    return {f"{prefix}/{k}": v / n for k, v in d.sums(counts).items()}
