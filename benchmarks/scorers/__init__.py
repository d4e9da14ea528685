"""Scorers: (completion text, normalised row) -> `ScoreResult`, one module per answer kind.

`math` (boxed answer, math-verify in killable processes, exact-match fallback), `mcq` (answer
letter), `code` (tests in a sandboxed subprocess) and `toy` (`opdcli.grading.grade`, the
training grader). Every scorer marks `unfinished` when a `<think>` block never closes and
`no_answer` when nothing could be extracted; both count as wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STATUSES = ("ok", "no_answer", "unfinished", "timeout", "error")


@dataclass(frozen=True)
class ScoreResult:
    """One completion's verdict."""

    correct: bool
    extracted: str | None
    status: str = "ok"
    """ok | no_answer | unfinished | timeout | error."""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoreConfig:
    """Scoring settings (recorded in results.json)."""

    timeout: float = 10.0
    """Wall-clock deadline per math item, and per code test (seconds)."""
    workers: int = 2
    """Worker processes for math-verify and parallel code runs."""
    memory_mb: int = 1024
    """Address-space limit of a code run (RLIMIT_AS)."""
    math_backend: str = "auto"
    """auto (math-verify if installed, else exact), math-verify or exact."""
    allow_unsafe_code: bool = False
    """Run code answers even where no OS isolation (bubblewrap) is available: hostile programs
    can then escape the rlimits and audit hook (results record the isolation used)."""


def is_unfinished(text: str) -> bool:
    """A `<think>` with no `</think>` after it: the model never finished reasoning."""
    return text.rfind("<think>") > text.rfind("</think>")


def score_batch(scorer: str, items: list[tuple[str, dict[str, Any]]], cfg: ScoreConfig) -> list[ScoreResult]:
    """Score (text, row) pairs with the named scorer."""
    if scorer == "math":
        from benchmarks.scorers.math import score_math

        return score_math(items, cfg)
    if scorer == "mcq":
        from benchmarks.scorers.mcq import score_mcq

        return [score_mcq(text, row) for text, row in items]
    if scorer == "code":
        from benchmarks.scorers.code import score_code

        return score_code(items, cfg)
    if scorer == "toy":
        from benchmarks.scorers.math import score_toy

        return [score_toy(text, row) for text, row in items]
    raise ValueError(f"unknown scorer {scorer!r}")


def describe(scorer: str, cfg: ScoreConfig) -> dict[str, Any]:
    """What actually scored (e.g. math-verify or the exact-match fallback)."""
    info: dict[str, Any] = {"name": scorer, "timeout_s": cfg.timeout, "workers": cfg.workers}
    if scorer == "math":
        from benchmarks.scorers.math import math_backend

        info["scorer"] = math_backend(cfg)
    elif scorer == "code":
        from benchmarks.scorers import isolation

        info.update(scorer="sandboxed-subprocess", memory_mb=cfg.memory_mb,
                    isolation=isolation.describe(isolation.detect()))
    elif scorer == "toy":
        info["scorer"] = "opdcli.grading.grade"
    else:
        info["scorer"] = "letter-regex"
    return info
