"""Prefix-OPD: distil only a prefix of each student response (arXiv 2602.15260).

Sampling stops at the prefix length, so generation, teacher scoring and training all shrink.
The length is fixed, or grows linearly from `length` to `final_length` over `ramp_steps`
(the paper's growing-prefix schedule). Every sampled token is trained on with weight 1; the
base objective is unchanged. It is the matched-length control for Prune-OPD and the release
rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from opdcli.engines.types import ScoredBatch
from opdcli.errors import ConfigError
from opdcli.methods.base import Method, MethodOutput, register


@dataclass(frozen=True)
class PrefixConfig:
    length: int = 16
    """Prefix length in tokens (the generation budget)."""
    schedule: Literal["fixed", "linear"] = "fixed"
    """fixed, or linear growth from length to final_length over ramp_steps."""
    final_length: int | None = None
    """End of the linear schedule (required for schedule: linear)."""
    ramp_steps: int = 100
    """Steps of the linear schedule."""


def prefix_length(cfg: PrefixConfig, step: int) -> int:
    if cfg.schedule == "fixed" or cfg.final_length is None:
        return cfg.length
    frac = min(1.0, step / max(1, cfg.ramp_steps))
    return int(round(cfg.length + frac * (cfg.final_length - cfg.length)))


@register
class PrefixOPD(Method):
    name = "prefix"
    summary = "prefix-OPD: sample and train only the first N tokens (fixed or growing N)"
    Config = PrefixConfig

    def __init__(self, cfg: PrefixConfig, loss) -> None:
        super().__init__(cfg, loss)
        if cfg.length < 1:
            raise ConfigError(f"method.options.length is {cfg.length}; it must be at least 1")
        if cfg.schedule == "linear" and (cfg.final_length is None or cfg.final_length < cfg.length):
            raise ConfigError("prefix schedule linear needs method.options.final_length >= length")
        if cfg.schedule == "fixed" and cfg.final_length is not None:
            raise ConfigError("method.options.final_length cannot take effect with schedule: fixed; "
                              "set schedule: linear or remove it")

    def max_new_tokens(self, default: int, step: int) -> int:
        return min(default, prefix_length(self.cfg, step))

    def apply(self, scored: ScoredBatch, advantages_B_T: torch.Tensor, step: int) -> MethodOutput:
        m = scored.mask_B_T
        return MethodOutput(weights_B_T=m.clone(),
                            metrics={"method/prefix/length": float(prefix_length(self.cfg, step))})
