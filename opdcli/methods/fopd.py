"""f-OPD: freshness-aware weights for asynchronous on-policy distillation (arXiv 2605.17862).

Each buffered sample gets a freshness f_i = exp(-D_roll_i / tau_r - eta * lag_i), D_roll_i being
the k3 estimate of KL(p_beh || p_theta) between the weights that sampled it and the learner's
current student (the scorer scores the student at learner time, so the supervision is always
recomputed and the supervision drift is 0). Samples with f_i < f_min are dropped; the kept ones
weigh f_i / mean(f), and every token is further weighted by the truncated importance ratio
min(p_theta / p_beh, is_cap) (methods.md §4.2; math in opdcli.freshness). Lags above
`asynchronous.max_lag` are dropped by the loop before scoring.

Departures from the §4.2 design, for now: no adaptive drift penalty (it is a loss term, not a
weight) and no worker-side teacher scoring (so no stored advantage to compare against).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opdcli.engines.types import ScoredBatch
from opdcli.errors import ConfigError
from opdcli.freshness import freshness, keep_and_weights, rollout_drift, truncated_ratio
from opdcli.methods.base import Method, MethodOutput, register
from opdcli.signals import masked_mean


@dataclass(frozen=True)
class FopdConfig:
    tau_r: float = 0.05
    """Rollout-drift temperature (nats per token); 0 switches the drift term off."""
    eta: float = 0.0
    """Freshness lost per version of lag (0: lag acts only through asynchronous.max_lag)."""
    f_min: float = 0.05
    """Samples fresher than this are kept; the others are dropped (counted)."""
    reweight: bool = True
    """Weigh kept samples by f_i / mean(f); false gives them weight 1."""
    is_cap: float | None = 2.0
    """Cap C of the token-level truncated importance ratio min(p_theta / p_beh, C); null: none."""


@register
class FreshnessOPD(Method):
    name = "fopd"
    summary = "f-OPD: freshness-weighted samples, stale drops and truncated IS for asynchronous OPD"
    Config = FopdConfig

    def __init__(self, cfg: FopdConfig, loss) -> None:
        super().__init__(cfg, loss)
        if cfg.tau_r < 0 or cfg.eta < 0 or not 0 <= cfg.f_min < 1:
            raise ConfigError("method.options.tau_r and eta must be >= 0 and f_min in [0, 1)")
        if cfg.is_cap is not None and cfg.is_cap < 1:
            raise ConfigError(f"method.options.is_cap is {cfg.is_cap}; it must be >= 1 (or null)")
        if cfg.is_cap is not None and loss.objective == "sampled" and loss.surrogate != "pg":
            raise ConfigError("method.options.is_cap would correct the importance ratio twice with "
                              f"loss.surrogate={loss.surrogate}; set loss.surrogate=pg or is_cap: null")

    def apply(self, scored: ScoredBatch, advantages_B_T: torch.Tensor, step: int) -> MethodOutput:
        c, m = self.cfg, scored.mask_B_T
        lag_B = (step - scored.version_B.to(m.device)).clamp(min=0).float()
        d_roll_B = rollout_drift(scored.student_lp_B_T, scored.behavior_lp_B_T, m)
        f_B = freshness(d_roll_B, torch.zeros_like(d_roll_B), lag_B, tau_r=c.tau_r, tau_s=0.0, eta=c.eta)
        keep_B, u_B = keep_and_weights(f_B, lag_B, f_min=c.f_min, max_lag=None, reweight=c.reweight)
        w_B_T = u_B[:, None] * (m > 0)
        p = f"method/{self.name}/"
        metrics = {p + "freshness_mean": float(f_B.mean()),
                   p + "freshness_p10": float(f_B.quantile(0.1)), p + "freshness_p90": float(f_B.quantile(0.9)),
                   p + "dropped_frac": float((~keep_B).float().mean()), p + "d_roll_mean": float(d_roll_B.mean()),
                   p + "d_sup_mean": 0.0}
        if c.is_cap is not None:
            rho_B_T, frac = truncated_ratio(scored.student_lp_B_T, scored.behavior_lp_B_T, c.is_cap, m)
            w_B_T = w_B_T * rho_B_T
            raw = (scored.student_lp_B_T - scored.behavior_lp_B_T).exp()
            metrics |= {p + "is_ratio_mean": float(masked_mean(raw, m)),
                        p + "is_ratio_max": float(raw[m > 0].max()) if bool((m > 0).any()) else 0.0,
                        p + "is_clipfrac": frac}
        return MethodOutput(weights_B_T=w_B_T.detach(), metrics=metrics,
                            token_outputs={"is_weight": w_B_T.detach()},
                            trajectory_outputs={"freshness": [float(x) for x in f_B.tolist()],
                                                "kept": [bool(x) for x in keep_B.tolist()]})
