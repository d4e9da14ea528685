"""Prune-OPD weights, drift tests and dynamic budget on tiny hand-made tensors (methods.md §2)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opdcli.config import LossConfig
from opdcli.engines.types import ScoredBatch
from opdcli.errors import ConfigError
from opdcli.methods.base import METHODS, build_method
from opdcli.methods.prune import (
    PruneBudget,
    PruneOPD,
    effective_length,
    overlap_ratio,
    reliability_weights,
    top_p_accept_events,
)


def _scored(events_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> ScoredBatch:
    """A batch with K = 2 whose overlap is 0 exactly at `events` (student {0, 1}, teacher {0, 1} or {2, 3})."""
    B, T = events_B_T.shape
    g = torch.Generator().manual_seed(0)
    lp = lambda: -torch.rand(B, T, generator=g) * 3  # noqa: E731
    topk = lambda: -torch.rand(B, T, 2, generator=g).sort(-1).values  # noqa: E731
    student_ids = torch.tensor([0, 1]).expand(B, T, 2).clone()
    teacher_ids = student_ids + 2 * events_B_T.long()[..., None]
    return ScoredBatch(torch.zeros(B, T, dtype=torch.long), mask_B_T.float(), lp(), lp(), lp(), student_ids,
                       topk(), teacher_ids, topk(), topk(), torch.zeros(B, dtype=torch.long))


@st.composite
def _events_and_masks(draw):
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    cells = st.lists(st.booleans(), min_size=B * T, max_size=B * T)
    events = torch.tensor(draw(cells)).reshape(B, T)
    mask = torch.tensor(draw(cells)).reshape(B, T)
    return events, mask


@settings(max_examples=50, deadline=None)
@given(data=_events_and_masks(), w_drop=st.floats(0.0, 0.6), w_base=st.floats(0.0, 1.0))
def test_weights_are_monotone_and_bounded(data, w_drop, w_base):
    """methods.md §7 invariant 4: omega non-increasing on valid tokens, in [w_base, 1 + w_base], 0 off-mask."""
    events, mask = data
    method = build_method("prune", {"k": 2, "w_drop": w_drop, "w_base": w_base, "budget": False}, LossConfig())
    out = method.apply(_scored(events, mask), torch.zeros(events.shape), 0)
    w = out.weights_B_T
    assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
    for b in range(w.shape[0]):
        row = w[b][mask[b]].tolist()
        assert all(w_base - 1e-6 <= x <= 1 + w_base + 1e-6 for x in row)
        assert all(x >= y - 1e-6 for x, y in zip(row, row[1:], strict=False))
        n_events = int((events[b] & mask[b]).sum())
        if row:  # the last valid token carries every event of the row
            assert row[-1] == pytest.approx(max(0.0, 1 - w_drop * n_events) + w_base, abs=1e-5)
    assert out.token_outputs["drift"].sum() == (events & mask).sum()


def test_reliability_reaches_zero_after_one_over_w_drop_events():
    events = torch.ones(1, 101, dtype=torch.bool)
    w = reliability_weights(events, torch.ones(1, 101), 0.01)
    assert w[0, 0] == pytest.approx(0.99) and w[0, 98] > 0  # 99 events
    assert w[0, 99] == 0 and w[0, 100] == 0  # the 100th event (inclusive count) already decays to 0
    w4 = reliability_weights(torch.tensor([[0, 1, 1, 0, 1, 1, 0]]).bool(), torch.ones(1, 7), 0.25)
    assert w4.tolist() == [[1.0, 0.75, 0.5, 0.5, 0.25, 0.0, 0.0]]
    # events off-mask do not count
    masked = reliability_weights(torch.ones(1, 4, dtype=torch.bool), torch.tensor([[1, 0, 1, 0]]), 0.25)
    assert masked.tolist() == [[0.75, 0.0, 0.5, 0.0]]


def test_overlap_ratio_by_hand():
    student = torch.tensor([[[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]])
    teacher = torch.tensor([[[4, 3, 9, 8], [4, 3, 2, 1], [5, 6, 7, 8]]])
    assert overlap_ratio(student, teacher).tolist() == [[0.5, 1.0, 0.0]]


def test_top_p_accept_by_hand():
    probs = [0.05, 0.5, 0.1, 0.3]  # stored unsorted on purpose: sorted ids are 6, 8, 7, 5
    ids = torch.tensor([5, 6, 7, 8]).expand(1, 4, 4)
    lp = torch.tensor(probs).log().expand(1, 4, 4)
    sampled = torch.tensor([[6, 8, 7, 99]])
    # theta 0.7: the nucleus is {6, 8} (0.5 < 0.7 <= 0.8)
    assert top_p_accept_events(sampled, ids, lp, 0.7).tolist() == [[False, False, True, True]]
    # theta 0.4: only the top token
    assert top_p_accept_events(sampled, ids, lp, 0.4).tolist() == [[False, True, True, True]]
    # theta 0.99: the top-K (0.95) never reaches it, so all K are accepted; unseen tokens are not
    sampled_all = torch.tensor([[5, 7, 8, 99]])
    assert top_p_accept_events(sampled_all, ids, lp, 0.99).tolist() == [[False, False, False, True]]


def test_effective_length_by_hand():
    w = torch.tensor([[1.0, 0.5, 1e-9, 0.0, 0.0], [0.2, 0.0, 0.3, 0.3, 0.3]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    assert effective_length(w, mask, 1e-8).tolist() == [2, 2]
    assert effective_length(w, mask, 0.25).tolist() == [2, 1]


def test_budget_follows_hit_and_patience_rule():
    budget = PruneBudget(500, min_len=300, max_len=700, step=100, margin=100, hit_ratio=0.5, patience=2)
    lengths = [[450, 100], [550, 550], [650, 650], [100, 100], [100, 100], [499, 0], [0, 0],
               [0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [299, 0], [300, 0]]
    want = [  # (budget after the step, misses), computed by hand
        (600, 0),  # L 500, boundary 400: hit 0.5 >= 0.5 -> grow
        (700, 0),  # boundary 500: hit
        (700, 0),  # boundary 600: hit, clamped at max_len
        (700, 1),  # miss 1
        (600, 0),  # miss 2 = patience -> shrink
        (600, 1),  # boundary 500, 499 misses
        (500, 0),
        (500, 1), (400, 0), (400, 1), (300, 0),
        (300, 1), (300, 0),  # shrink clamped at min_len
        (300, 1),  # boundary max(300, 300 - 100) = 300: 299 misses
        (400, 0),  # 300 hits
    ]
    got = []
    for l_eff in lengths:
        before = budget.length
        info = budget.update(torch.tensor(l_eff))
        assert info["budget"] == before and info["next_budget"] == budget.length
        assert info["no_hit_steps"] == budget.misses
        got.append((budget.length, budget.misses))
    assert got == want


def test_max_new_tokens_returns_updated_budget_after_apply():
    options = {"k": 2, "w_drop": 1.0, "init_len": 10, "min_len": 2, "max_len": 20, "step": 3, "margin": 0,
               "hit_ratio": 0.5, "patience": 1}
    method = build_method("prune", options, LossConfig())
    assert method.max_new_tokens(10, 0) == 10
    T = 10
    clean = _scored(torch.zeros(2, T, dtype=torch.bool), torch.ones(2, T, dtype=torch.bool))
    out = method.apply(clean, torch.zeros(2, T), 0)
    assert out.trajectory_outputs["eff_len"] == [10, 10]
    assert out.metrics["method/prune/budget"] == 10 and out.metrics["method/prune/next_budget"] == 13
    assert method.max_new_tokens(10, 1) == 13
    drifting = _scored(torch.ones(2, T, dtype=torch.bool), torch.ones(2, T, dtype=torch.bool))
    out = method.apply(drifting, torch.zeros(2, T), 1)
    assert out.trajectory_outputs["eff_len"] == [0, 0] and out.metrics["method/prune/hit_ratio"] == 0
    assert method.max_new_tokens(10, 2) == 10
    static = build_method("prune", {**options, "budget": False}, LossConfig())
    static.apply(clean, torch.zeros(2, T), 0)
    assert static.max_new_tokens(10, 1) == 10 and static.state_dict() == {}


def test_unset_budget_window_takes_the_scripts_proportions_of_max_new_tokens():
    """The released scripts start at 2048 with min 1024, step and margin 100 under a 12288 cap;
    unset, the budget window scales the same way to the rollout's max_new_tokens, so it starts
    below its ceiling and can grow (the authors' function defaults start at the ceiling)."""
    from opdcli.methods.prune import PruneConfig, budget_window

    assert budget_window(PruneConfig(), 12288) == {"init_len": 2048, "min_len": 1024, "max_len": 12288,
                                                   "step": 100, "margin": 100}
    assert budget_window(PruneConfig(), 48) == {"init_len": 8, "min_len": 4, "max_len": 48, "step": 1, "margin": 1}
    assert budget_window(PruneConfig(max_len=600, step=7), 48) == {"init_len": 100, "min_len": 50, "max_len": 600,
                                                                   "step": 7, "margin": 7}
    assert budget_window(PruneConfig(min_len=30), 48)["init_len"] == 30  # never starts below min_len
    method = build_method("prune", {"k": 2, "w_drop": 1.0, "hit_ratio": 0.5, "patience": 1}, LossConfig())
    assert method.max_new_tokens(48, 0) == 8
    T = 48  # reliable over every generated token
    clean = _scored(torch.zeros(2, T, dtype=torch.bool), torch.ones(2, T, dtype=torch.bool))
    for step in range(3):  # a compatible pair: every sample reliable to the budget, which grows
        method.apply(clean, torch.zeros(2, T), step)
    assert method.max_new_tokens(48, 3) == 11


def test_state_dict_round_trip():
    options = {"k": 2, "w_drop": 1.0, "init_len": 30, "min_len": 4, "max_len": 50, "step": 5, "patience": 2}
    a = build_method("prune", options, LossConfig())
    assert a.max_new_tokens(8, 0) == 30
    miss = _scored(torch.ones(1, 6, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool))
    a.apply(miss, torch.zeros(1, 6), 0)  # one miss: counter 1, budget unchanged
    state = a.state_dict()
    b = build_method("prune", options, LossConfig())
    b.load_state_dict(state)
    assert b.state_dict() == state and b.max_new_tokens(8, 1) == 30
    a.apply(miss, torch.zeros(1, 6), 1)
    b.apply(miss, torch.zeros(1, 6), 1)  # the restored miss counter makes this the shrinking miss
    assert a.max_new_tokens(8, 2) == b.max_new_tokens(8, 2) == 25
    fresh = build_method("prune", options, LossConfig())
    fresh.load_state_dict({})
    assert fresh.max_new_tokens(8, 0) == 30


def test_registered_and_k_checked():
    assert METHODS["prune"] is PruneOPD
    method = build_method("prune", {}, LossConfig(objective="topk"))
    assert method.cfg.k == 16 and method.cfg.theta == 0.7 and method.cfg.w_base == 0.5
    batch = _scored(torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ConfigError, match="only 2 top-K entries"):
        method.apply(batch, torch.zeros(1, 3), 0)
    with pytest.raises(ConfigError, match="max_len"):
        build_method("prune", {"min_len": 64, "max_len": 32}, LossConfig())


def test_top_p_metric_through_the_method():
    probs = torch.tensor([0.6, 0.3]).log()
    batch = _scored(torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool))
    batch = ScoredBatch(**{**batch.__dict__, "response_ids_B_T": torch.tensor([[0, 1, 7]]),
                           "teacher_topk_lp_B_T_K": probs.expand(1, 3, 2)})
    method = build_method("prune", {"k": 2, "metric": "teacher_top_p_accept", "theta": 0.5, "w_drop": 0.5,
                                    "budget": False}, LossConfig())
    out = method.apply(batch, torch.zeros(1, 3), 0)
    assert out.token_outputs["drift"].tolist() == [[0.0, 1.0, 1.0]]
    assert out.weights_B_T.tolist() == [[1.5, 1.0, 0.5]]
    assert math.isclose(out.metrics["method/prune/drift_rate"], 2 / 3, rel_tol=1e-6)


@pytest.mark.parametrize(("metric", "theta"), [("overlap_ratio", 0.7), ("teacher_top_p_accept", 0.5)])
def test_online_truncation_stops_drifting_rows_and_matches_offline_events(tiny_dirs, toy_tokenizer, metric, theta):
    """With the student as its own teacher no overlap row drifts; with a different teacher and a
    tiny event budget rows stop early, and the event count matches offline scoring of the same
    tokens, for both drift metrics."""
    import torch
    from transformers import AutoModelForCausalLM

    from opdcli.engines.hf_sampler import HFSampler
    from opdcli.engines.hf_scorer import score_rollouts
    from opdcli.engines.types import GenerationControl, SamplingParams
    from opdcli.methods.prune import top_p_accept_events
    from opdcli.methods.prune_online import DriftStopRule
    from opdcli.signals import topk_overlap

    s = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"]).eval()
    t = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"]).eval()
    texts = ["<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"] * 3
    params = SamplingParams(n=1, max_new_tokens=24)
    control = GenerationControl(24, DriftStopRule(k=4, theta=theta, w_drop=0.5, chunk=3, metric=metric))

    def run(follower, ctl):
        sampler = HFSampler(s, toy_tokenizer, generator=torch.Generator().manual_seed(0), follower=follower)
        return sampler.sample(texts, params, control=ctl)

    if metric == "overlap_ratio":  # (a sampled token can fall outside even the student's own nucleus)
        own = run(s, control)
        assert not own.stopped_B.any() and own.follower_tokens > 0
    cut = run(t, control)
    full = run(None, None)
    assert full.stopped_B is None and full.follower_tokens == 0
    sc = score_rollouts(s, t, full, k=4, chunk_tokens=8, batch_size=8)
    if metric == "overlap_ratio":
        drift = topk_overlap(sc.student_topk_ids_B_T_K, sc.teacher_topk_ids_B_T_K) < theta
    else:
        drift = top_p_accept_events(sc.response_ids_B_T, sc.teacher_topk_ids_B_T_K, sc.teacher_topk_lp_B_T_K, theta)
    events = drift & (sc.mask_B_T > 0)
    cum = events.long().cumsum(-1)
    for b in range(3):
        n_cut = int(cut.response_mask_B_T[b].sum())
        assert torch.equal(cut.response_ids_B_T[b, :n_cut], full.response_ids_B_T[b, :n_cut])
        if bool(cut.stopped_B[b]):
            # stopped within one chunk after the second event (w_drop 0.5 -> 2 events)
            second = int((cum[b] >= 2).nonzero()[0])
            assert second < n_cut <= second + 3
        else:
            assert int(cum[b, n_cut - 1]) < 2
    assert int(cut.response_mask_B_T.sum()) < int(full.response_mask_B_T.sum())


def test_online_mode_warns_that_a_floor_makes_it_another_objective():
    """Offline Prune-OPD trains every token after reliability 0 at w_base; online mode never
    generates them. With w_base 0 the two agree on every generated token (the weights are
    causal), so only a floor warns."""
    import warnings

    with pytest.warns(UserWarning, match="w_base=0.5 are never generated"):
        build_method("prune", {"online": True}, LossConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        online = build_method("prune", {"online": True, "w_base": 0.0, "k": 2, "w_drop": 0.5, "budget": False},
                              LossConfig())
    offline = build_method("prune", {"w_base": 0.0, "k": 2, "w_drop": 0.5, "budget": False}, LossConfig())
    events = torch.tensor([[False, True, False, True, False, True, False, False]])
    full = offline.apply(_scored(events, torch.ones(1, 8, dtype=torch.bool)), torch.zeros(1, 8), 0).weights_B_T
    assert full[0].tolist() == [1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    cut = 5  # the online rule stops after the second event; a chunk lag of one more token
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, :cut] = True
    part = online.apply(_scored(events, mask), torch.zeros(1, 8), 0).weights_B_T
    assert torch.equal(part[0, :cut], full[0, :cut]) and part[0, cut:].abs().sum() == 0
