"""Functions that generated lm-eval task configs call: keep every repeat, score with our scorers.

A rendered task sets `repeats: k`, a `custom` filter with `keep_all` (lm-eval's default filter
keeps only the first of the k responses) and `process_results` from
`make_process_results(bench)`, so lm-eval's numbers come from the same scorers and the same
per-problem estimators as the native path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.metrics import Sample, majority_correct, pass_at_k
from benchmarks.registry import get_bench
from benchmarks.scorers import ScoreConfig, score_batch


def keep_all(resps: Any, docs: Any) -> Any:
    """The custom filter: every response of every doc, unchanged."""
    return resps


def metric_names(pass_k: tuple[int, ...], n: int) -> list[str]:
    ks = sorted({1, *pass_k})
    return ["avg_at_k", *[f"pass_at_{k}" for k in ks if k <= n], "maj_at_k", "no_answer_rate"]


def make_process_results(bench: str, n: int, **score_cfg: Any) -> Callable[[dict, list], dict[str, float]]:
    """`process_results(doc, results)` for one bench; results[0] holds the doc's k responses."""
    spec = get_bench(bench)
    cfg = ScoreConfig(**score_cfg)

    def process_results(doc: dict, results: list) -> dict[str, float]:
        texts = results[0] if results and isinstance(results[0], list) else list(results)
        scores = score_batch(spec.scorer, [(str(t), doc) for t in texts], cfg)
        c, m = sum(s.correct for s in scores), len(scores)
        out = {"avg_at_k": c / m}
        for k in sorted({1, *spec.pass_k}):
            if k <= n:
                out[f"pass_at_{k}"] = pass_at_k(m, c, k) if k <= m else float(c > 0)
        out["maj_at_k"] = float(majority_correct([Sample(s.correct, s.extracted, s.status) for s in scores]))
        out["no_answer_rate"] = sum(s.status in ("no_answer", "unfinished") for s in scores) / m
        return out

    return process_results
