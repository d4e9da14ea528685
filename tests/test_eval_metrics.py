"""Eval metrics: pass@k pinned against brute-force enumeration, maj@k, SEs and rates."""

from __future__ import annotations

import itertools
import math

import pytest

from benchmarks.metrics import Sample, compute_metrics, majority_correct, mean_se, pass_at_k


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_known_values_and_misuse():
    assert pass_at_k(16, 0, 4) == 0.0
    assert pass_at_k(16, 16, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(4, 1, 5)


def _s(correct, extracted="x", status="ok", finish="stop", tokens=10):
    return Sample(correct, extracted, status, finish, tokens, 5)


def test_majority_vote_picks_most_common_answer_and_ignores_no_answers():
    assert majority_correct([_s(False, "3"), _s(True, "4"), _s(True, "4")])
    assert not majority_correct([_s(False, "3"), _s(False, "3"), _s(True, "4")])
    assert not majority_correct([_s(False, None, "no_answer")] * 3)
    # no answers never win the vote
    assert majority_correct([_s(False, None, "no_answer")] * 3 + [_s(True, "7")])
    # tie: the first seen wins
    assert majority_correct([_s(True, "1"), _s(False, "2")])


def test_compute_metrics_by_hand():
    problems = [
        [_s(True, "1"), _s(True, "1"), _s(False, "2"), _s(False, None, "no_answer", "length")],
        [_s(False, "5"), _s(False, None, "unfinished", "length"), _s(False, "5"), _s(True, "6")],
        [_s(False, "9", "timeout"), _s(False, "8"), _s(False, "8"), _s(False, "8")],
    ]
    m = compute_metrics(problems, pass_ks=(1, 2, 4, 8))
    per = [0.5, 0.25, 0.0]
    assert m["avg@k"] == pytest.approx(0.25)
    assert m["avg@k_se"] == pytest.approx(mean_se(per)[1])
    assert m["avg@k_se"] == pytest.approx(math.sqrt(sum((p - 0.25) ** 2 for p in per) / 2 / 3))
    assert m["pass@1"] == pytest.approx(m["avg@k"])
    assert m["pass@2"] == pytest.approx((brute_pass_at_k(4, 2, 2) + brute_pass_at_k(4, 1, 2) + 0) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert "pass@8" not in m  # needs 8 samples per problem
    assert m["maj@k"] == pytest.approx(1 / 3)
    assert m["no_answer_rate"] == pytest.approx(2 / 12)
    assert m["unfinished_rate"] == pytest.approx(1 / 12)
    assert m["timeout_rate"] == pytest.approx(1 / 12)
    assert m["truncation_rate"] == pytest.approx(2 / 12)
    assert m["mean_output_tokens"] == pytest.approx(10)
    assert m["k"] == 4 and m["problems"] == 3 and m["samples"] == 12
    sampling_var = sum(p * (1 - p) / 3 for p in per)
    assert m["avg@k_sampling_se"] == pytest.approx(math.sqrt(sampling_var) / 3)


def test_single_sample_has_no_sampling_se():
    m = compute_metrics([[_s(True)], [_s(False)]])
    assert m["avg@k"] == 0.5 and math.isnan(m["avg@k_sampling_se"])
