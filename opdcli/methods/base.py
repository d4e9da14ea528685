"""The method interface and registry.

A method is a weight/advantage producer, never a loss or a loop: it reads the scored batch
and returns per-token weights (>= 0, detached) and optionally replacement advantages, plus
metrics and per-token / per-trajectory outputs for rollouts.jsonl. A method may also decide
generation through a `GenerationControl` value (the next step's token budget, a per-token stop
rule) that the sampler consults. Each method declares its own frozen config class;
`method.options` in YAML is validated against that class only.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from opdcli.config import OBJECTIVES, LossConfig, build_dataclass
from opdcli.engines.types import GenerationControl, ScoredBatch, StopRule
from opdcli.errors import ConfigError, MethodNotFoundError


@dataclass
class MethodOutput:
    """What a method returns for one batch.

    weights_B_T: per-token loss weights (>= 0), multiplied into the loss.
    advantages_B_T: replacement advantages for the policy-gradient objectives, or None.
    token_outputs: per-token arrays (B, T) written to rollouts.jsonl under method.token.
    trajectory_outputs: per-row values (lists of length B) under method.trajectory.
    drift_penalty: coefficient of the drift penalty added to the objective on the trained
        tokens (`freshness.drift_penalty_loss`; f-OPD), 0 for none.
    """

    weights_B_T: torch.Tensor
    advantages_B_T: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    token_outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    trajectory_outputs: dict[str, list[Any]] = field(default_factory=dict)
    drift_penalty: float = 0.0


class Method:
    """Base class. Subclasses set `name`, `Config`, `summary` and override `apply`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = object
    objectives: ClassVar[frozenset[str]] = frozenset(OBJECTIVES)
    """Base objectives this method composes with; others are refused at load time."""
    default_objective: ClassVar[str | None] = None
    """The base objective the method's paper uses, applied when the user did not choose one
    (`validate.method_objective`); None: the config's objective."""
    reads_student_scores: ClassVar[bool] = True
    """Whether `apply` reads the student's scores (log-probs, top-K); plain OPD does not, so its
    student statistics can come from the training forward (scoring.student_scores)."""
    reads_student_on_teacher_topk: ClassVar[bool] = False
    """Whether `apply` reads the student's log-probs of the teacher's top-K ids
    (ScoredBatch.student_lp_on_teacher_topk_B_T_K), which the scorer then computes."""

    def __init__(self, cfg: Any, loss: LossConfig) -> None:
        self.cfg, self.loss = cfg, loss

    def apply(self, scored: ScoredBatch, advantages_B_T: torch.Tensor, step: int) -> MethodOutput:
        raise NotImplementedError

    def check_scoring(self, top_k: int) -> None:
        """Refuse, before any model loads, a method top-K larger than scoring keeps."""
        k = getattr(self.cfg, "k", None)
        if isinstance(k, int):
            require_topk(k, top_k)

    def max_new_tokens(self, default: int, step: int) -> int:
        """Generation budget of step `step`'s rollout (methods that control generation override)."""
        del step
        return default

    def stop_rule(self) -> StopRule | None:
        """A per-token stop rule the sampler hosts (Prune-OPD online truncation), or None."""
        return None

    def generation_control(self, default: int, step: int) -> GenerationControl:
        """What step `step`'s rollout may generate: its token budget and stop rule."""
        return GenerationControl(max_new_tokens=self.max_new_tokens(default, step), stop=self.stop_rule())

    def reference_model(self, student: str) -> str | None:
        """A reference model to score pi_ref with (G-OPD), or None."""
        del student
        return None

    def attach(self, tokenizer: Any) -> None:
        """Give the method the tokenizer (the release rule segments decoded text)."""
        self.tokenizer = tokenizer

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


METHODS: dict[str, type[Method]] = {}


def require_topk(k: int, stored: int, what: str = "top-K") -> None:
    """A method's top-K test needs at least k scored candidates per token."""
    if stored < k:
        raise ConfigError(f"method.options.k is {k} but only {stored} {what} entries are scored; "
                          f"set scoring.top_k >= {k} or lower method.options.k")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method under `cls.name`; a duplicate name is an error."""
    if not cls.name:
        raise AssertionError(f"{cls.__name__} has no name")
    if cls.name in METHODS:
        raise AssertionError(f"method '{cls.name}' is registered twice")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1, cutoff=0.4)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise MethodNotFoundError(
            f"unknown method '{name}'.{hint} Available: {', '.join(sorted(METHODS))} "
            "(see opd train --list-methods)"
        )
    return METHODS[name]


def build_method(name: str, options: dict[str, Any], loss: LossConfig) -> Method:
    """Validate `options` against the method's own config class and check the objective."""
    cls = method_class(name)
    try:
        cfg = build_dataclass(cls.Config, options, prefix="method.options.")
    except ConfigError as exc:
        raise ConfigError(f"{exc} (options of method '{name}')") from None
    if loss.objective not in cls.objectives:
        raise ConfigError(
            f"method '{name}' cannot be combined with loss.objective={loss.objective}: "
            f"it needs one of {', '.join(sorted(cls.objectives))}; use --set loss.objective="
            f"{cls.default_objective or sorted(cls.objectives)[0]}"
        )
    return cls(cfg, loss)
