"""Prune-OPD online truncation: stop a sequence as soon as its reliability reaches zero.

The paper (arXiv 2605.07804) prunes with a batch-level budget: every sample is generated to
the budget, scored, and only down-weighted afterwards. This mode goes further: while the
student samples, the teacher follows along with its own KV cache, scoring the new tokens in
chunks of `chunk` positions; each row counts its drift events (student/teacher top-K overlap
below theta, or with metric teacher_top_p_accept the sampled token outside the teacher's
theta-nucleus within its top-K) and stops once w_t = clip(1 - w_drop * N_t, 0, 1) hits 0, i.e. after
ceil(1 / w_drop) events. Tokens after that point would only ever get the floor weight w_base,
so they are neither generated nor scored. The stop decision lags by at most `chunk - 1`
tokens (the price of scoring in chunks).
"""

from __future__ import annotations

import math

import torch

from opdcli.methods.prune import top_p_accept_events
from opdcli.signals import topk_overlap


class OnlineTruncation:
    """A stateful stop function for one generation block (see rollout.hf.StopFn)."""

    def __init__(self, teacher, ids_B_P: torch.Tensor, am_B_P: torch.Tensor, *, k: int, theta: float,
                 w_drop: float, chunk: int, metric: str = "overlap_ratio") -> None:
        self.teacher, self.k, self.theta, self.chunk = teacher, k, theta, max(1, chunk)
        self.metric = metric
        self.limit = math.ceil(1.0 / w_drop - 1e-9) if w_drop > 0 else None
        with torch.no_grad():
            out = teacher(input_ids=ids_B_P, attention_mask=am_B_P,
                          position_ids=(am_B_P.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        self.past, self.next_logits_B_V = out.past_key_values, out.logits[:, -1]
        self.am = am_B_P
        self.events_B = torch.zeros(ids_B_P.shape[0], dtype=torch.long, device=ids_B_P.device)
        self.stopped_B = torch.zeros_like(self.events_B, dtype=torch.bool)
        self.tokens: list[torch.Tensor] = []
        self.valid: list[torch.Tensor] = []
        self.student_topk: list[torch.Tensor] = []
        self.scored_tokens = 0

    def __call__(self, t: int, tok_B: torch.Tensor, valid_B: torch.Tensor, logits_B_V: torch.Tensor) -> torch.Tensor:
        self.tokens.append(tok_B)
        self.valid.append(valid_B)
        if self.metric == "overlap_ratio":  # the top-p test needs only the sampled token
            self.student_topk.append(logits_B_V.topk(self.k, dim=-1).indices)
        if len(self.tokens) < self.chunk or self.limit is None:
            return torch.zeros_like(valid_B)
        return self.flush()

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """Score the pending chunk with the teacher; return the rows to stop now."""
        tok_B_C = torch.stack(self.tokens, 1)
        valid_B_C = torch.stack(self.valid, 1)
        self.tokens, self.valid = [], []
        self.am = torch.cat([self.am, valid_B_C.to(self.am.dtype)], dim=1)
        C = tok_B_C.shape[1]
        pos = (self.am.cumsum(-1) - 1).clamp(min=0)[:, -C:]
        out = self.teacher(input_ids=tok_B_C, attention_mask=self.am, position_ids=pos,
                           past_key_values=self.past, use_cache=True)
        # the teacher distribution of token j comes from the logits before it
        logits_B_C_V = torch.cat([self.next_logits_B_V[:, None], out.logits[:, :-1]], dim=1)
        self.past, self.next_logits_B_V = out.past_key_values, out.logits[:, -1]
        if self.metric == "overlap_ratio":
            s_ids_B_C_K = torch.stack(self.student_topk, 1)
            self.student_topk = []
            t_ids_B_C_K = logits_B_C_V.topk(self.k, dim=-1).indices
            drift_B_C = topk_overlap(s_ids_B_C_K, t_ids_B_C_K) < self.theta
        else:
            t_lp_B_C_K, t_ids_B_C_K = logits_B_C_V.float().log_softmax(-1).topk(self.k, dim=-1)
            drift_B_C = top_p_accept_events(tok_B_C, t_ids_B_C_K, t_lp_B_C_K, self.theta)
        events = drift_B_C & valid_B_C
        self.events_B += events.sum(1)
        self.scored_tokens += int(valid_B_C.sum())
        newly = (self.events_B >= self.limit) & ~self.stopped_B
        self.stopped_B |= newly
        return newly


def online_stop_factory(teacher, *, k: int, theta: float, w_drop: float, chunk: int, stats: list,
                        metric: str = "overlap_ratio"):
    """A StopFactory for rollout.hf.sample; each block's OnlineTruncation is kept in `stats`."""

    def factory(ids_B_P: torch.Tensor, am_B_P: torch.Tensor) -> OnlineTruncation:
        trunc = OnlineTruncation(teacher, ids_B_P, am_B_P, k=k, theta=theta, w_drop=w_drop, chunk=chunk,
                                 metric=metric)
        stats.append(trunc)
        return trunc

    return factory
