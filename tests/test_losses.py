"""Pins every loss in `opdcli.losses` against slow loop references on tiny tensors.

The references loop over (b, t) (and v / k) with scalar torch ops, so they also give reference
gradients. Also covered: methods.md §7 invariants 2 (JSD endpoints and positivity) and 3
(full-vocab PG form has the analytic reverse-KL gradient), the all-masked batch, masked garbage,
chunked normalisation and argument validation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from opdcli.errors import ConfigError
from opdcli.losses import (
    analytic_rkl_loss,
    forward_kl_loss,
    generalized_jsd_loss,
    sampled_token_loss,
    token_mean,
    topk_pg_loss,
)

B, T, V, K = 3, 4, 6, 3
DT = torch.float64
# row 0 fully valid, row 1 partly masked, row 2 fully masked
MASK = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=DT)
ANALYTIC = {"rkl": analytic_rkl_loss, "fkl": forward_kl_loss, "jsd": generalized_jsd_loss}
SUPPORTS = [
    ("full", False),
    ("student_topk", False),
    ("student_topk", True),
    ("teacher_topk", False),
    ("teacher_topk", True),
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=DT) * scale


def weights() -> torch.Tensor:
    return torch.rand(B, T, generator=gen(99), dtype=DT) + 0.5


def sampled_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    student = -randn(B, T, seed=seed).abs() - 0.1
    behavior = student.detach() + randn(B, T, seed=seed + 1, scale=0.4)
    return {
        "student_lp_B_T": student.clone().requires_grad_(True),
        "behavior_lp_B_T": behavior,
        "advantages_B_T": randn(B, T, seed=seed + 2),
    }


def topk_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    lp = F.log_softmax(randn(B, T, V, seed=seed, scale=2.0), -1)[..., :K]
    old = lp + randn(B, T, K, seed=seed + 1, scale=0.3)
    teacher = F.log_softmax(randn(B, T, V, seed=seed + 2, scale=2.0), -1)[..., :K]
    return {
        "student_topk_lp_B_T_K": lp.clone().requires_grad_(True),
        "old_topk_lp_B_T_K": old,
        "teacher_topk_lp_B_T_K": teacher,
    }


def logit_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "student_logits_B_T_V": randn(B, T, V, seed=seed, scale=2.0).requires_grad_(True),
        "teacher_logits_B_T_V": randn(B, T, V, seed=seed + 1, scale=2.0),
    }


def grad_of(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x, allow_unused=True, retain_graph=True)
    return torch.zeros_like(x) if g is None else g


# ----------------------------------------------------------------------------- references


def ref_aggregate(terms, mask, w, normalizer):
    """terms: dict (b, t) -> scalar tensor, only for valid positions."""
    total = torch.zeros((), dtype=DT)
    for (b, t), term in terms.items():
        total = total + (1.0 if w is None else float(w[b, t])) * term
    count = sum(1 for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t])
    return total / (normalizer if normalizer is not None else max(count, 1))


def valid_positions(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def ref_sampled(lp, beh, adv, mask, w, surrogate, clip_low, clip_high, dual_clip, normalizer):
    terms = {}
    for b, t in valid_positions(mask):
        a = float(adv[b, t])
        rho = torch.exp(lp[b, t] - float(beh[b, t]))
        if surrogate == "is":
            term = -rho * a
        elif surrogate == "pg":
            term = -a * lp[b, t]
        else:
            term = torch.maximum(-rho * a, -torch.clamp(rho, 1 - clip_low, 1 + clip_high) * a)
            if dual_clip is not None and a < 0:
                term = torch.minimum(term, torch.tensor(-dual_clip * a, dtype=DT))
        terms[(b, t)] = term
    return ref_aggregate(terms, mask, w, normalizer)


def ref_topk(lp, old, teacher, mask, w, mode, clip_low, clip_high):
    terms, rkl = {}, []
    for b, t in valid_positions(mask):
        k_ = lp.shape[-1]
        if mode == "none":
            wt = [1.0 / k_] * k_
        else:
            src = [float(x) for x in (old if mode == "student_p" else teacher)[b, t]]
            z = sum(math.exp(x) for x in src)
            wt = [math.exp(x) / z for x in src]
        term = torch.zeros((), dtype=DT)
        r = 0.0
        for v in range(k_):
            diff = float(old[b, t, v]) - float(teacher[b, t, v])
            r += wt[v] * diff
            a = -wt[v] * diff
            rho = torch.exp(lp[b, t, v] - float(old[b, t, v]))
            term = term + torch.maximum(
                -rho * a, -torch.clamp(rho, 1 - clip_low, 1 + clip_high) * a
            )
        terms[(b, t)] = term
        rkl.append(r)
    return ref_aggregate(terms, mask, w, None), sum(rkl) / max(len(rkl), 1)


def ref_dists(zs, zt, support, k, tail):
    """Student and teacher distributions (lists of scalar tensors) over the support."""
    n = zs.shape[0]
    zs_sum = sum(torch.exp(zs[u]) for u in range(n))
    zt_sum = sum(math.exp(float(zt[u])) for u in range(n))
    ps = [torch.exp(zs[v]) / zs_sum for v in range(n)]
    pt = [torch.tensor(math.exp(float(zt[v])) / zt_sum, dtype=DT) for v in range(n)]
    if support == "full":
        ids = list(range(n))
    else:
        src = zs if support == "student_topk" else zt
        ids = sorted(range(n), key=lambda v: -float(src[v].detach()))[: min(k, n)]
    p = [ps[v] for v in ids]
    q = [pt[v] for v in ids]
    if tail:
        return p + [1 - sum(p)], q + [1 - sum(q)]
    return [x / sum(p) for x in p], [x / sum(q) for x in q]


def ref_kl(p, q):
    return sum(pi * (torch.log(pi) - torch.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


def ref_divergence(kind, zs, zt, support, k, tail, beta=0.5, temperature=1.0):
    p, q = ref_dists(zs / temperature, zt / temperature, support, k, tail)
    if kind == "rkl" or (kind == "jsd" and beta == 1):
        return ref_kl(p, q)
    if kind == "fkl" or (kind == "jsd" and beta == 0):
        return ref_kl(q, p)
    m = [beta * qi + (1 - beta) * pi for pi, qi in zip(p, q, strict=True)]
    return beta * ref_kl(q, m) + (1 - beta) * ref_kl(p, m)


def ref_analytic(kind, zs, zt, mask, w, support, k, tail, **jsd):
    terms = {
        (b, t): ref_divergence(kind, zs[b, t], zt[b, t], support, k, tail, **jsd)
        for b, t in valid_positions(mask)
    }
    return ref_aggregate(terms, mask, w, None)


# ----------------------------------------------------------------------------- token_mean


def test_token_mean_ignores_garbage_at_masked_positions():
    values = randn(B, T, seed=6)
    garbage = torch.where(MASK.bool(), values, torch.tensor([math.nan, math.inf, -math.inf, 1e300]))
    garbage.requires_grad_(True)
    w = torch.where(MASK.bool(), weights(), math.nan)
    loss = token_mean(garbage, MASK, w)
    assert loss.item() == pytest.approx(token_mean(values, MASK, weights()).item())
    loss.backward()
    torch.testing.assert_close(garbage.grad, weights() * MASK / 6)


def test_token_mean_matches_loop_with_weights_and_normalizer():
    values = randn(B, T, seed=5)
    w = weights()
    expected = sum(float(values[b, t] * w[b, t]) for b, t in valid_positions(MASK))
    assert token_mean(values, MASK).item() == pytest.approx(
        sum(float(values[b, t]) for b, t in valid_positions(MASK)) / 6
    )
    assert token_mean(values, MASK, w).item() == pytest.approx(expected / 6)
    assert token_mean(values, MASK.bool(), w, normalizer=2.5).item() == pytest.approx(
        expected / 2.5
    )
    assert token_mean(values, MASK, w, torch.tensor(4.0)).item() == pytest.approx(expected / 4)
    # an empty step passes a global count of 0: the loss is 0, not nan
    empty = torch.zeros(B, T, dtype=DT)
    assert token_mean(values, empty, w, normalizer=0).item() == 0.0
    assert token_mean(values, empty, w, normalizer=torch.tensor(0.0)).item() == 0.0


# ----------------------------------------------------------------------------- Variant A


@pytest.mark.parametrize("surrogate", ["is", "ppo", "pg"])
@pytest.mark.parametrize("dual_clip", [3.0, None])
def test_sampled_token_loss_matches_reference(surrogate, dual_clip):
    x = sampled_inputs()
    w = weights()
    kw = {"clip_low": 0.1, "clip_high": 0.15, "dual_clip": dual_clip}
    loss, metrics = sampled_token_loss(*x.values(), MASK, w, surrogate=surrogate, **kw)
    ref = ref_sampled(*x.values(), MASK, w, surrogate, normalizer=None, **kw)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    lp = x["student_lp_B_T"]
    torch.testing.assert_close(grad_of(loss, lp), grad_of(ref, lp))
    assert metrics["loss/pg"] == pytest.approx(loss.item())
    assert metrics["loss/tokens"] == 6.0
    ratios = [
        math.exp(float(lp[b, t].detach() - x["behavior_lp_B_T"][b, t]))
        for b, t in valid_positions(MASK)
    ]
    assert metrics["loss/ratio_mean"] == pytest.approx(sum(ratios) / 6)
    assert metrics["loss/ratio_max"] == pytest.approx(max(ratios))
    adv = [float(x["advantages_B_T"][b, t]) for b, t in valid_positions(MASK)]
    assert metrics["loss/advantage_mean"] == pytest.approx(sum(adv) / 6)
    assert all(type(v) is float for v in metrics.values())


def test_sampled_surrogates_share_gradient_on_policy():
    x = sampled_inputs(seed=3)
    lp = x["student_lp_B_T"]
    grads = {}
    for surrogate in ("is", "ppo", "pg"):
        loss, metrics = sampled_token_loss(
            lp, lp.detach(), x["advantages_B_T"], MASK, weights(), surrogate=surrogate
        )
        grads[surrogate] = grad_of(loss, lp)
        assert metrics["loss/ratio_mean"] == pytest.approx(1.0)
        assert metrics["loss/clipfrac"] == 0.0
    expected = -x["advantages_B_T"] * weights() * MASK / MASK.sum()
    for g in grads.values():
        torch.testing.assert_close(g, expected)


def test_ppo_clipping_hand_made_ratios():
    # one token per case: (ratio, advantage) -> expected per-token loss, gradient nonzero?
    cases = [
        (1.5, 1.0, -1.2, False),  # above 1+eps with A>0: clipped
        (0.5, 1.0, -0.5, True),  # below 1-eps with A>0: unclipped is larger
        (0.5, -1.0, 0.8, False),  # below 1-eps with A<0: clipped
        (5.0, -1.0, 3.0, False),  # huge ratio with A<0: dual clip at c*|A|
        (1.1, -2.0, 2.2, True),  # inside the range
    ]
    behavior = torch.full((1, len(cases)), -1.0, dtype=DT)
    lp = (behavior + torch.tensor([[math.log(c[0]) for c in cases]], dtype=DT)).requires_grad_(True)
    adv = torch.tensor([[c[1] for c in cases]], dtype=DT)
    for i, (_, _, expected, has_grad) in enumerate(cases):
        mask = torch.zeros(1, len(cases), dtype=DT)
        mask[0, i] = 1
        loss, _ = sampled_token_loss(lp, behavior, adv, mask, surrogate="ppo")
        assert loss.item() == pytest.approx(expected)
        assert (grad_of(loss, lp)[0, i] != 0).item() == has_grad
    full = torch.ones(1, len(cases), dtype=DT)
    loss, metrics = sampled_token_loss(lp, behavior, adv, full, surrogate="ppo")
    # verl counts the PPO clip only; the dual-clipped token (ratio 5) is not in clipfrac
    assert metrics["loss/clipfrac"] == pytest.approx(2 / 5)
    assert loss.item() == pytest.approx(sum(c[2] for c in cases) / 5)
    no_dual, _ = sampled_token_loss(lp, behavior, adv, full, surrogate="ppo", dual_clip=None)
    assert no_dual.item() == pytest.approx((sum(c[2] for c in cases) - 3.0 + 5.0) / 5)


def test_sampled_constants_get_no_gradient():
    x = sampled_inputs()
    beh = x["behavior_lp_B_T"].clone().requires_grad_(True)
    adv = x["advantages_B_T"].clone().requires_grad_(True)
    loss, _ = sampled_token_loss(x["student_lp_B_T"], beh, adv, MASK, surrogate="ppo")
    loss.backward()
    assert beh.grad is None and adv.grad is None
    assert x["student_lp_B_T"].grad.abs().sum() > 0


# ----------------------------------------------------------------------------- Variant B


@pytest.mark.parametrize("mode", ["student_p", "teacher_p", "none"])
def test_topk_pg_matches_reference(mode):
    x = topk_inputs()
    w = weights()
    loss, metrics = topk_pg_loss(
        *x.values(), MASK, w, weight_mode=mode, clip_low=0.1, clip_high=0.2
    )
    ref, ref_rkl = ref_topk(*x.values(), MASK, w, mode, 0.1, 0.2)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    lp = x["student_topk_lp_B_T_K"]
    torch.testing.assert_close(grad_of(loss, lp), grad_of(ref, lp))
    assert metrics["loss/topk_pg"] == pytest.approx(loss.item())
    assert metrics["loss/topk_rkl"] == pytest.approx(ref_rkl)
    assert metrics["loss/tokens"] == 6.0


def test_topk_weight_modes_differ():
    x = topk_inputs(seed=4)
    losses = {
        m: topk_pg_loss(*x.values(), MASK, weight_mode=m)[0].item()
        for m in ("student_p", "teacher_p", "none")
    }
    assert len({round(v, 9) for v in losses.values()}) == 3


def test_invariant3_full_vocab_pg_has_analytic_rkl_gradient():
    z = randn(B, T, V, seed=11, scale=2.0).requires_grad_(True)
    zt = randn(B, T, V, seed=12, scale=2.0)
    lp = F.log_softmax(z, -1)
    pg, _ = topk_pg_loss(
        lp, lp.detach(), F.log_softmax(zt, -1), MASK, weights(), weight_mode="student_p"
    )
    rkl, _ = analytic_rkl_loss(z, zt, MASK, weights(), support="full")
    g_pg, g_rkl = grad_of(pg, z), grad_of(rkl, z)
    assert g_rkl.abs().max() > 1e-3
    torch.testing.assert_close(g_pg, g_rkl)
    # the equality needs all V candidates: on K < V of them the gradients differ
    pg_k, _ = topk_pg_loss(lp[..., :K], lp[..., :K].detach(), F.log_softmax(zt, -1)[..., :K], MASK)
    assert not torch.allclose(grad_of(pg_k, z), grad_of(analytic_rkl_loss(z, zt, MASK)[0], z))


# ----------------------------------------------------------------------------- Variants C-E


@pytest.mark.parametrize("kind", ["rkl", "fkl", "jsd"])
@pytest.mark.parametrize(("support", "tail"), SUPPORTS)
def test_analytic_losses_match_reference(kind, support, tail):
    x = logit_inputs()
    zs, zt = x.values()
    w = weights()
    kw = {"beta": 0.3, "temperature": 0.7} if kind == "jsd" else {}
    loss, metrics = ANALYTIC[kind](zs, zt, MASK, w, support=support, k=K, tail_bucket=tail, **kw)
    ref = ref_analytic(kind, zs, zt, MASK, w, support, K, tail, **kw)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(grad_of(loss, zs), grad_of(ref, zs))
    assert metrics[f"loss/{kind}"] == pytest.approx(loss.item())
    assert metrics["loss/tokens"] == 6.0


def test_full_support_equals_torch_kl_div():
    zs, zt = logit_inputs(seed=2).values()
    lps, lpt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    rkl = (F.kl_div(lpt, lps, reduction="none", log_target=True).sum(-1) * MASK).sum() / MASK.sum()
    fkl = (F.kl_div(lps, lpt, reduction="none", log_target=True).sum(-1) * MASK).sum() / MASK.sum()
    assert analytic_rkl_loss(zs, zt, MASK)[0].item() == pytest.approx(rkl.item())
    assert forward_kl_loss(zs, zt, MASK)[0].item() == pytest.approx(fkl.item())


@pytest.mark.parametrize("kind", ["rkl", "fkl", "jsd"])
@pytest.mark.parametrize("tail", [False, True])
def test_topk_support_covering_vocab_equals_full(kind, tail):
    zs, zt = logit_inputs(seed=6).values()
    full, _ = ANALYTIC[kind](zs, zt, MASK)
    for support in ("student_topk", "teacher_topk"):
        loss, _ = ANALYTIC[kind](zs, zt, MASK, support=support, k=V + 2, tail_bucket=tail)
        assert loss.item() == pytest.approx(full.item(), rel=1e-9)
        g = grad_of(loss, zs)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, grad_of(full, zs))


def test_tail_bucket_changes_truncated_objective():
    zs, zt = logit_inputs(seed=8).values()
    plain, _ = analytic_rkl_loss(zs, zt, MASK, support="teacher_topk", k=2)
    tail, _ = analytic_rkl_loss(zs, zt, MASK, support="teacher_topk", k=2, tail_bucket=True)
    assert abs(plain.item() - tail.item()) > 1e-4


def test_analytic_teacher_gets_no_gradient():
    zs, zt = logit_inputs().values()
    zt = zt.clone().requires_grad_(True)
    for fn in ANALYTIC.values():
        fn(zs, zt, MASK, support="teacher_topk", k=K, tail_bucket=True)[0].backward()
    assert zt.grad is None


@pytest.mark.parametrize("kind", ["rkl", "fkl", "jsd"])
@pytest.mark.parametrize(("support", "tail"), SUPPORTS)
@pytest.mark.parametrize("k", [K, V])
def test_neg_inf_vocab_entries_at_valid_positions(kind, support, tail, k):
    # a vocab id both models rule out (logit -inf) must act as if it were not in the vocab;
    # k = V leaves only that id outside a top-k support, i.e. a tail holding exactly zero mass
    zs, zt = logit_inputs(seed=9).values()
    zs_inf = torch.cat([torch.full((B, T, 1), -math.inf, dtype=DT), zs.detach()], -1)
    zs_inf.requires_grad_(True)
    zt_inf = torch.cat([torch.full((B, T, 1), -math.inf, dtype=DT), zt], -1)
    kw = {"support": support, "k": k, "tail_bucket": tail}
    loss, _ = ANALYTIC[kind](zs_inf, zt_inf, MASK, **kw)
    ref, _ = ANALYTIC[kind](zs, zt, MASK, **kw)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    g = grad_of(loss, zs_inf)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g[..., 1:], grad_of(ref, zs))


@pytest.mark.parametrize(("support", "tail"), SUPPORTS)
def test_invariant2_jsd_endpoints_are_the_kls(support, tail):
    zs, zt = logit_inputs(seed=13).values()
    kw = {"support": support, "k": K, "tail_bucket": tail}
    fkl, _ = forward_kl_loss(zs, zt, MASK, weights(), **kw)
    rkl, _ = analytic_rkl_loss(zs, zt, MASK, weights(), **kw)
    jsd0, _ = generalized_jsd_loss(zs, zt, MASK, weights(), beta=0.0, **kw)
    jsd1, _ = generalized_jsd_loss(zs, zt, MASK, weights(), beta=1.0, **kw)
    assert jsd0.item() == fkl.item()
    assert jsd1.item() == rkl.item()
    torch.testing.assert_close(grad_of(jsd0, zs), grad_of(fkl, zs), rtol=0, atol=0)
    torch.testing.assert_close(grad_of(jsd1, zs), grad_of(rkl, zs), rtol=0, atol=0)
    assert abs(fkl.item() - rkl.item()) > 1e-3


logits_V = st.lists(st.floats(-6, 6, allow_nan=False), min_size=V, max_size=V)


@settings(max_examples=30, deadline=1000)
@given(zs=logits_V, zt=logits_V, beta=st.floats(0.01, 0.99), shift=st.floats(-3, 3))
def test_invariant2_jsd_nonnegative_and_zero_iff_equal(zs, zt, beta, shift):
    zs_t = torch.tensor(zs, dtype=DT).reshape(1, 1, V)
    zt_t = torch.tensor(zt, dtype=DT).reshape(1, 1, V)
    mask = torch.ones(1, 1, dtype=DT)
    jsd = generalized_jsd_loss(zs_t, zt_t, mask, beta=beta)[0].item()
    l1 = (zs_t.softmax(-1) - zt_t.softmax(-1)).abs().sum().item()
    # Pinsker on both terms: JSD_beta >= beta (1 - beta) / 2 * ||p - q||_1^2 >= 0
    assert jsd >= beta * (1 - beta) / 2 * l1**2 - 1e-12
    same = generalized_jsd_loss(zs_t, zs_t + shift, mask, beta=beta)[0].item()
    assert abs(same) < 1e-12


# ----------------------------------------------------------------------------- shared behaviour


def inputs(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    if name == "sampled":
        return sampled_inputs(seed)
    return topk_inputs(seed) if name == "topk" else logit_inputs(seed)


def call(name, x=None, mask=MASK, w=None, normalizer=None, garbage=False, sl=None):
    """Run one loss on inputs ``x`` (default: fresh ones); returns (loss, metrics, student leaf)."""
    x = inputs(name) if x is None else x
    leaf = next(iter(x.values()))
    args = [v[sl] if sl is not None else v for v in x.values()]
    m = mask[sl] if sl is not None else mask
    if garbage:
        # garbage goes into fresh leaves, so a nan gradient at masked positions would show up
        bad = torch.tensor([math.nan, math.inf, -math.inf], dtype=DT)
        masked = m == 0
        idx = masked.nonzero(as_tuple=True)
        fill = bad[torch.arange(len(idx[0])) % 3]
        for i, a in enumerate(args):
            a = a.detach().clone()
            a[idx] = fill.reshape(-1, *([1] * (a.dim() - 2))).expand_as(a[idx])
            args[i] = a
        leaf = args[0].requires_grad_(True)
        if w is not None:
            w = torch.where(masked, math.nan, w)
    fn = {"sampled": sampled_token_loss, "topk": topk_pg_loss, **ANALYTIC}[name]
    kw = {"surrogate": "ppo"} if name == "sampled" else {}
    if name in ANALYTIC:
        kw = {"support": "student_topk", "k": K, "tail_bucket": True}
    loss, metrics = fn(*args, m, w, normalizer=normalizer, **kw)
    return loss, metrics, leaf


ALL = ["sampled", "topk", "rkl", "fkl", "jsd"]


@pytest.mark.parametrize("name", ALL)
def test_all_masked_batch_is_zero_with_a_graph(name):
    loss, metrics, leaf = call(name, mask=torch.zeros(B, T, dtype=DT), w=weights())
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))
    assert metrics["loss/tokens"] == 0.0
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", ALL)
def test_masked_garbage_does_not_leak(name):
    clean, clean_metrics, leaf_c = call(name, w=weights())
    dirty, dirty_metrics, leaf_d = call(name, w=weights(), garbage=True)
    assert math.isfinite(dirty.item())
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-12)
    g_clean, g_dirty = grad_of(clean, leaf_c), grad_of(dirty, leaf_d)
    assert torch.isfinite(g_dirty).all()
    torch.testing.assert_close(g_dirty, g_clean)
    assert g_dirty[2].abs().sum() == 0 and g_clean[0].abs().sum() > 0
    assert dirty_metrics == pytest.approx(clean_metrics)


@pytest.mark.parametrize("name", ALL)
def test_chunks_with_global_normalizer_sum_to_full_loss(name):
    w = weights()
    x = inputs(name)
    full, _, leaf = call(name, x, w=w)
    n = MASK.sum()
    first, _, _ = call(name, x, w=w[:1], normalizer=float(n), sl=slice(0, 1))
    second, _, _ = call(name, x, w=w[1:], normalizer=n, sl=slice(1, None))
    assert (first + second).item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(grad_of(first + second, leaf), grad_of(full, leaf))
    doubled, _, _ = call(name, w=2 * w)
    assert doubled.item() == pytest.approx(2 * full.item(), rel=1e-12)


def test_bool_and_float_masks_agree():
    a = analytic_rkl_loss(*logit_inputs().values(), MASK)[0]
    b = analytic_rkl_loss(*logit_inputs().values(), MASK.bool())[0]
    assert a.item() == b.item()


_zs, _zt = (t.detach() for t in logit_inputs().values())
_s = sampled_inputs()
_k = topk_inputs()


@pytest.mark.parametrize(
    ("thunk", "match"),
    [
        (lambda: sampled_token_loss(*_s.values(), MASK, surrogate="grpo"), r"'is', 'ppo', 'pg'"),
        (
            lambda: sampled_token_loss(*_s.values(), MASK, surrogate="ppo", dual_clip=1.0),
            "dual_clip",
        ),
        (
            lambda: sampled_token_loss(*_s.values(), MASK, surrogate="ppo", clip_low=-0.1),
            "clip_low",
        ),
        (lambda: sampled_token_loss(*_s.values(), MASK[:, :2]), "shape"),
        (lambda: topk_pg_loss(*_k.values(), MASK, weight_mode="teacher"), "student_p"),
        (lambda: topk_pg_loss(*_k.values(), MASK[:2]), "shape"),
        (lambda: analytic_rkl_loss(_zs, _zt, MASK, support="topk"), "teacher_topk"),
        (lambda: forward_kl_loss(_zs, _zt, MASK, support="student_topk", k=0), "k="),
        (lambda: forward_kl_loss(_zs, _zt[..., :3], MASK), "shape"),
        (lambda: generalized_jsd_loss(_zs, _zt, MASK, beta=1.5), r"\[0, 1\]"),
        (lambda: generalized_jsd_loss(_zs, _zt, MASK, beta=-0.1), r"\[0, 1\]"),
        (lambda: generalized_jsd_loss(_zs, _zt, MASK, temperature=0.0), "temperature"),
        (lambda: token_mean(_zs[..., 0], MASK, normalizer=-1.0), "normalizer"),
        (lambda: token_mean(_zs[..., 0], MASK, normalizer=math.nan), "normalizer"),
        (lambda: token_mean(_zs[..., 0], MASK, weights_B_T=MASK[:2]), "shape"),
    ],
)
def test_bad_arguments_raise(thunk, match):
    with pytest.raises(ValueError, match=match) as info:
        thunk()
    assert isinstance(info.value, ConfigError)
