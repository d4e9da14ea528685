"""Prune-OPD online truncation: stop a sequence as soon as its reliability reaches zero.

The paper (arXiv 2605.07804) prunes with a batch-level budget: every sample is generated to
the budget, scored, and only down-weighted afterwards. This mode goes further: while the
student samples, the engine runs the teacher along with its own KV cache and hands this rule
the teacher's logits in chunks of `chunk` positions; each row counts its drift events
(student/teacher top-K overlap below theta, or with metric teacher_top_p_accept the sampled
token outside the teacher's theta-nucleus within its top-K) and stops once
w_t = clip(1 - w_drop * N_t, 0, 1) hits 0, i.e. after ceil(1 / w_drop) events. Tokens after that
point would only ever get the floor weight w_base, so they are neither generated nor scored.
The stop decision lags by at most `chunk - 1` tokens (the price of scoring in chunks).

The rule is pure arithmetic on the logits it is given (`engines.types.StopRule`); the engine
owns the teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opdcli.methods.drift import top_p_accept_events
from opdcli.signals import topk_overlap


class DriftStopState:
    """Drift-event counts of one generation block (see engines.types.StopState)."""

    def __init__(self, rule: DriftStopRule, rows: int, device: torch.device) -> None:
        self.rule = rule
        self.limit = math.ceil(1.0 / rule.w_drop - 1e-9)
        self.events_B = torch.zeros(rows, dtype=torch.long, device=device)
        self.stopped_B = torch.zeros(rows, dtype=torch.bool, device=device)

    def update(self, tok_B_C: torch.Tensor, student_topk_ids_B_C_K: torch.Tensor | None,
               teacher_logits_B_C_V: torch.Tensor, valid_B_C: torch.Tensor) -> torch.Tensor:
        r = self.rule
        if r.metric == "overlap_ratio":
            assert student_topk_ids_B_C_K is not None, "the overlap test needs the student's top-K"
            t_ids_B_C_K = teacher_logits_B_C_V.topk(r.k, dim=-1).indices
            drift_B_C = topk_overlap(student_topk_ids_B_C_K, t_ids_B_C_K) < r.theta
        else:
            t_lp_B_C_K, t_ids_B_C_K = teacher_logits_B_C_V.float().log_softmax(-1).topk(r.k, dim=-1)
            drift_B_C = top_p_accept_events(tok_B_C, t_ids_B_C_K, t_lp_B_C_K, r.theta)
        self.events_B += (drift_B_C & valid_B_C).sum(1)
        newly = (self.events_B >= self.limit) & ~self.stopped_B
        self.stopped_B |= newly
        return newly


@dataclass(frozen=True)
class DriftStopRule:
    """Stop a row after ceil(1 / w_drop) drift events (w_drop > 0)."""

    k: int
    theta: float
    w_drop: float
    chunk: int
    metric: str = "overlap_ratio"

    def __post_init__(self) -> None:
        assert self.w_drop > 0, "online truncation needs w_drop > 0 (checked at config time)"

    @property
    def student_topk(self) -> int:
        """The top-p test reads only the sampled token; the overlap test the student's top-K."""
        return self.k if self.metric == "overlap_ratio" else 0

    def open(self, rows: int, device: torch.device) -> DriftStopState:
        return DriftStopState(self, rows, device)
