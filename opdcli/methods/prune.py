"""Prune-OPD: drift-aware reliability weights and a dynamic response budget (arXiv 2605.07804).

Each response token gets a drift event when the student and teacher disagree locally:

* `overlap_ratio` (default): o_t = |S_t intersect T_t| / K over the two top-K id sets; the
  event is o_t < theta.
* `teacher_top_p_accept`: the sampled token is outside the teacher's top-p nucleus (the
  shortest prefix of the teacher's sorted top-K whose probability reaches theta; all K when
  the top-K never reaches it).

Events accumulate (N_t, inclusive cumulative sum) and decay the reliability of every later
token, w_t = clip(1 - w_drop * N_t, 0, 1) * m_t, so the loss weight
omega_t = (w_t + w_base) * m_t falls monotonically from 1 + w_base to the floor w_base. The
effective length L_eff (tokens with w_t > positive_eps) drives a batch-level generation budget:
grow by `step` when at least `hit_ratio` of the samples stay reliable up to `margin` tokens
before the budget, shrink by `step` after `patience` consecutive misses (methods.md §2.2).
Defaults are the released scripts' values (methods.md §2.3).

Departures from the authors' code:

* The authors scale the 3-D top-K advantage R_{t,k} of the top-K objective by omega_t. Here
  omega_t is a per-token loss weight that multiplies whichever base objective is configured
  (for the sampled and topk policy-gradient objectives this is the same as scaling the
  advantage; for the analytic objectives it weights each token's divergence).
* The budget starts lazily: on the first `max_new_tokens(default, step)` call. max_len
  defaults to the rollout's `max_new_tokens`; unset init_len, min_len, step and margin take the
  released scripts' proportions of it (init 2048, min 1024, step and margin 100 of a 12288
  cap): init_len = ceil(max_len / 6), min_len = ceil(max_len / 12), step = margin =
  max(1, round(max_len / 123)). So the budget starts well below its ceiling and can grow when
  the pair stays compatible, as in the paper (the function defaults of the authors' code start
  at the cap, where the budget can only shrink). min_len is lowered to max_len when it exceeds
  it. If `apply` runs before any budget call, the response width T of the batch stands in for
  the rollout's `max_new_tokens`.
* With `budget: false` the rollout keeps its static `max_new_tokens`; the weights and L_eff
  are still computed and logged.
* Online truncation (`online: true`, `opdcli.methods.prune_online`) is the offline objective
  only when w_base = 0: with a floor, offline Prune-OPD still trains every token after the
  reliability reaches 0 at weight w_base, and those tokens cannot be kept without generating
  (and scoring) them, which is the cost online mode exists to save. The tokens it does generate
  after that point (at most online_chunk - 1 per row) keep the floor weight, as offline; each
  token is scored by the teacher once (the follower's hidden states). Building it with w_base > 0
  warns.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

from opdcli.engines.types import ScoredBatch
from opdcli.errors import ConfigError
from opdcli.methods.base import Method, MethodOutput, register, require_topk
from opdcli.methods.drift import (
    effective_length,
    overlap_ratio,
    reliability_weights,
    top_p_accept_events,
)
from opdcli.methods.prune_online import DriftStopRule
from opdcli.signals import masked_mean


@dataclass(frozen=True)
class PruneConfig:
    metric: Literal["overlap_ratio", "teacher_top_p_accept"] = "overlap_ratio"
    """Drift test: student/teacher top-K overlap below theta, or the sampled token outside
    the teacher's top-p (p = theta) nucleus."""
    k: int = 16
    """Top-K size of the drift test (at most scoring.top_k)."""
    theta: float = 0.7
    """Overlap threshold (overlap_ratio) or nucleus mass (teacher_top_p_accept)."""
    w_drop: float = 0.01
    """Reliability lost per drift event (weights reach 0 after 1 / w_drop events)."""
    w_base: float = 0.5
    """Floor added to the reliability: loss weights lie in [w_base, 1 + w_base]."""
    budget: bool = True
    """Adapt the next step's generation budget to the effective reliable length."""
    init_len: int | None = None
    """Initial budget (None: ceil(max_len / 6), the scripts' 2048 of 12288)."""
    min_len: int | None = None
    """Smallest budget (None: ceil(max_len / 12), the scripts' 1024 of 12288)."""
    max_len: int | None = None
    """Largest budget (None: the rollout's max_new_tokens)."""
    step: int | None = None
    """Tokens added or removed per budget change (None: max(1, round(max_len / 123)), the
    scripts' 100 of 12288)."""
    margin: int | None = None
    """A sample hits when L_eff >= max(min_len, budget - margin) (None: as step)."""
    hit_ratio: float = 0.1
    """Fraction of hitting samples that grows the budget."""
    patience: int = 3
    """Consecutive missing steps before the budget shrinks."""
    positive_eps: float = 1e-8
    """A token counts towards L_eff while its reliability exceeds this."""
    online: bool = False
    """Online truncation: stop sampling a sequence once its reliability reaches 0 (the teacher
    scores during generation, in chunks of online_chunk tokens), with either drift metric."""
    online_chunk: int = 16
    """Tokens per teacher scoring chunk during online truncation (the stop lag)."""


class PruneBudget:
    """Batch-level generation budget L with a miss counter c (methods.md §2.2)."""

    def __init__(self, length: int, min_len: int, max_len: int, step: int, margin: int,
                 hit_ratio: float, patience: int) -> None:
        self.min_len, self.max_len = min_len, max_len
        self.step, self.margin, self.hit_ratio, self.patience = step, margin, hit_ratio, patience
        self.length = max(min_len, min(length, max_len))
        self.misses = 0

    def update(self, l_eff_B: torch.Tensor) -> dict[str, float]:
        """Apply the hit/patience rule to one step's effective lengths; returns its diagnostics."""
        current = self.length
        boundary = max(self.min_len, self.length - self.margin)
        hit = float((l_eff_B >= boundary).float().mean()) if l_eff_B.numel() else 0.0
        if hit >= self.hit_ratio:
            self.length = min(self.length + self.step, self.max_len)
            self.misses = 0
        else:
            self.misses += 1
            if self.misses >= self.patience:
                self.length = max(self.length - self.step, self.min_len)
                self.misses = 0
        return {"budget": float(current), "next_budget": float(self.length), "hit_ratio": hit,
                "no_hit_steps": float(self.misses)}

    def state_dict(self) -> dict[str, int]:
        return {"length": self.length, "misses": self.misses, "min_len": self.min_len,
                "max_len": self.max_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.min_len, self.max_len = int(state["min_len"]), int(state["max_len"])
        self.length, self.misses = int(state["length"]), int(state["misses"])


def budget_window(cfg: PruneConfig, default: int) -> dict[str, int]:
    """The budget's init_len, min_len, max_len, step and margin, unset ones scaled to max_len
    (the rollout's max_new_tokens `default` when unset) as in the released scripts."""
    hi = cfg.max_len if cfg.max_len is not None else default
    lo = min(cfg.min_len if cfg.min_len is not None else math.ceil(hi / 12), hi)
    init = cfg.init_len if cfg.init_len is not None else max(lo, math.ceil(hi / 6))
    step = cfg.step if cfg.step is not None else max(1, round(hi / 123))
    margin = cfg.margin if cfg.margin is not None else step
    return {"init_len": init, "min_len": lo, "max_len": hi, "step": step, "margin": margin}


def _check_config(cfg: PruneConfig) -> None:
    problems = [
        (cfg.k < 1, f"k is {cfg.k}; it must be at least 1"),
        (not 0.0 <= cfg.theta <= 1.0, f"theta is {cfg.theta}; it must lie in [0, 1]"),
        (cfg.w_drop < 0, f"w_drop is {cfg.w_drop}; it must be >= 0"),
        (cfg.w_base < 0, f"w_base is {cfg.w_base}; it must be >= 0 (weights are never negative)"),
        (cfg.min_len is not None and cfg.min_len < 1, f"min_len is {cfg.min_len}; it must be at least 1"),
        (cfg.max_len is not None and cfg.max_len < 1, f"max_len is {cfg.max_len}; it must be at least 1"),
        (cfg.max_len is not None and cfg.min_len is not None and cfg.max_len < cfg.min_len,
         f"max_len is {cfg.max_len}; it must be >= min_len ({cfg.min_len})"),
        (cfg.init_len is not None and cfg.init_len < 1, f"init_len is {cfg.init_len}; it must be at least 1"),
        (cfg.step is not None and cfg.step < 1, f"step is {cfg.step}; it must be at least 1"),
        (cfg.margin is not None and cfg.margin < 0, f"margin is {cfg.margin}; it must be >= 0"),
        (not 0.0 <= cfg.hit_ratio <= 1.0, f"hit_ratio is {cfg.hit_ratio}; it must lie in [0, 1]"),
        (cfg.patience < 1, f"patience is {cfg.patience}; it must be at least 1"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(f"method.options.{message}")


@register
class PruneOPD(Method):
    name = "prune"
    summary = "Prune-OPD: drift events decay later token weights; reliable length sets the budget"
    Config = PruneConfig

    def __init__(self, cfg: PruneConfig, loss) -> None:
        super().__init__(cfg, loss)
        _check_config(cfg)
        if cfg.online and cfg.w_drop <= 0:
            raise ConfigError("method.options.online cannot take effect with w_drop 0: reliability never "
                              "reaches 0; raise w_drop or set online: false")
        if cfg.online_chunk < 1:
            raise ConfigError(f"method.options.online_chunk is {cfg.online_chunk}; it must be at least 1")
        if cfg.online and cfg.w_base > 0:
            warnings.warn(
                f"method.options.online stops a row once its reliability reaches 0, so the tokens that "
                f"offline Prune-OPD would still train at the floor weight w_base={cfg.w_base} are never "
                "generated: a different objective (a saving in sampling, not only in scoring). Set "
                "method.options.w_base=0 for the offline objective on the tokens that are generated",
                stacklevel=2)
        self._budget: PruneBudget | None = None

    def stop_rule(self) -> DriftStopRule | None:
        """Online truncation of rollouts (None unless online is set)."""
        if not self.cfg.online:
            return None
        c = self.cfg
        return DriftStopRule(k=c.k, theta=c.theta, w_drop=c.w_drop, chunk=c.online_chunk, metric=c.metric)

    def _ensure_budget(self, default: int) -> PruneBudget:
        if self._budget is None:
            c = self.cfg
            w = budget_window(c, default)
            self._budget = PruneBudget(w["init_len"], w["min_len"], w["max_len"], w["step"], w["margin"],
                                       c.hit_ratio, c.patience)
        return self._budget

    def max_new_tokens(self, default: int, step: int) -> int:
        """The budget set by the previous step's update (the rollout default when disabled)."""
        del step
        if not self.cfg.budget:
            return default
        return self._ensure_budget(default).length

    def _events(self, scored: ScoredBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift events (bool) and the overlap ratio, both (B, T)."""
        k = self.cfg.k
        stored = min(scored.student_topk_ids_B_T_K.shape[-1], scored.teacher_topk_ids_B_T_K.shape[-1])
        require_topk(k, stored)
        overlap_B_T = overlap_ratio(scored.student_topk_ids_B_T_K[..., :k],
                                    scored.teacher_topk_ids_B_T_K[..., :k])
        if self.cfg.metric == "overlap_ratio":
            events_B_T = overlap_B_T < self.cfg.theta
        else:
            events_B_T = top_p_accept_events(scored.response_ids_B_T, scored.teacher_topk_ids_B_T_K[..., :k],
                                             scored.teacher_topk_lp_B_T_K[..., :k], self.cfg.theta)
        return events_B_T & (scored.mask_B_T > 0), overlap_B_T

    def apply(self, scored: ScoredBatch, advantages_B_T: torch.Tensor, step: int) -> MethodOutput:
        c, m_B_T = self.cfg, scored.mask_B_T
        events_B_T, overlap_B_T = self._events(scored)
        w_B_T = reliability_weights(events_B_T, m_B_T, c.w_drop)
        omega_B_T = ((w_B_T + c.w_base) * (m_B_T > 0)).detach()
        l_eff_B = effective_length(w_B_T, m_B_T, c.positive_eps)
        has_rows = l_eff_B.numel() > 0
        p = f"method/{self.name}/"
        metrics = {
            p + "overlap_mean": float(masked_mean(overlap_B_T, m_B_T)),
            p + "drift_rate": float(masked_mean(events_B_T.float(), m_B_T)),
            p + "weight_mean": float(masked_mean(omega_B_T, m_B_T)),
            p + "eff_len_mean": float(l_eff_B.float().mean()) if has_rows else 0.0,
            p + "eff_len_min": float(l_eff_B.min()) if has_rows else 0.0,
            p + "eff_len_max": float(l_eff_B.max()) if has_rows else 0.0,
        }
        if c.budget:
            budget = self._ensure_budget(int(m_B_T.shape[-1]))
            metrics |= {p + key: value for key, value in budget.update(l_eff_B).items()}
        return MethodOutput(
            weights_B_T=omega_B_T, metrics=metrics,
            token_outputs={"overlap": overlap_B_T * (m_B_T > 0), "drift": events_B_T.float(),
                           "reliability": w_B_T},
            trajectory_outputs={"eff_len": [int(x) for x in l_eff_B.tolist()]},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"budget": self._budget.state_dict()} if self._budget is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("budget"):
            return
        c, saved = self.cfg, state["budget"]
        w = budget_window(c, int(saved["max_len"]))
        self._budget = PruneBudget(int(saved["length"]), int(saved["min_len"]), int(saved["max_len"]),
                                   w["step"], w["margin"], c.hit_ratio, c.patience)
        self._budget.load_state_dict(saved)
