"""f-OPD's pieces beyond the freshness arithmetic: the drift penalty (as a loss and inside every
objective), supervision drift against a worker's stored teacher scores, stored vs fresh
supervision, the adaptive coefficient and its state, and the refusals."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from opdcli.config import LossConfig, TrainRunConfig, load_config
from opdcli.engines.types import ScoredBatch
from opdcli.errors import ConfigError
from opdcli.freshness import drift_penalty_loss
from opdcli.methods import build_method
from opdcli.signals import sampled_advantage
from opdcli.validate import validate_train_config


def _lp(B=3, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 2
    beh = lp + 0.4 * torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    return lp, beh, mask


def test_drift_penalty_value_and_gradient_by_hand():
    lp, beh, mask = _lp()
    lp = lp.clone().requires_grad_(True)
    loss, metrics = drift_penalty_loss(lp, beh, mask, beta=0.3, normalizer=7.0)
    total = 0.0
    for b in range(3):
        for t in range(6):
            if mask[b, t]:
                d = float(lp[b, t].detach() - beh[b, t])
                total += math.exp(d) - 1 - d
    assert float(loss.detach()) == pytest.approx(0.3 * total / 7.0, rel=1e-6)
    assert metrics["loss/drift_penalty"] == pytest.approx(float(loss.detach()))
    loss.backward()
    for b in range(3):
        for t in range(6):
            d = float(lp[b, t].detach() - beh[b, t])
            want = 0.3 * (math.exp(d) - 1) / 7.0 if mask[b, t] else 0.0
            assert float(lp.grad[b, t]) == pytest.approx(want, abs=1e-7)
    with pytest.raises(ConfigError, match="beta"):
        drift_penalty_loss(lp, beh, mask, beta=-1.0)


@pytest.mark.parametrize("objective", ["sampled", "topk", "rkl"])
def test_every_objective_adds_the_drift_penalty_on_trained_tokens(objective, tiny_dirs, toy_tokenizer):
    """loss(beta) - loss(0) equals beta * sum k3 / n, with the student's log-probs taken from a plain
    forward over the whole sequence; the gradients differ by that term's gradient."""
    from transformers import AutoModelForCausalLM

    from opdcli.engines.hf_sampler import sample
    from opdcli.engines.hf_scorer import HFScorer, score_rollouts
    from opdcli.engines.types import SamplingParams
    from opdcli.objective import objective_loss

    torch.manual_seed(0)
    s = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"])
    t = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"]).eval()
    texts = ["<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"] * 2
    batch = sample(s, toy_tokenizer, texts, SamplingParams(n=2, max_new_tokens=9),
                   generator=torch.Generator().manual_seed(0))
    sc = score_rollouts(s, t, batch, k=4, chunk_tokens=4, batch_size=8, keep_teacher_hidden=True)
    stale = sc.behavior_lp_B_T + 0.5 * torch.randn(sc.behavior_lp_B_T.shape, generator=torch.Generator().manual_seed(1))
    sc = dataclasses.replace(sc, behavior_lp_B_T=stale)
    weights = sc.mask_B_T.clone()
    weights[0] = 0  # a dropped row is not penalised
    adv = sc.teacher_lp_B_T - sc.student_lp_B_T
    head = HFScorer(None, t, k=4, chunk_tokens=4, batch_size=8).teacher_logits
    n, beta = float(sc.mask_B_T.sum()), 0.7
    cfg = LossConfig(objective=objective, surrogate="pg")

    def run(b: float):
        s.zero_grad()
        loss, metrics = objective_loss(s, batch, sc, weights, adv, cfg, n, 4, teacher_logits=head, drift_penalty=b)
        loss.backward()
        return float(loss), metrics, torch.cat([p.grad.flatten() for p in s.parameters() if p.grad is not None])

    plain, _, g0 = run(0.0)
    with_pen, metrics, g1 = run(beta)
    # the slow reference: one plain forward, the response positions read off by hand
    s.zero_grad()
    P, T = batch.prompt_len, batch.response_len
    logits = s(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_mask_B_L).logits[:, P - 1:P - 1 + T]
    lp = logits.float().log_softmax(-1).gather(-1, batch.response_ids_B_T[..., None])[..., 0]
    trained = (sc.mask_B_T > 0) & (weights > 0)
    d = lp - stale
    ref = beta * ((torch.exp(d) - 1 - d) * trained).sum() / n
    ref.backward()
    g_ref = torch.cat([p.grad.flatten() for p in s.parameters() if p.grad is not None])
    assert float(ref) > 1e-3
    assert with_pen - plain == pytest.approx(float(ref), rel=1e-4)
    assert metrics["loss/drift_penalty"] == pytest.approx(float(ref), rel=1e-4)
    assert torch.allclose(g1 - g0, g_ref, atol=1e-5)


def _scored(stored: bool, B=4, T=5):
    g = torch.Generator().manual_seed(2)
    lp = -torch.rand(B, T, generator=g)
    beh = lp + 0.2 * torch.randn(B, T, generator=g)
    teacher = -torch.rand(B, T, generator=g)
    mask = torch.ones(B, T)
    mask[3, 2:] = 0
    ids = torch.zeros(B, T, 2, dtype=torch.long)
    top = torch.zeros(B, T, 2)
    return ScoredBatch(torch.zeros(B, T, dtype=torch.long), mask, beh, lp, teacher, ids, top, ids, top, top,
                       torch.zeros(B, dtype=torch.long),
                       stored_teacher_lp_B_T=teacher + 0.1 * torch.randn(B, T, generator=g) if stored else None)


def test_supervision_drift_compares_the_workers_advantage_with_the_fresh_one():
    s = _scored(stored=True)
    fresh = sampled_advantage(s.teacher_lp_B_T, s.student_lp_B_T, s.mask_B_T, 1.0, 0.0)
    method = build_method("fopd", {"tau_r": 0.0, "tau_s": 0.5, "importance": "none", "drift_target": None},
                          LossConfig(objective="sampled", surrogate="pg"))
    out = method.apply(s, fresh, 0)
    for b in range(4):
        diffs = [abs((float(s.stored_teacher_lp_B_T[b, t]) - float(s.behavior_lp_B_T[b, t]))
                     - (float(s.teacher_lp_B_T[b, t]) - float(s.student_lp_B_T[b, t])))
                 for t in range(5) if s.mask_B_T[b, t]]
        d_sup = sum(diffs) / len(diffs)
        assert out.trajectory_outputs["d_sup"][b] == pytest.approx(d_sup, rel=1e-5)
        assert out.trajectory_outputs["freshness"][b] == pytest.approx(math.exp(-d_sup / 0.5), rel=1e-5)
    assert out.advantages_B_T is None  # fresh supervision: the loop's recomputed advantage stands
    stored = build_method("fopd", {"supervision": "stored", "importance": "none"},
                          LossConfig(objective="sampled", surrogate="pg")).apply(s, fresh, 0)
    want = sampled_advantage(s.stored_teacher_lp_B_T, s.behavior_lp_B_T, s.mask_B_T, 1.0, 0.0)
    assert torch.allclose(stored.advantages_B_T, want)
    # no worker scoring: D_sup is 0 and stored supervision has nothing to train on
    plain = _scored(stored=False)
    assert method.apply(plain, fresh, 0).metrics["method/fopd/d_sup_mean"] == 0.0
    with pytest.raises(ConfigError, match="worker_scoring=true"):
        build_method("fopd", {"supervision": "stored", "importance": "none"},
                     LossConfig(objective="sampled", surrogate="pg")).apply(plain, fresh, 0)


def test_drift_coefficient_trains_this_batch_then_adapts_and_resumes():
    s = _scored(stored=False)
    fresh = sampled_advantage(s.teacher_lp_B_T, s.student_lp_B_T, s.mask_B_T, 1.0, 0.0)
    rkl = LossConfig(objective="rkl")
    method = build_method("fopd", {"drift_target": 1e-4, "beta_init": 0.0, "f_min": 0.0}, rkl)
    betas = [method.apply(s, fresh, 0).drift_penalty for _ in range(4)]
    assert betas == [0.0, 1e-3, 2e-3, 4e-3]  # drift above target: 0 -> floor -> doubling
    state = method.state_dict()
    again = build_method("fopd", {"drift_target": 1e-4}, rkl)
    again.load_state_dict(state)
    assert again.apply(s, fresh, 0).drift_penalty == 8e-3
    calm = build_method("fopd", {"drift_target": 10.0, "beta_init": 0.5}, rkl)
    assert [calm.apply(s, fresh, 0).drift_penalty for _ in range(3)] == [0.5, 0.25, 0.125]
    off = build_method("fopd", {"drift_target": None}, rkl)
    out = off.apply(s, fresh, 0)
    assert out.drift_penalty == 0.0 and "method/fopd/drift_beta" not in out.metrics and off.state_dict() == {}


def test_importance_follows_the_objective():
    """auto: the sampled token's ratio for sampled + pg, nothing for a distribution-level loss;
    prefix: the earlier tokens' product for any objective; token refused where it corrects nothing."""
    from opdcli.freshness import prefix_ratio, truncated_ratio

    s = _scored(stored=False)
    fresh = sampled_advantage(s.teacher_lp_B_T, s.student_lp_B_T, s.mask_B_T, 1.0, 0.0)
    plain = {"tau_r": 0.0, "drift_target": None}

    def weights(opts, loss):
        return build_method("fopd", plain | opts, loss).apply(s, fresh, 0).weights_B_T

    m = s.mask_B_T
    pg, rkl = LossConfig(objective="sampled", surrogate="pg"), LossConfig(objective="rkl")
    token, _ = truncated_ratio(s.student_lp_B_T, s.behavior_lp_B_T, 2.0, m)
    assert torch.allclose(weights({}, pg), token)
    assert torch.allclose(weights({}, rkl), m)  # auto: no ratio on a full-distribution loss
    assert torch.allclose(weights({}, LossConfig(objective="sampled", surrogate="is")), m)  # the surrogate has it
    before, _ = prefix_ratio(s.student_lp_B_T, s.behavior_lp_B_T, 1.5, m, include_current=False)
    through, _ = prefix_ratio(s.student_lp_B_T, s.behavior_lp_B_T, 1.5, m, include_current=True)
    assert torch.allclose(weights({"importance": "prefix", "is_cap": 1.5}, rkl), before)
    assert torch.allclose(weights({"importance": "prefix", "is_cap": 1.5}, pg), through)
    assert not torch.allclose(before, through)
    out = build_method("fopd", plain | {"importance": "prefix"}, rkl).apply(s, fresh, 0)
    assert {"method/fopd/is_weight_mean", "method/fopd/is_clipfrac"} <= out.metrics.keys()
    with pytest.raises(ConfigError, match="importance=prefix"):
        build_method("fopd", {"importance": "token"}, rkl)
    with pytest.raises(ConfigError, match="loss.surrogate=pg"):
        build_method("fopd", {"importance": "token"}, LossConfig(objective="sampled", surrogate="ppo"))
    with pytest.raises(ConfigError, match="is_cap"):
        build_method("fopd", {"is_cap": None}, rkl)
    with pytest.raises(ConfigError, match="importance=none"):
        build_method("fopd", {"is_cap": 0.5}, rkl)
    with pytest.raises(ConfigError, match="beta_max"):
        build_method("fopd", {"beta_max": 0.0}, rkl)


def test_fopd_refusals():
    with pytest.raises(ConfigError, match="loss.objective=sampled"):
        build_method("fopd", {"supervision": "stored"}, LossConfig(objective="rkl"))
    with pytest.raises(ConfigError, match="drift_target"):
        build_method("fopd", {"drift_target": 0.0}, LossConfig(objective="rkl"))
    cfg, explicit = load_config(TrainRunConfig, None, ["method.name=fopd", "method.options.supervision=stored",
                                                       "train.mode=async"])
    with pytest.raises(ConfigError, match="asynchronous.worker_scoring=true"):
        validate_train_config(cfg, explicit)
    cfg, explicit = load_config(TrainRunConfig, None, ["method.name=fopd", "rollout.temperature=0.7"])
    with pytest.raises(ConfigError, match="temperature"):
        validate_train_config(cfg, explicit)
    cfg, explicit = load_config(TrainRunConfig, None, ["train.mode=async", "asynchronous.max_restarts=-1"])
    with pytest.raises(ConfigError, match="max_restarts"):
        validate_train_config(cfg, explicit)


def test_the_drift_penalty_reads_the_whole_batch_so_dropping_every_sample_raises_beta():
    """The drop removes the most drifted samples; the controller must not read the kept ones'
    (smaller) drift, and with nothing kept it must not read 0 and relax the penalty."""
    s = _scored(stored=False)
    fresh = sampled_advantage(s.teacher_lp_B_T, s.student_lp_B_T, s.mask_B_T, 1.0, 0.0)
    method = build_method("fopd", {"tau_r": 1e-6, "f_min": 0.5, "drift_target": 1e-4, "beta_init": 0.5},
                          LossConfig(objective="rkl"))
    out = method.apply(s, fresh, 0)
    assert out.metrics["method/fopd/dropped_frac"] == 1.0  # freshness ~0 for every sample
    assert out.metrics["method/fopd/d_roll_mean"] > 1e-4
    assert out.metrics["method/fopd/drift_beta_next"] == 1.0  # doubled (to its ceiling), not halved


def test_a_step_that_keeps_no_token_applies_no_update(tiny_dirs, toy_tokenizer):
    """AdamW with a zero gradient still moves the weights along its momentum and weight decay;
    stages.learn takes no optimizer step when every weight is 0 (all samples dropped)."""
    from transformers import AutoModelForCausalLM

    from opdcli import stages
    from opdcli.dist import ALONE
    from opdcli.engines.hf_sampler import sample
    from opdcli.engines.hf_scorer import HFScorer, score_rollouts
    from opdcli.engines.types import SamplingParams
    from opdcli.learner import Learner
    from opdcli.methods.base import MethodOutput

    torch.manual_seed(0)
    s = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"])
    t = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"]).eval()
    batch = sample(s, toy_tokenizer, ["<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"],
                   SamplingParams(n=4, max_new_tokens=9), generator=torch.Generator().manual_seed(0))
    sc = score_rollouts(s, t, batch, k=4, chunk_tokens=4, batch_size=8, keep_teacher_hidden=True)
    cfg, _ = load_config(TrainRunConfig, None, ["loss.objective=rkl", "optim.weight_decay=0.1"])
    learner = Learner(s, cfg.optim, ALONE)
    scorer = HFScorer(learner.module, t, k=4, chunk_tokens=4, batch_size=8)
    full = MethodOutput(weights_B_T=sc.mask_B_T.clone(), metrics={})
    moved = stages.learn(learner, scorer, batch, sc, full, cfg, 0, ALONE)  # builds AdamW momentum
    assert moved["train/tokens_trained"] > 0 and "optim/empty_step" not in moved
    before = [p.detach().clone() for p in s.parameters()]
    empty = MethodOutput(weights_B_T=torch.zeros_like(sc.mask_B_T), metrics={})
    out = stages.learn(learner, scorer, batch, sc, empty, cfg, 1, ALONE)
    assert out["train/tokens_trained"] == 0 and out["optim/empty_step"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, s.parameters(), strict=True))
