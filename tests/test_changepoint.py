"""Profiled RSS-BIC change point (methods.md §3.3, §7 invariant 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from opdcli.changepoint import ChangePoint, profiled_rss_bic


def brute_force(x, k0=1, k1=3, tau_min=2, g_min=10.0, n_min=4, downward=True) -> ChangePoint:
    """O(n^2) reference: every RSS straight from its definition."""
    x = [float(v) for v in x]
    n = len(x)
    if n < n_min or n - tau_min < tau_min:
        mean = sum(x) / n if n else 0.0
        return ChangePoint(n, 0.0, False, mean, mean)

    def rss(part):
        mu = sum(part) / len(part)
        return sum((v - mu) ** 2 for v in part)

    bic0 = n * math.log(max(rss(x), 1e-12) / n) + k0 * math.log(n)
    best = None
    for tau in range(tau_min, n - tau_min + 1):
        bic1 = n * math.log(max(rss(x[:tau]) + rss(x[tau:]), 1e-12) / n) + k1 * math.log(n)
        if best is None or bic1 < best[0]:
            best = (bic1, tau)
    bic1, tau = best
    before, after = sum(x[:tau]) / tau, sum(x[tau:]) / (n - tau)
    gain = bic0 - bic1
    return ChangePoint(tau, gain, gain > g_min and (after < before or not downward), before, after)


def test_planted_downward_step_is_found_and_accepted():
    rng = np.random.default_rng(0)
    x = np.r_[np.full(9, 0.8), np.full(7, 0.2)] + rng.normal(0, 0.03, 16)
    cp = profiled_rss_bic(x)
    assert cp.release_segment == 9 and cp.accepted
    assert cp.bic_improvement > 10 and cp.mean_before > 0.7 and cp.mean_after < 0.3


def test_upward_step_is_rejected_despite_a_large_gain():
    rng = np.random.default_rng(1)
    x = np.r_[np.full(8, 0.2), np.full(8, 0.8)] + rng.normal(0, 0.03, 16)
    cp = profiled_rss_bic(x)
    assert cp.bic_improvement > 50 and cp.release_segment == 8
    assert not cp.accepted and cp.mean_after > cp.mean_before
    assert profiled_rss_bic(x, downward=False).accepted  # the shift itself is significant


def test_flat_noisy_series_is_not_accepted():
    for seed in range(5):
        x = 0.5 + np.random.default_rng(seed).normal(0, 0.1, 20)
        cp = profiled_rss_bic(x)
        assert not cp.accepted and cp.bic_improvement < 10
    flat = profiled_rss_bic([0.3] * 10)  # RSS floored: no gain at all
    assert not flat.accepted and flat.bic_improvement < 0


def test_short_series_never_release():
    steep = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert profiled_rss_bic(steep).accepted
    for n in range(4):
        cp = profiled_rss_bic(steep[:n])
        assert cp == ChangePoint(n, 0.0, False, cp.mean_before, cp.mean_after) and not cp.accepted
    cp = profiled_rss_bic(steep, n_min=7)
    assert not cp.accepted and cp.bic_improvement == 0.0 and cp.release_segment == 6


def test_gain_formula_on_a_hand_computed_series():
    # x = 3, 1, 0, 0, 1: RSS_0 = 6; tau = 2 gives RSS_1 = 2 + 2/3 = 8/3 (tau = 3 gives 31/6)
    # gain = 5 ln(6/5) + ln 5 - 5 ln(8/15) - 3 ln 5 = 5 ln(9/4) - 2 ln 5
    cp = profiled_rss_bic([3, 1, 0, 0, 1], g_min=0.5)
    assert cp.release_segment == 2
    assert cp.bic_improvement == pytest.approx(5 * math.log(9 / 4) - 2 * math.log(5), rel=1e-12)
    assert cp.mean_before == pytest.approx(2.0) and cp.mean_after == pytest.approx(1 / 3)
    assert cp.accepted
    assert not profiled_rss_bic([3, 1, 0, 0, 1], g_min=0.9).accepted


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force_on_random_series(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(4, 40))
    x = rng.normal(0, 1, n)
    if seed % 2:  # half of the series carry a planted drop
        x[n // 2:] -= 3.0
    kwargs = {"tau_min": int(rng.integers(1, 3)), "k1": 3 if seed % 3 else 2, "g_min": 5.0}
    got, want = profiled_rss_bic(x, **kwargs), brute_force(x, **kwargs)
    assert got.release_segment == want.release_segment and got.accepted == want.accepted
    assert got.bic_improvement == pytest.approx(want.bic_improvement, rel=1e-9, abs=1e-9)
    assert got.mean_before == pytest.approx(want.mean_before)
    assert got.mean_after == pytest.approx(want.mean_after)
