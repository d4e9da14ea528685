"""Teacher scoring on vLLM (`scoring.teacher_engine=vllm`): per-token log-probs and top-K of the
teacher through `prompt_logprobs`, the student (and reference) still on transformers.

Each row is sent as one request whose prompt is the row's own prompt + response token ids,
with `SamplingParams(max_tokens=1, prompt_logprobs=K)`: vLLM returns, for every prompt
position, the log-prob of the actual token and the K most likely ones (raw log-probs, the full
vocabulary's normalisation). Position P_b + t of row b carries the teacher's scores of response
token t. What vLLM cannot deliver is refused before any model loads (`check_teacher_engine`):
the teacher's log-probs on the *student's* top-K ids (arbitrary-id log-probs need vLLM's V2
model runner, which has no CPU backend), hence the top-K objective, the release rule and TOPD;
the teacher's logits (rkl / fkl / jsd); and the teacher that follows generation for Prune-OPD's
online stop.
"""

from __future__ import annotations

from typing import Any

import torch

from opdcli.config import FULL_DISTRIBUTION
from opdcli.engines.types import RolloutBatch, ScoredBatch
from opdcli.errors import ConfigError, EngineError

NEEDS_STUDENT_TOPK = frozenset({"release", "topd"})
"""Methods that read the teacher's log-probs on the student's top-K ids."""


def check_teacher_engine(cfg: Any, method: Any) -> None:
    """Refuse, before any model loads, what a vLLM teacher cannot score."""
    if cfg.scoring.teacher_engine != "vllm":
        return
    obj = cfg.loss.objective
    alternative = "; use scoring.teacher_engine=hf"
    if obj in FULL_DISTRIBUTION or obj == "topk":
        what = "logits" if obj in FULL_DISTRIBUTION else "log-probs on the student's top-K ids"
        raise ConfigError(f"loss.objective={obj} needs the teacher's {what}, which vLLM's prompt_logprobs do not "
                          f"give{alternative}, or loss.objective=sampled")
    if method.name in NEEDS_STUDENT_TOPK:
        raise ConfigError(f"method '{method.name}' reads the teacher's log-probs on the student's top-K ids, which "
                          f"vLLM gives only with its V2 model runner{alternative}")
    if method.stop_rule() is not None:
        raise ConfigError(f"method '{method.name}' with online truncation runs the teacher along generation in "
                          f"transformers{alternative}, or method.options.online=false")
    if cfg.vllm.teacher_url is None and cfg.scoring.top_k > cfg.vllm.max_logprobs:  # a server has its own
        raise ConfigError(f"scoring.top_k ({cfg.scoring.top_k}) exceeds vllm.max_logprobs ({cfg.vllm.max_logprobs}); "
                          "raise vllm.max_logprobs or lower scoring.top_k")


def parse_prompt_logprobs(entries: list, ids: list[int], start: int, length: int, k: int
                          ) -> tuple[list[float], list[list[int]], list[list[float]]]:
    """(log-prob of the actual token, top-K ids, top-K log-probs) for positions start..start+length.

    `entries[j]` maps token id -> (logprob, rank) (rank 1 = most likely), for the token at
    position j given the tokens before it. The actual token is always present; it counts among
    the top-K only when its rank is within K.
    """
    lp, top_ids, top_lp = [], [], []
    for j in range(start, start + length):
        d = entries[j]
        lp.append(float(d[ids[j]][0]))
        ranked = sorted(((r, tid, float(x)) for tid, (x, r) in d.items() if r is not None and r <= k))
        top_ids.append([tid for _, tid, _ in ranked[:k]])
        top_lp.append([x for _, _, x in ranked[:k]])
    return lp, top_ids, top_lp


class InProcessTeacher:
    """`prompt_logprobs` from an in-process vLLM engine (`llm`), in TeacherEndpoint's form."""

    def __init__(self, llm: Any, sampling_params_cls: Any) -> None:
        self.llm, self.sampling_params_cls = llm, sampling_params_cls

    def prompt_logprobs(self, prompts: list[list[int]], k: int) -> list[list]:
        if not prompts:
            return []
        sp = self.sampling_params_cls(max_tokens=1, prompt_logprobs=k, temperature=1.0, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return [[None if d is None else {t: (v.logprob, v.rank) for t, v in d.items()} for d in o.prompt_logprobs]
                for o in outs]


class VLLMTeacherScorer:
    """Scorer: the student / reference by `hf` (an HFScorer without a teacher), the teacher by
    `source` (an InProcessTeacher or a TeacherEndpoint)."""

    def __init__(self, hf: Any, source: Any, *, k: int, vocab_size: int | None = None) -> None:
        self.hf, self.source, self.k, self.vocab_size = hf, source, k, vocab_size
        self.scored_tokens = 0

    def teacher_logits(self, hidden_B_C_H: torch.Tensor) -> torch.Tensor:
        raise ConfigError("a vLLM teacher gives no logits; full-distribution objectives need scoring.teacher_engine=hf")

    @torch.no_grad()
    def teacher_scores(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(teacher lp B x T, top-K ids B x T x K, top-K lp B x T x K) on the batch's response tokens."""
        B, T, P = batch.batch_size, batch.response_len, batch.prompt_len
        prompts, spans = [], []
        for b in range(B):
            am = batch.attention_mask_B_L[b, :P] > 0
            prompt = batch.input_ids_B_L[b, :P][am].tolist()
            n = int(batch.response_mask_B_T[b].sum())
            prompts.append(prompt + batch.response_ids_B_T[b, :n].tolist())
            spans.append((len(prompt), n))
        outs = self.source.prompt_logprobs(prompts, self.k)
        lp = torch.zeros(B, T)
        ids = torch.zeros(B, T, self.k, dtype=torch.long)
        top = torch.zeros(B, T, self.k)
        for b, (entries, (start, n), row) in enumerate(zip(outs, spans, prompts, strict=True)):
            row_lp, row_ids, row_top = parse_prompt_logprobs(entries, row, start, n, self.k)
            lp[b, :n] = torch.tensor(row_lp)
            for t in range(n):
                ids[b, t, :len(row_ids[t])] = torch.tensor(row_ids[t], dtype=torch.long)
                top[b, t, :len(row_top[t])] = torch.tensor(row_top[t])
            self.scored_tokens += n
        if self.vocab_size is not None and B and int(ids.max()) >= self.vocab_size:
            raise EngineError(f"the vLLM teacher returned token id {int(ids.max())}, beyond the tokenizer's "
                              f"{self.vocab_size} ids (a padded row of its head, or another vocabulary); "
                              "use scoring.teacher_engine=hf, which scores the tokenizer's ids only")
        dev = batch.response_ids_B_T.device
        return lp.to(dev), ids.to(dev), top.to(dev)

    @torch.no_grad()
    def score(self, batch: RolloutBatch, *, keep_teacher_hidden: bool = False) -> ScoredBatch:
        if keep_teacher_hidden:
            raise ConfigError("a vLLM teacher keeps no hidden states; use scoring.teacher_engine=hf")
        s_lp, s_ids, s_top, r_lp = [], [], [], []
        for a in range(0, batch.batch_size, self.hf.batch_size):
            sub = batch.rows(slice(a, a + self.hf.batch_size))
            s, _ = self.hf._stats(self.hf.student, sub, self.k)
            s_lp.append(s.lp_B_T)
            s_ids.append(s.topk_ids_B_T_K)
            s_top.append(s.topk_lp_B_T_K)
            if self.hf.reference is not None:
                r_lp.append(self.hf._stats(self.hf.reference, sub, 1)[0].lp_B_T)
        t_lp, t_ids, t_top = self.teacher_scores(batch)
        return ScoredBatch(
            response_ids_B_T=batch.response_ids_B_T, mask_B_T=batch.response_mask_B_T.float(),
            behavior_lp_B_T=batch.behavior_lp_B_T, student_lp_B_T=torch.cat(s_lp), teacher_lp_B_T=t_lp,
            student_topk_ids_B_T_K=torch.cat(s_ids), student_topk_lp_B_T_K=torch.cat(s_top),
            teacher_topk_ids_B_T_K=t_ids, teacher_topk_lp_B_T_K=t_top, teacher_lp_on_student_topk_B_T_K=None,
            version_B=batch.version_B.clone(), ref_lp_B_T=torch.cat(r_lp) if r_lp else None,
            stored_teacher_lp_B_T=batch.teacher_lp_B_T,
        )

    @torch.no_grad()
    def teacher_token_lp(self, batch: RolloutBatch) -> torch.Tensor:
        return self.teacher_scores(batch)[0]
