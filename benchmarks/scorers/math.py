"""Math answers: drop the thinking part, take the last `\\boxed{}`, compare with the gold.

Integer golds compare as integers when the boxed text is an integer (`033` equals `33`).
Everything else goes to math-verify (`verify(parse("$gold$"), parse("\\boxed{pred}"))`, gold
first) inside killable worker processes with a hard deadline: a hang is killed and counted
wrong with status `timeout`. math-verify is an optional extra (`opd[eval]`); without it the
scorer falls back to `opdcli.grading.grade` (exact match), warns once and records
`scorer: exact`. No last-number fallback: a completion without `\\boxed{}` has no answer.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from typing import Any

from benchmarks.scorers import ScoreConfig, ScoreResult, is_unfinished
from benchmarks.scorers.isolate import run_isolated
from opdcli.grading import grade, last_boxed, strip_thinking

_INT = re.compile(r"^[+-]?\d+$")
_warned = False


def math_backend(cfg: ScoreConfig) -> str:
    """'math-verify' or 'exact' (warns once when math-verify was wanted but is missing)."""
    global _warned
    if cfg.math_backend == "exact":
        return "exact"
    if importlib.util.find_spec("math_verify") is not None:
        return "math-verify"
    if not _warned:
        _warned = True
        warnings.warn("math-verify is not installed: math answers are graded by exact match "
                      "(pip install 'opd[eval]' for symbolic checking)", stacklevel=2)
    return "exact"


def extract(text: str) -> tuple[str | None, str]:
    """(boxed answer, status) after the thinking part."""
    if is_unfinished(text):
        return None, "unfinished"
    box = last_boxed(strip_thinking(text))
    return (box, "ok") if box is not None else (None, "no_answer")


def _int_compare(box: str, gold: str) -> bool | None:
    b, g = box.replace(",", "").replace(" ", ""), gold.replace(",", "").strip()
    if _INT.match(g) and _INT.match(b):
        return int(b) == int(g)
    return None


def verify_pair(pair: tuple[str, str]) -> bool:
    """math-verify on (gold, boxed); runs inside a worker process (its main thread)."""
    from math_verify import parse, verify

    gold, box = pair
    return bool(verify(parse(f"${gold}$"), parse(f"\\boxed{{{box}}}")))


def score_math(items: list[tuple[str, dict[str, Any]]], cfg: ScoreConfig) -> list[ScoreResult]:
    backend = math_backend(cfg)
    results: list[ScoreResult | None] = [None] * len(items)
    pending: list[int] = []
    for i, (text, row) in enumerate(items):
        box, status = extract(text)
        gold = str(row["answer"])
        if box is None:
            results[i] = ScoreResult(False, None, status)
        elif (same := _int_compare(box, gold)) is not None:
            results[i] = ScoreResult(same, box)
        elif backend == "exact":
            results[i] = ScoreResult(grade(text, gold), box)
        else:
            pending.append(i)
    if pending:
        import math_verify  # noqa: F401  (imported once here so forked workers inherit it)

        pairs = [(str(items[i][1]["answer"]), results_box(items[i][0])) for i in pending]
        for i, (kind, value) in zip(pending, run_isolated(verify_pair, pairs, cfg.timeout, cfg.workers),
                                    strict=True):
            box = results_box(items[i][0])
            if kind == "ok":
                results[i] = ScoreResult(bool(value), box)
            else:
                results[i] = ScoreResult(False, box, kind, {"error": value} if value else {})
    return [r for r in results if r is not None]


def results_box(text: str) -> str:
    return last_boxed(strip_thinking(text)) or ""


def score_toy(text: str, row: dict[str, Any]) -> ScoreResult:
    """The toy bench: exactly `opdcli.grading.grade`, the grader of training's held-out accuracy."""
    box = last_boxed(strip_thinking(text))
    return ScoreResult(grade(text, str(row["answer"])), box, "ok" if box is not None else "no_answer")
