"""Plain on-policy distillation: every response token weighs 1; the base objective decides.

With loss.objective=sampled this is the Thinking Machines / verl recipe (advantage
c * (log q - log p) per sampled token); with rkl it is the exact token-level reverse KL
(GKD with lambda = 1, beta = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opdcli.engines.types import ScoredBatch
from opdcli.methods.base import Method, MethodOutput, register


@dataclass(frozen=True)
class OpdConfig:
    """Plain OPD has no options."""


@register
class PlainOPD(Method):
    name = "opd"
    summary = "on-policy distillation: uniform token weights, any base objective"
    Config = OpdConfig
    reads_student_scores = False

    def apply(self, scored: ScoredBatch, advantages_B_T: torch.Tensor, step: int) -> MethodOutput:
        return MethodOutput(weights_B_T=scored.mask_B_T.clone())
