"""f-OPD freshness arithmetic pinned against slow, obviously correct loops (methods.md §4.2)."""

from __future__ import annotations

import math

import pytest
import torch

from opdcli.freshness import (
    AdaptiveDriftPenalty,
    drift_penalty_loss,
    freshness,
    keep_and_weights,
    prefix_ratio,
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
        terms = [math.exp(p - q) - 1 - (p - q) for p, q in zip(lp[b].tolist(), beh[b].tolist(), strict=True)]
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


def test_prefix_ratio_is_the_capped_product_of_the_earlier_ratios():
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(2, 5, generator=g)
    beh = lp + 0.6 * torch.randn(2, 5, generator=g)
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    for include in (False, True):
        rho, frac = prefix_ratio(lp, beh, 1.5, mask, include_current=include)
        clipped = valid = 0
        for b in range(2):
            prod = 1.0
            for t in range(5):
                if include:
                    prod *= math.exp(float(lp[b, t] - beh[b, t]))
                want = min(prod, 1.5) if mask[b, t] else 0.0
                assert float(rho[b, t]) == pytest.approx(want, rel=1e-5)
                valid += int(mask[b, t])
                clipped += int(bool(mask[b, t]) and prod > 1.5)
                if not include:
                    prod *= math.exp(float(lp[b, t] - beh[b, t]))
        assert frac == pytest.approx(clipped / valid)
    first, _ = prefix_ratio(lp, beh, 2.0, mask, include_current=False)
    assert first[:, 0].tolist() == [1.0, 1.0]  # nothing precedes the first token
    huge, _ = prefix_ratio(lp, beh - 500.0, 2.0, mask, include_current=True)  # no overflow
    assert torch.isfinite(huge).all() and float(huge.max()) == 2.0


def test_k3_drift_and_its_penalty_gradient_are_exact_in_expectation_under_the_sampler():
    """Rows are sampled from p_beh: E_beh[k3] is KL(p_beh || p_theta) and E_beh[grad k3] its
    gradient, checked by enumerating a small vocabulary (no Monte Carlo). The estimator written
    exp(-delta) - 1 + delta (the one for samples from p_theta) misses both."""
    g = torch.Generator().manual_seed(4)
    beh_logits, logits = torch.randn(7, generator=g) * 1.5, (torch.randn(7, generator=g) * 1.5).requires_grad_(True)
    p_beh = beh_logits.log_softmax(-1).exp()
    lp_all = logits.log_softmax(-1)
    beh_all = beh_logits.log_softmax(-1)
    per_token = rollout_drift(lp_all.detach()[:, None], beh_all[:, None], torch.ones(7, 1))
    kl = (p_beh * (beh_all - lp_all)).sum()
    assert float((p_beh * per_token).sum()) == pytest.approx(float(kl.detach()), rel=1e-5)
    (grad_kl,) = torch.autograd.grad(kl, logits, retain_graph=True)
    expected_pen = 0.0
    for y in range(7):
        pen, _ = drift_penalty_loss(lp_all[y].reshape(1, 1), beh_all[y].reshape(1, 1), torch.ones(1, 1), beta=1.0)
        expected_pen = expected_pen + p_beh[y] * pen
    (grad_pen,) = torch.autograd.grad(expected_pen, logits)
    assert torch.allclose(grad_pen, grad_kl, atol=1e-6)
    wrong = (p_beh * (torch.exp(-(lp_all - beh_all)) - 1 + (lp_all - beh_all))).sum()
    assert abs(float(wrong.detach()) - float(kl.detach())) > 0.1 * float(kl.detach())


def test_adaptive_penalty_doubles_and_halves():
    pen = AdaptiveDriftPenalty(target=0.02, floor=0.01)
    assert [pen.update(x) for x in (0.05, 0.05, 0.05, 0.01, 0.01, 0.01, 0.02)] == [0.01, 0.02, 0.04, 0.02, 0.01, 0.0, 0.0]
    capped = AdaptiveDriftPenalty(target=0.02, floor=0.25, beta_max=1.0)
    assert [capped.update(1.0) for _ in range(5)] == [0.25, 0.5, 1.0, 1.0, 1.0]  # a lasting drift stops at the ceiling
    assert capped.update(0.0) == 0.5
    free = AdaptiveDriftPenalty(target=0.02, floor=0.25, beta_max=None)
    assert [free.update(1.0) for _ in range(5)][-1] == 4.0
    pen.load_state_dict({"beta": 0.5})
    assert pen.state_dict() == {"beta": 0.5}
