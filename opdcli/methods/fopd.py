"""f-OPD: freshness-aware control for asynchronous on-policy distillation (arXiv 2605.17862).

Each buffered sample gets a freshness

    f_i = exp(-D_roll_i / tau_r - D_sup_i / tau_s - eta * lag_i)

D_roll_i is the k3 estimate of KL(p_beh || p_theta) between the weights that sampled it and
the learner's current student. D_sup_i = mean_t |A_stored - A_fresh| compares the advantage the
rollout worker's own teacher scoring implies (log q - log p_beh; asynchronous.worker_scoring)
with the one recomputed at learner time (log q - log p_theta); without worker scoring it is 0.
Samples with f_i < f_min are dropped; the kept ones weigh f_i / mean(f); tokens are weighted
by a truncated importance ratio (`importance`, below); and a drift penalty beta * k3 is added
to the objective, beta doubling / halving (up to `beta_max`) while the batch's mean D_roll (over
every sample, dropped ones included) is above / below `drift_target` (methods.md §4.2; math in
opdcli.freshness). A step whose samples are all dropped trains nothing and takes no optimizer
step (stages.learn). Lags above `asynchronous.max_lag` are dropped by the loop before scoring.

`importance` says what the ratio corrects:
- token: min(p_theta(y_t) / p_beh(y_t), is_cap), the sampled action of a sampled-token loss
  (loss.objective=sampled with surrogate pg; the is / ppo surrogates already carry that ratio);
- prefix: min(prod_{t'<t} p_theta / p_beh, is_cap), the state s_t, valid for every objective
  (for sampled + pg the ratio of y_t is included);
- auto (default): token for sampled + pg, none otherwise. A distribution-level loss (rkl, fkl,
  jsd, topk) sums over the vocabulary at s_t, so the ratio of the one sampled token y_t is no
  correction of it: weighing it by that ratio removes the loss where the student has moved
  away from y_t and lets the drift feed on itself.

Every piece switches off on its own: tau_r / tau_s 0, f_min 0, reweight false, importance none,
drift_target null, supervision stored (train on the stale signal, as a loop without
recomputation would).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from opdcli.engines.types import ScoredBatch
from opdcli.errors import ConfigError
from opdcli.freshness import (
    AdaptiveDriftPenalty,
    freshness,
    keep_and_weights,
    prefix_ratio,
    rollout_drift,
    supervision_drift,
    truncated_ratio,
)
from opdcli.methods.base import Method, MethodOutput, register
from opdcli.signals import masked_mean, sampled_advantage


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
    importance: Literal["auto", "token", "prefix", "none"] = "auto"
    """What the truncated importance ratio corrects: token, prefix, auto or none (module doc)."""
    is_cap: float = 2.0
    """Cap C of the truncated importance ratio min(ratio, C)."""
    tau_s: float = 0.5
    """Supervision-drift temperature; 0 switches the term off (it is 0 without worker scoring)."""
    supervision: Literal["fresh", "stored"] = "fresh"
    """fresh: train on the advantage recomputed at learner time; stored: on the rollout worker's
    (asynchronous.worker_scoring; loss.objective=sampled)."""
    drift_target: float | None = 0.02
    """Target d* of the batch-mean D_roll for the adaptive drift penalty; null: no penalty."""
    beta_init: float = 0.0
    """The drift penalty's starting coefficient."""
    beta_max: float | None = 1.0
    """The drift penalty's ceiling; null: none (beta then doubles for as long as the drift stays high)."""


@register
class FreshnessOPD(Method):
    name = "fopd"
    summary = "f-OPD: freshness-weighted samples, stale drops and truncated IS for asynchronous OPD"
    Config = FopdConfig

    def __init__(self, cfg: FopdConfig, loss) -> None:
        super().__init__(cfg, loss)
        if cfg.tau_r < 0 or cfg.eta < 0 or not 0 <= cfg.f_min < 1:
            raise ConfigError("method.options.tau_r and eta must be >= 0 and f_min in [0, 1)")
        if not cfg.is_cap >= 1:
            raise ConfigError(f"method.options.is_cap is {cfg.is_cap}; it must be a number >= 1 "
                              "(method.options.importance=none switches the ratio off)")
        self.importance = _importance(cfg.importance, loss)
        if cfg.tau_s < 0 or cfg.beta_init < 0 or (cfg.drift_target is not None and cfg.drift_target <= 0):
            raise ConfigError("method.options.tau_s and beta_init must be >= 0 and drift_target > 0 (or null)")
        if cfg.beta_max is not None and not cfg.beta_max >= max(cfg.beta_init, 1e-3):
            raise ConfigError(f"method.options.beta_max is {cfg.beta_max}; it must be >= beta_init and "
                              ">= 1e-3 (the penalty's floor), or null")
        if cfg.supervision not in ("fresh", "stored"):
            raise ConfigError(f"method.options.supervision is {cfg.supervision!r}; use fresh or stored")
        if cfg.supervision == "stored" and loss.objective != "sampled":
            raise ConfigError("method.options.supervision=stored replaces the sampled-token advantage; "
                              f"loss.objective={loss.objective} has none: set loss.objective=sampled")
        self.penalty = None if cfg.drift_target is None else AdaptiveDriftPenalty(
            cfg.drift_target, cfg.beta_init, beta_max=cfg.beta_max)

    def apply(self, scored: ScoredBatch, advantages_B_T: torch.Tensor, step: int) -> MethodOutput:
        c, m = self.cfg, scored.mask_B_T
        lag_B = (step - scored.version_B.to(m.device)).clamp(min=0).float()
        d_roll_B = rollout_drift(scored.student_lp_B_T, scored.behavior_lp_B_T, m)
        stored_B_T = None
        if scored.stored_teacher_lp_B_T is not None:  # the worker's teacher, against the sampler's log-probs
            stored_B_T = sampled_advantage(scored.stored_teacher_lp_B_T.to(m.device), scored.behavior_lp_B_T, m,
                                           self.loss.kl_coef, self.loss.discount)
        elif c.supervision == "stored":
            raise ConfigError("method.options.supervision=stored needs rows scored by the rollout workers; "
                              "set asynchronous.worker_scoring=true")
        d_sup_B = supervision_drift(stored_B_T, advantages_B_T, m)
        f_B = freshness(d_roll_B, d_sup_B, lag_B, tau_r=c.tau_r, tau_s=c.tau_s, eta=c.eta)
        keep_B, u_B = keep_and_weights(f_B, lag_B, f_min=c.f_min, max_lag=None, reweight=c.reweight)
        w_B_T = u_B[:, None] * (m > 0)
        p = f"method/{self.name}/"
        metrics = {p + "freshness_mean": float(f_B.mean()),
                   p + "freshness_p10": float(f_B.quantile(0.1)), p + "freshness_p90": float(f_B.quantile(0.9)),
                   p + "dropped_frac": float((~keep_B).float().mean()), p + "d_roll_mean": float(d_roll_B.mean()),
                   p + "d_sup_mean": float(d_sup_B.mean())}
        if self.importance != "none":
            if self.importance == "token":
                rho_B_T, frac = truncated_ratio(scored.student_lp_B_T, scored.behavior_lp_B_T, c.is_cap, m)
            else:
                rho_B_T, frac = prefix_ratio(scored.student_lp_B_T, scored.behavior_lp_B_T, c.is_cap, m,
                                             include_current=self.loss.objective == "sampled" and self.loss.surrogate == "pg")
            w_B_T = w_B_T * rho_B_T
            raw = (scored.student_lp_B_T - scored.behavior_lp_B_T).exp()
            metrics |= {p + "is_ratio_mean": float(masked_mean(raw, m)),
                        p + "is_ratio_max": float(raw[m > 0].max()) if bool((m > 0).any()) else 0.0,
                        p + "is_weight_mean": float(masked_mean(rho_B_T, m)), p + "is_clipfrac": frac}
        beta = 0.0
        if self.penalty is not None:  # this batch trains with the current beta, then beta adapts
            # to the drift of every sample of the batch: the drop removes the most drifted ones,
            # so the kept samples' drift understates it (and with none kept read 0 and relaxed beta)
            beta = self.penalty.beta
            metrics |= {p + "drift_beta": beta, p + "drift_beta_next": self.penalty.update(float(d_roll_B.mean()))}
        return MethodOutput(weights_B_T=w_B_T.detach(), metrics=metrics,
                            advantages_B_T=stored_B_T if c.supervision == "stored" else None,
                            token_outputs={"is_weight": w_B_T.detach()},
                            trajectory_outputs={"freshness": [float(x) for x in f_B.tolist()],
                                                "kept": [bool(x) for x in keep_B.tolist()],
                                                "d_roll": [float(x) for x in d_roll_B.tolist()],
                                                "d_sup": [float(x) for x in d_sup_B.tolist()]},
                            drift_penalty=beta)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.penalty is None else {"drift_penalty": self.penalty.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.penalty is not None and "drift_penalty" in state:
            self.penalty.load_state_dict(state["drift_penalty"])


def _importance(choice: str, loss) -> str:
    """The importance correction that `choice` resolves to for this objective (module doc)."""
    sampled_pg = loss.objective == "sampled" and loss.surrogate == "pg"
    if choice == "auto":
        return "token" if sampled_pg else "none"
    if choice == "token" and not sampled_pg:
        if loss.objective == "sampled":
            raise ConfigError(f"method.options.importance=token would correct the sampled token twice: "
                              f"loss.surrogate={loss.surrogate} already carries its ratio; set "
                              "loss.surrogate=pg, or importance=prefix for the state's ratio")
        raise ConfigError(f"method.options.importance=token corrects a sampled token, and "
                          f"loss.objective={loss.objective} sums over the vocabulary at each state: use "
                          "importance=prefix (the state's ratio) or none")
    if choice not in ("token", "prefix", "none"):
        raise ConfigError(f"method.options.importance is {choice!r}; use auto, token, prefix or none")
    return choice
