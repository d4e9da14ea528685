"""Metrics over problems x samples: avg@k, unbiased pass@k, maj@k, standard errors, rates.

Per problem i with n_i samples of which c_i are correct:
  avg@k   mean over problems of c_i / n_i (the pass@1 estimate; k = n)
  pass@k  mean over problems of 1 - C(n_i - c_i, k) / C(n_i, k) (Chen et al. 2021, unbiased)
  maj@k   the most common extracted answer over all n_i samples (ties: first seen) is correct
Standard errors (`*_se`) are across problems: std(per-problem values, ddof=1) / sqrt(P).
`avg@k_sampling_se` is the part due to finite k: sqrt(sum_i p_i (1 - p_i) / (n_i - 1)) / P.
Rates are over all samples: no_answer_rate (nothing extracted, including unfinished
thinking), unfinished_rate, timeout_rate, truncation_rate (hit max_tokens).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One scored completion, as the metrics see it."""

    correct: bool
    extracted: str | None
    status: str = "ok"
    finish_reason: str = "stop"
    n_tokens: int | None = None
    n_chars: int = 0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from c correct of n."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_correct(samples: Sequence[Sample]) -> bool:
    """Is the most common extracted answer correct? (no answers never win; ties: first seen)."""
    votes = Counter(s.extracted.strip() for s in samples if s.extracted is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(s.extracted.strip() for s in samples if s.extracted is not None and votes[s.extracted.strip()] == top)
    return any(s.correct for s in samples if s.extracted is not None and s.extracted.strip() == winner)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def compute_metrics(per_problem: Sequence[Sequence[Sample]], pass_ks: Sequence[int] = (1,),
                    majority: bool = True) -> dict[str, Any]:
    """All metrics for a list of problems, each a list of its samples (k = the smallest n)."""
    problems = [list(p) for p in per_problem if len(p) > 0]
    flat = [s for p in problems for s in p]
    if not problems:
        return {"problems": 0, "samples": 0}
    ns = [len(p) for p in problems]
    cs = [sum(s.correct for s in p) for p in problems]
    out: dict[str, Any] = {"problems": len(problems), "samples": len(flat), "k": min(ns), "n_max": max(ns)}
    out["avg@k"], out["avg@k_se"] = mean_se([c / n for c, n in zip(cs, ns, strict=True)])
    var = sum((c / n) * (1 - c / n) / (n - 1) for c, n in zip(cs, ns, strict=True) if n > 1)
    out["avg@k_sampling_se"] = math.sqrt(var) / len(problems) if min(ns) > 1 else float("nan")
    for k in sorted(set(pass_ks) | {1}):
        if k <= min(ns):
            out[f"pass@{k}"], out[f"pass@{k}_se"] = mean_se([pass_at_k(n, c, k) for c, n in zip(cs, ns, strict=True)])
    if majority:
        out["maj@k"], out["maj@k_se"] = mean_se([float(majority_correct(p)) for p in problems])
    total = len(flat)
    out["no_answer_rate"] = sum(s.status in ("no_answer", "unfinished") for s in flat) / total
    out["unfinished_rate"] = sum(s.status == "unfinished" for s in flat) / total
    out["timeout_rate"] = sum(s.status == "timeout" for s in flat) / total
    out["error_rate"] = sum(s.status == "error" for s in flat) / total
    out["truncation_rate"] = sum(s.finish_reason == "length" for s in flat) / total
    tokens = [s.n_tokens for s in flat if s.n_tokens is not None]
    out["mean_output_tokens"] = sum(tokens) / len(tokens) if tokens else None
    out["mean_output_chars"] = sum(s.n_chars for s in flat) / total
    out["accuracy"] = out["avg@k"]
    return out
