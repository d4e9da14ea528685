"""G-OPD / ExOPD advantages and prefix-OPD budgets, pinned on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from opdcli.config import LossConfig
from opdcli.engines.types import ScoredBatch
from opdcli.errors import ConfigError
from opdcli.methods import build_method
from opdcli.methods.gopd import gopd_advantage
from opdcli.signals import sampled_advantage


def _scored(B=2, T=5, K=4, ref=True, seed=0) -> ScoredBatch:
    g = torch.Generator().manual_seed(seed)
    lp = lambda: -torch.rand(B, T, generator=g) * 3  # noqa: E731
    topk = lambda: -torch.rand(B, T, K, generator=g).sort(-1).values  # noqa: E731
    ids = torch.randint(0, 50, (B, T, K), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float)[:B, :T]
    return ScoredBatch(torch.randint(0, 50, (B, T), generator=g), mask, lp(), lp(), lp(), ids, topk(), ids,
                       topk(), topk(), torch.zeros(B, dtype=torch.long), lp() if ref else None)


def test_gopd_matches_the_formula_by_hand():
    s = _scored()
    adv = gopd_advantage(s.teacher_lp_B_T, s.student_lp_B_T, s.ref_lp_B_T, s.mask_B_T, 1.25)
    for b in range(2):
        for t in range(5):
            if s.mask_B_T[b, t]:
                want = 1.25 * s.teacher_lp_B_T[b, t] - 0.25 * s.ref_lp_B_T[b, t] - s.student_lp_B_T[b, t]
                assert torch.isclose(adv[b, t], want)
            else:
                assert adv[b, t] == 0


def test_lambda_one_equals_plain_opd_and_ignores_the_reference():
    """methods.md §7 invariant 1."""
    s = _scored()
    plain = sampled_advantage(s.teacher_lp_B_T, s.student_lp_B_T, s.mask_B_T, 1.0, 0.0)
    method = build_method("gopd", {"lam": 1.0}, LossConfig())
    out_a = method.apply(s, plain, 0).advantages_B_T
    other_ref = ScoredBatch(**{**s.__dict__, "ref_lp_B_T": s.ref_lp_B_T * 5 - 3})
    out_b = method.apply(other_ref, plain, 0).advantages_B_T
    no_ref = ScoredBatch(**{**s.__dict__, "ref_lp_B_T": None})
    out_c = method.apply(no_ref, plain, 0).advantages_B_T
    assert torch.equal(out_a, plain) and torch.equal(out_b, plain) and torch.equal(out_c, plain)
    assert method.reference_model("student") is None


def test_lambda_above_one_depends_on_the_reference():
    s = _scored()
    method = build_method("exopd", {}, LossConfig())
    assert method.cfg.lam == 1.25 and method.reference_model("toy:student") == "toy:student"
    a = method.apply(s, torch.zeros(2, 5), 0).advantages_B_T
    b = method.apply(ScoredBatch(**{**s.__dict__, "ref_lp_B_T": s.ref_lp_B_T - 1}), torch.zeros(2, 5), 0).advantages_B_T
    assert not torch.allclose(a, b)
    assert build_method("gopd", {"reference": "/path/base"}, LossConfig()).reference_model("s") == "/path/base"


@pytest.mark.parametrize(("name", "options", "loss", "match"), [
    ("gopd", {}, LossConfig(objective="rkl"), "cannot be combined with loss.objective=rkl"),
    ("exopd", {"lam": 1.0}, LossConfig(), "must be > 1"),
    ("gopd", {"lam": -1.0}, LossConfig(), "must be > 0"),
    ("gopd", {"length": 4}, LossConfig(), "unknown config key 'method.options.length'"),
    ("prefix", {"schedule": "linear"}, LossConfig(), "needs method.options.final_length"),
    ("prefix", {"final_length": 9}, LossConfig(), "cannot take effect"),
])
def test_misuse_raises(name, options, loss, match):
    with pytest.raises(ConfigError, match=match):
        build_method(name, options, loss)


def test_prefix_budget_fixed_and_linear():
    fixed = build_method("prefix", {"length": 8}, LossConfig())
    assert [fixed.max_new_tokens(48, s) for s in (0, 50, 500)] == [8, 8, 8]
    assert fixed.max_new_tokens(4, 0) == 4  # never above the rollout budget
    ramp = build_method("prefix", {"length": 8, "schedule": "linear", "final_length": 28, "ramp_steps": 10},
                        LossConfig())
    assert [ramp.max_new_tokens(48, s) for s in (0, 5, 10, 20)] == [8, 18, 28, 28]
    s = _scored()
    assert torch.equal(fixed.apply(s, torch.zeros(2, 5), 0).weights_B_T, s.mask_B_T)
