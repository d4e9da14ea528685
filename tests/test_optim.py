"""Learning-rate schedule, clipping, and gradient accumulation equivalence."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opdcli.config import OptimConfig
from opdcli.optim import build_optimizer, lr_at, optimizer_step


def test_warmup_then_decay_by_hand():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="linear", min_lr_ratio=0.0)
    assert [lr_at(s, cfg, 8) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(6, cfg, 8) == pytest.approx(0.5)
    assert lr_at(8, cfg, 8) == pytest.approx(0.0)
    cos = OptimConfig(lr=2.0, schedule="cosine", min_lr_ratio=0.5)
    assert lr_at(0, cos, 10) == pytest.approx(2.0) and lr_at(10, cos, 10) == pytest.approx(1.0)
    assert lr_at(5, OptimConfig(lr=1.0), 10) == 1.0
    mid = OptimConfig(lr=1.0, schedule="linear", schedule_steps=100)
    assert lr_at(50, mid, 50) == pytest.approx(0.5)  # stopping halfway through a longer schedule


def test_clipping_and_step():
    model = torch.nn.Linear(3, 1)
    opt = build_optimizer(model, OptimConfig(lr=0.1, grad_clip=0.5))
    (model(torch.ones(1, 3)) * 100).sum().backward()
    metrics = optimizer_step(model, opt, OptimConfig(lr=0.1, grad_clip=0.5), 0, 10)
    assert metrics["optim/grad_norm"] > 0.5 and metrics["optim/lr"] == 0.1
    assert all(p.grad is None for p in model.parameters())


def test_grad_accumulation_matches_one_batch(tiny_dirs, toy_tokenizer):
    """Micro-batches normalised by the step's token count give the full-batch gradient."""
    from transformers import AutoModelForCausalLM

    from opdcli.config import LossConfig
    from opdcli.engines.hf_sampler import sample
    from opdcli.engines.hf_scorer import HFScorer, score_rollouts
    from opdcli.engines.types import SamplingParams
    from opdcli.objective import objective_loss

    s = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"])
    t = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"]).eval()
    texts = ["<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"] * 2
    batch = sample(s, toy_tokenizer, texts, SamplingParams(n=2, max_new_tokens=9), generator=torch.Generator().manual_seed(0))
    sc = score_rollouts(s, t, batch, k=4, chunk_tokens=4, batch_size=8, keep_teacher_hidden=True)
    weights, adv = sc.mask_B_T, sc.teacher_lp_B_T - sc.student_lp_B_T
    head = HFScorer(None, t, k=4, chunk_tokens=4, batch_size=8).teacher_logits
    n = float(sc.mask_B_T.sum())
    for objective in ("rkl", "sampled"):
        grads = []
        for splits in ([slice(0, 4)], [slice(0, 1), slice(1, 4)]):
            s.zero_grad()
            for sl in splits:
                loss, _ = objective_loss(s, batch.rows(sl), sc.rows(sl), weights[sl], adv[sl],
                                         LossConfig(objective=objective), n, 4, teacher_logits=head)
                loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in s.parameters() if p.grad is not None]))
        assert torch.allclose(grads[0], grads[1], atol=1e-6), objective
        assert grads[0].abs().sum() > 0


def test_micro_batch_metrics_add_shares_max_maxima_and_average_means():
    """A metric that is a share of the step's sum adds up over micro-batches (grad_accum > 1 used
    to report the mean of the shares); maxima are maxed; means are averaged."""
    from opdcli.dist import ALONE
    from opdcli.stages import train_on

    w = torch.ones(4, requires_grad=True)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])

    def micro(sl, normalizer):
        loss = (w[sl] * values[sl]).sum() / normalizer
        return loss, {"loss/rkl": float(loss), "loss/ratio_max": float(values[sl].max()),
                      "loss/ratio_mean": float(values[sl].mean())}

    one = train_on(4, 4.0, 1, micro, ALONE)
    two = train_on(4, 4.0, 2, micro, ALONE)
    assert one["loss/rkl"] == pytest.approx(2.5) and two["loss/rkl"] == pytest.approx(2.5)
    assert two["loss/total"] == pytest.approx(2.5) and two["loss/ratio_max"] == 4.0
    assert two["loss/ratio_mean"] == pytest.approx((1.5 + 3.5) / 2)


def test_loss_dual_clip_reaches_the_objective(tiny_dirs, toy_tokenizer):
    """loss.dual_clip is the cap the ppo surrogate applies: with the sampler far less likely than
    the student (ratio e^2) and advantage -1 on every token, ppo's loss per token is rho = e^2;
    dual clip 3 caps it at 3, and null leaves it at e^2."""
    import math

    from transformers import AutoModelForCausalLM

    from opdcli.config import LossConfig
    from opdcli.engines.hf_sampler import sample
    from opdcli.engines.hf_scorer import score_rollouts
    from opdcli.engines.types import SamplingParams
    from opdcli.objective import objective_loss

    s = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"])
    t = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"]).eval()
    texts = ["<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"] * 2
    batch = sample(s, toy_tokenizer, texts, SamplingParams(n=2, max_new_tokens=6), generator=torch.Generator().manual_seed(0))
    sc = score_rollouts(s, t, batch, k=4, chunk_tokens=4, batch_size=8)
    far = dataclasses.replace(sc, behavior_lp_B_T=sc.student_lp_B_T - 2.0)
    adv = -torch.ones_like(sc.mask_B_T)
    n = float(sc.mask_B_T.sum())
    got = {}
    for cap in (3.0, 5.0, None):
        cfg = LossConfig(objective="sampled", surrogate="ppo", dual_clip=cap)
        got[cap], _ = objective_loss(s, batch, far, sc.mask_B_T, adv, cfg, n, 4)
    assert float(got[3.0]) == pytest.approx(3.0, rel=1e-4)
    assert float(got[5.0]) == pytest.approx(5.0, rel=1e-4)
    assert float(got[None]) == pytest.approx(math.exp(2.0), rel=1e-4)
