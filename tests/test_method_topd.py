"""TOPD suppression and near-future spreading on a hand-made trajectory (methods.md §5, invariant 6)."""

from __future__ import annotations

import math

import pytest
import torch

from opdcli.config import LossConfig
from opdcli.engines.types import ScoredBatch
from opdcli.errors import ConfigError
from opdcli.methods.base import METHODS, build_method
from opdcli.methods.topd import (
    TOPD,
    future_window_mean,
    topk_union_rkl,
    windowed_discounted_sum,
)
from opdcli.signals import sampled_advantage

T = 10
LOSS = [2.0, 0.0, 3.0, 0.1, 0.0, 0.0, 2.5, 0.0, 0.0, 10.0]  # l_t = log p - log q; t = 9 is padding
DIVERGENT_AT = (3, 4)  # D > 0 only here, so with H = 2: Dbar > 0 at t = 1, 2, 3


def _hand_batch() -> ScoredBatch:
    """B = 1, T = 10, K = 2: l and D chosen so that the outcome is known by hand."""
    mask = torch.tensor([[1.0] * 9 + [0.0]])
    teacher_lp = torch.full((1, T), -1.0)
    student_lp = teacher_lp + torch.tensor([LOSS])
    student_topk_lp = torch.tensor([0.5, 0.5]).log().expand(1, T, 2).clone()
    teacher_on_student = student_topk_lp.clone()
    for t in DIVERGENT_AT:
        teacher_on_student[0, t] = torch.tensor([0.99, 0.01]).log()
    ids = torch.tensor([3, 4]).expand(1, T, 2).clone()
    return ScoredBatch(torch.zeros(1, T, dtype=torch.long), mask, student_lp.clone(), student_lp, teacher_lp,
                       ids, student_topk_lp, ids, student_topk_lp.clone(), teacher_on_student,
                       torch.zeros(1, dtype=torch.long), student_lp_on_teacher_topk_B_T_K=student_topk_lp.clone())


def _apply(options: dict, loss: LossConfig | None = None):
    s = _hand_batch()
    base = sampled_advantage(s.teacher_lp_B_T, s.student_lp_B_T, s.mask_B_T, 1.0, 0.0)
    method = build_method("topd", {"k": 2, "horizon": 2, "delta": 0.5, "rho": 0.3, **options},
                          loss or LossConfig())
    return method.apply(s, base, 0), base


def test_suppresses_exactly_the_high_loss_nondivergent_tokens():
    """Invariant 6. High-loss (rho 0.3 of 9 valid tokens): t = 0, 2, 6; divergent: t = 1, 2, 3."""
    out, base = _apply({"spread": "none"})
    assert out.token_outputs["high_loss"].tolist() == [[1, 0, 1, 0, 0, 0, 1, 0, 0, 0]]
    assert out.token_outputs["divergent"].tolist() == [[0, 1, 1, 1, 0, 0, 0, 0, 0, 0]]
    assert out.weights_B_T.tolist() == [[0, 1, 1, 1, 1, 1, 0, 1, 1, 0]]
    assert out.advantages_B_T is None
    m = out.metrics
    assert m["method/topd/high_loss_frac"] == pytest.approx(3 / 9)
    assert m["method/topd/nondivergent_high_loss_frac"] == pytest.approx(2 / 3)
    assert m["method/topd/suppressed_frac"] == pytest.approx(2 / 9)
    assert m["method/topd/boosted_frac"] == 0 and m["method/topd/delta"] == 0.5
    eps, _ = _apply({"spread": "none", "suppress_eps": 0.05})
    assert eps.weights_B_T[0, [0, 6]].tolist() == pytest.approx([0.05, 0.05])


def test_backward_spread_gives_the_fork_its_windowed_return():
    out, base = _apply({"spread": "backward", "gamma": 0.9})
    assert out.weights_B_T.tolist() == [[0, 1, 1, 1, 1, 1, 0, 1, 1, 0]]
    want = base.clone()
    want[0, 2] = -3.0 + 0.9 * -0.1  # r_2 + gamma r_3 with r = -l
    assert torch.allclose(out.advantages_B_T, want)
    assert out.metrics["method/topd/boosted_frac"] == pytest.approx(1 / 9)


def test_forward_spread_boosts_the_following_tokens():
    out, _ = _apply({"spread": "forward", "gamma": 0.9, "kappa": 0.5}, LossConfig(objective="rkl"))
    want = [0, 1, 1, 1 + 0.5 * 0.9, 1 + 0.5 * 0.81, 1, 0, 1, 1, 0]
    assert out.weights_B_T[0].tolist() == pytest.approx(want)
    assert out.advantages_B_T is None
    assert out.metrics["method/topd/boosted_frac"] == pytest.approx(2 / 9)


def test_median_delta_is_the_batch_median_of_d():
    out, _ = _apply({"spread": "none", "delta": None})
    assert out.metrics["method/topd/delta"] == 0.0  # seven of nine valid D are 0
    assert out.weights_B_T.tolist() == [[1] * 9 + [0]]  # every Dbar >= 0: nothing suppressed
    s = _hand_batch()
    graded = torch.stack([torch.tensor([0.5 + 0.05 * t, 0.5 - 0.05 * t]).log() for t in range(T)])[None]
    s = ScoredBatch(**{**s.__dict__, "teacher_lp_on_student_topk_B_T_K": graded})
    method = build_method("topd", {"k": 2, "spread": "none", "delta": None}, LossConfig())
    d = topk_union_rkl(s.student_topk_ids_B_T_K, s.student_topk_lp_B_T_K, s.teacher_topk_ids_B_T_K,
                       s.teacher_topk_lp_B_T_K, graded, s.student_lp_on_teacher_topk_B_T_K)  # increasing in t: the median of t = 0..8 is t = 4
    delta = method.apply(s, torch.zeros(1, T), 0).metrics["method/topd/delta"]
    assert delta == pytest.approx(d[0, 4].item(), rel=1e-5)


def _masks():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 11, generator=g)
    mask = torch.ones(3, 11)
    mask[0, 8:] = 0
    mask[1, [2, 5, 6]] = 0  # holes, not only a prefix
    mask[2] = 0
    return x, mask


@pytest.mark.parametrize("horizon", [1, 3, 5])
def test_future_window_mean_matches_loop(horizon):
    d, mask = _masks()
    got = future_window_mean(d, mask, horizon)
    for b in range(3):
        for t in range(11):
            vals = [d[b, t + j].item() for j in range(1, horizon + 1) if t + j < 11 and mask[b, t + j]]
            want = sum(vals) / len(vals) if vals and mask[b, t] else 0.0
            assert got[b, t].item() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize(("horizon", "gamma"), [(1, 0.9), (3, 0.5), (5, 1.0)])
def test_windowed_discounted_sum_matches_loop(horizon, gamma):
    r, mask = _masks()
    got = windowed_discounted_sum(r, mask, horizon, gamma)
    for b in range(3):
        for t in range(11):
            want = sum(gamma**j * r[b, t + j].item() for j in range(horizon)
                       if t + j < 11 and mask[b, t + j]) if mask[b, t] else 0.0
            assert got[b, t].item() == pytest.approx(want, abs=1e-5)


def test_topk_rkl_nonnegative_and_zero_on_match():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, 6, 4), generator=g)
    s_lp = -torch.rand(2, 6, 4, generator=g).sort(-1).values * 4
    t_lp = -torch.rand(2, 6, 4, generator=g) * 4
    d = topk_union_rkl(ids, s_lp, ids, t_lp, t_lp, s_lp)
    assert d.shape == (2, 6) and bool((d >= 0).all()) and bool((d > 1e-4).any())
    same = topk_union_rkl(ids, s_lp, ids, s_lp, s_lp - 0.7, s_lp)  # equal after renormalisation
    assert torch.allclose(same, torch.zeros(2, 6), atol=1e-6)
    p = torch.tensor([0.5, 0.5]).log().view(1, 1, 2)
    q = torch.tensor([0.99, 0.01]).log().view(1, 1, 2)
    want = 0.5 * math.log(0.5 / 0.99) + 0.5 * math.log(0.5 / 0.01)
    assert topk_union_rkl(ids[:1, :1, :2], p, ids[:1, :1, :2], q, q, p).item() == pytest.approx(want, rel=1e-5)


def test_union_divergence_matches_a_loop_over_the_union_of_both_top_k_sets():
    """D on S union T from full distributions: S and T overlap in part; shared ids count once."""
    g = torch.Generator().manual_seed(5)
    V, K = 12, 4
    logp = torch.randn(3, 5, V, generator=g).log_softmax(-1)
    logq = (torch.randn(3, 5, V, generator=g) * 2).log_softmax(-1)
    s_lp, s_ids = logp.topk(K, dim=-1)
    t_lp, t_ids = logq.topk(K, dim=-1)
    got = topk_union_rkl(s_ids, s_lp, t_ids, t_lp, logq.gather(-1, s_ids), logp.gather(-1, t_ids))
    overlaps = []
    for b in range(3):
        for t in range(5):
            union = sorted(set(s_ids[b, t].tolist()) | set(t_ids[b, t].tolist()))
            overlaps.append(len(union) < 2 * K)
            p = [math.exp(logp[b, t, v].item()) for v in union]
            q = [math.exp(logq[b, t, v].item()) for v in union]
            p = [x / sum(p) for x in p]
            q = [x / sum(q) for x in q]
            want = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
            assert got[b, t].item() == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert any(overlaps) and not all(overlaps)  # both cases occur
    # the student's top-K alone misses the mass the teacher puts elsewhere: the union sees more
    alone = topk_union_rkl(s_ids, s_lp, s_ids, logq.gather(-1, s_ids), logq.gather(-1, s_ids), s_lp)
    assert not torch.allclose(alone, got)


def test_last_token_uses_its_own_divergence():
    """With no valid token after it, the last token's Dbar is its own D: a divergent high-loss
    last token is a fork (kept), a non-divergent one is suppressed."""
    from opdcli.methods.topd import near_future_divergence

    d = torch.tensor([[0.0, 0.2, 0.0, 0.9, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    assert near_future_divergence(d, mask, 2)[0].tolist() == pytest.approx([0.1, 0.45, 0.9, 0.9, 0.0, 0.0])
    s = _hand_batch()
    lp = s.teacher_lp_on_student_topk_B_T_K.clone()
    lp[0, 8] = torch.tensor([0.99, 0.01]).log()  # the last valid token diverges
    loss = s.student_lp_B_T.clone()
    loss[0, 8] = s.teacher_lp_B_T[0, 8] + 5.0  # and has the highest loss
    s = ScoredBatch(**{**s.__dict__, "teacher_lp_on_student_topk_B_T_K": lp, "student_lp_B_T": loss})
    method = build_method("topd", {"k": 2, "horizon": 2, "delta": 0.5, "rho": 0.3, "spread": "none"}, LossConfig())
    out = method.apply(s, torch.zeros(1, T), 0)
    assert out.token_outputs["high_loss"][0, 8] == 1 and out.token_outputs["divergent"][0, 8] == 1
    assert out.weights_B_T[0, 8] == 1


def test_default_delta_is_absolute_and_the_nondivergent_share_is_measured():
    """delta 0.1 nats: a batch where every high-loss token is a surface mismatch (D = 0 all
    along) reports a non-divergent share of 1, which the batch median could never give."""
    s = _hand_batch()
    flat = s.student_topk_lp_B_T_K.clone()
    s = ScoredBatch(**{**s.__dict__, "teacher_lp_on_student_topk_B_T_K": flat})
    method = build_method("topd", {"k": 2, "spread": "none"}, LossConfig())
    assert method.cfg.delta == 0.1
    out = method.apply(s, torch.zeros(1, T), 0)
    assert out.metrics["method/topd/nondivergent_high_loss_frac"] == 1.0
    median = build_method("topd", {"k": 2, "spread": "none", "delta": None}, LossConfig()).apply(s, torch.zeros(1, T), 0)
    assert median.metrics["method/topd/nondivergent_high_loss_frac"] == 0.0  # D = median everywhere


def test_registration_and_misuse():
    assert METHODS["topd"] is TOPD
    with pytest.raises(ConfigError, match="spread: backward.*loss.objective=rkl"):
        build_method("topd", {}, LossConfig(objective="rkl"))
    with pytest.raises(ConfigError, match="loss.discount"):
        build_method("topd", {}, LossConfig(discount=0.9))
    with pytest.raises(ConfigError, match="rho"):
        build_method("topd", {"rho": 0.0}, LossConfig())
    assert build_method("topd", {"spread": "forward"}, LossConfig(objective="rkl")).cfg.horizon == 8
    with pytest.raises(ConfigError, match="only 2 top-K entries"):
        build_method("topd", {}, LossConfig()).apply(_hand_batch(), torch.zeros(1, T), 0)
    no_cross = ScoredBatch(**{**_hand_batch().__dict__, "student_lp_on_teacher_topk_B_T_K": None})
    with pytest.raises(ConfigError, match="scoring.teacher_engine=hf"):
        build_method("topd", {"k": 2}, LossConfig()).apply(no_cross, torch.zeros(1, T), 0)


def test_high_loss_quantile_ignores_padding():
    s = _hand_batch()
    s = ScoredBatch(**{**s.__dict__, "mask_B_T": torch.tensor([[1.0] * 4 + [0.0] * 6])})
    method = build_method("topd", {"k": 2, "horizon": 2, "delta": 0.5, "rho": 0.5, "spread": "none"},
                          LossConfig())
    out = method.apply(s, torch.zeros(1, T), 0)  # median of l on [2, 0, 3, 0.1] is 1.05
    assert out.token_outputs["high_loss"].tolist() == [[1, 0, 1, 0, 0, 0, 0, 0, 0, 0]]
