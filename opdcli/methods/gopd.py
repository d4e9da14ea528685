"""G-OPD / ExOPD: generalized on-policy distillation with reward extrapolation (arXiv 2602.12125).

The per-token advantage becomes

    A_t = lambda * (log q(y_t) - log pi_ref(y_t)) - (log p(y_t) - log pi_ref(y_t))
        = lambda * log q + (1 - lambda) * log pi_ref - log p              (all detached)

whose optimum is p* proportional to pi_ref^(1-lambda) q^lambda. lambda = 1 is plain OPD and
does not depend on pi_ref (the reference is then not even loaded); lambda > 1 extrapolates
past the teacher (ExOPD). The reference is the student's initial checkpoint by default, or any
model path, e.g. the teacher's pre-RL base ("reward correction"), which must share the
student's tokenizer.

Departures: the paper's code applies a PPO clip and truncated IS between vLLM and the
trainer; here the surrogate is `loss.surrogate` (is / ppo / pg) of the sampled objective, and
the advantage is not discounted unless `loss.discount` is set. The `kl_coef` of the sampled
objective is not applied (lambda is the reward scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opdcli.engines.types import ScoredBatch
from opdcli.errors import ConfigError
from opdcli.methods.base import Method, MethodOutput, register
from opdcli.signals import discounted_future_sum, masked_mean


@dataclass(frozen=True)
class GopdConfig:
    lam: float = 1.25
    """Reward scale lambda: 1 is plain OPD, > 1 extrapolates (ExOPD), in (0, 1) interpolates."""
    reference: str = "student_init"
    """student_init (the student's starting checkpoint) or a model path / hub id."""


def gopd_advantage(teacher_lp_B_T: torch.Tensor, student_lp_B_T: torch.Tensor,
                   ref_lp_B_T: torch.Tensor | None, mask_B_T: torch.Tensor, lam: float) -> torch.Tensor:
    """A_t = lam * log q + (1 - lam) * log pi_ref - log p on valid tokens (0 elsewhere)."""
    if lam == 1.0:
        adv = teacher_lp_B_T - student_lp_B_T
    else:
        assert ref_lp_B_T is not None, "lambda != 1 needs reference log-probs"
        adv = lam * teacher_lp_B_T + (1.0 - lam) * ref_lp_B_T - student_lp_B_T
    return torch.where(mask_B_T > 0, adv, torch.zeros_like(adv))


@register
class GOPD(Method):
    name = "gopd"
    summary = "G-OPD: reward scale lambda and a reference model (lambda > 1 extrapolates)"
    Config = GopdConfig
    objectives = frozenset({"sampled"})
    default_objective = "sampled"

    def __init__(self, cfg: GopdConfig, loss) -> None:
        super().__init__(cfg, loss)
        if cfg.lam <= 0:
            raise ConfigError(f"method.options.lam is {cfg.lam}; lambda must be > 0 (1 = plain OPD)")

    def reference_model(self, student: str) -> str | None:
        """The model to score pi_ref with, or None when lambda == 1 makes it irrelevant."""
        if self.cfg.lam == 1.0:
            return None
        return student if self.cfg.reference == "student_init" else self.cfg.reference

    def apply(self, scored: ScoredBatch, advantages_B_T: torch.Tensor, step: int) -> MethodOutput:
        m = scored.mask_B_T
        adv = gopd_advantage(scored.teacher_lp_B_T, scored.student_lp_B_T, scored.ref_lp_B_T, m, self.cfg.lam)
        adv = discounted_future_sum(adv, m, self.loss.discount)
        metrics = {f"method/{self.name}/advantage_mean": float(masked_mean(adv, m)),
                   f"method/{self.name}/kl_to_teacher": float(masked_mean(scored.student_lp_B_T - scored.teacher_lp_B_T, m))}
        if scored.ref_lp_B_T is not None:
            metrics[f"method/{self.name}/reward_mean"] = float(masked_mean(scored.teacher_lp_B_T - scored.ref_lp_B_T, m))
            metrics[f"method/{self.name}/kl_to_ref"] = float(masked_mean(scored.student_lp_B_T - scored.ref_lp_B_T, m))
        return MethodOutput(weights_B_T=m.clone(), advantages_B_T=adv, metrics=metrics,
                            token_outputs={"advantage": adv})


@register
class ExOPD(GOPD):
    name = "exopd"
    summary = "ExOPD preset of G-OPD: lambda = 1.25, reference = the student's initial checkpoint"

    def __init__(self, cfg: GopdConfig, loss) -> None:
        super().__init__(cfg, loss)
        if cfg.lam <= 1.0:
            raise ConfigError(f"exopd extrapolates: method.options.lam must be > 1, got {cfg.lam}; "
                              "use method gopd for lambda <= 1")
