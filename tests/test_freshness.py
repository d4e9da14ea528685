"""f-OPD freshness arithmetic pinned against slow, obviously correct loops (methods.md §4.2)."""

from __future__ import annotations

import math

import pytest
import torch

from opdcli.freshness import (
    AdaptiveDriftPenalty,
    freshness,
    keep_and_weights,
    rollout_drift,
    supervision_drift,
    truncated_ratio,
)


def _tensors(B=3, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 3
    beh = lp + 0.3 * torch.randn(B, T, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)[:B]
    return lp, beh, mask


def _slow_mean(values, mask_row):
    kept = [v for v, m in zip(values, mask_row, strict=True) if m > 0]
    return sum(kept) / len(kept) if kept else 0.0


def test_rollout_drift_is_the_k3_estimate_per_row():
    lp, beh, mask = _tensors()
    got = rollout_drift(lp, beh, mask)
    for b in range(3):
        terms = [math.exp(-(p - q)) - 1 + (p - q) for p, q in zip(lp[b].tolist(), beh[b].tolist(), strict=True)]
        assert got[b].item() == pytest.approx(_slow_mean(terms, mask[b].tolist()), abs=1e-6)
    assert (got >= 0).all() and got[2] == 0  # the empty row
    assert rollout_drift(lp, lp, mask).abs().max() < 1e-7  # on-policy: no drift


def test_supervision_drift_and_freshness_by_hand():
    lp, beh, mask = _tensors()
    stored, fresh = lp * 0.5, lp
    got = supervision_drift(stored, fresh, mask)
    for b in range(3):
        terms = [abs(s - f) for s, f in zip(stored[b].tolist(), fresh[b].tolist(), strict=True)]
        assert got[b].item() == pytest.approx(_slow_mean(terms, mask[b].tolist()), abs=1e-6)
    assert supervision_drift(None, fresh, mask).tolist() == [0.0, 0.0, 0.0]
    d_roll, d_sup, lag = torch.tensor([0.01, 0.1, 0.0]), torch.tensor([0.0, 0.25, 1.0]), torch.tensor([0, 2, 5])
    f = freshness(d_roll, d_sup, lag, tau_r=0.05, tau_s=0.5, eta=0.1)
    expected = [math.exp(-r / 0.05 - s / 0.5 - 0.1 * n) for r, s, n in zip([0.01, 0.1, 0.0], [0.0, 0.25, 1.0], [0, 2, 5], strict=True)]
    assert f.tolist() == pytest.approx(expected, rel=1e-6)
    off = freshness(d_roll, d_sup, lag, tau_r=0.0, tau_s=0.0, eta=0.0)  # every term switched off
    assert off.tolist() == [1.0, 1.0, 1.0]


def test_drops_and_weights_follow_f_min_and_max_lag():
    f, lag = torch.tensor([0.9, 0.01, 0.5, 0.6]), torch.tensor([0, 1, 6, 2])
    keep, u = keep_and_weights(f, lag, f_min=0.05, max_lag=4)
    assert keep.tolist() == [True, False, False, True]
    assert u.tolist() == pytest.approx([0.9 / 0.75, 0.0, 0.0, 0.6 / 0.75])
    assert float(u[keep].mean()) == pytest.approx(1.0)
    keep, u = keep_and_weights(f, lag, f_min=0.0, max_lag=None, reweight=False)
    assert keep.all() and u.tolist() == [1.0, 1.0, 1.0, 1.0]
    keep, u = keep_and_weights(f, lag, f_min=0.99, max_lag=4)
    assert not keep.any() and u.abs().sum() == 0


def test_truncated_ratio_caps_and_counts():
    lp = torch.tensor([[0.0, -1.0, -0.1]])
    beh = torch.tensor([[-1.0, -1.0, -0.1]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rho, frac = truncated_ratio(lp, beh, 2.0, mask)
    assert rho[0].tolist() == pytest.approx([2.0, 1.0, 0.0]) and frac == pytest.approx(0.5)  # e^1 > 2 is capped


def test_adaptive_penalty_doubles_and_halves():
    pen = AdaptiveDriftPenalty(target=0.02, floor=0.01)
    assert [pen.update(x) for x in (0.05, 0.05, 0.05, 0.01, 0.01, 0.01, 0.02)] == [0.01, 0.02, 0.04, 0.02, 0.01, 0.0, 0.0]
    pen.load_state_dict({"beta": 0.5})
    assert pen.state_dict() == {"beta": 0.5}
