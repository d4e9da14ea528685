"""Prune-OPD online truncation scores each kept token with the teacher once: the follower that
runs the teacher along generation keeps its hidden states, and the scorer applies only the
teacher's head to them. The scores must equal a full teacher forward over the same tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from opdcli.engines.hf_sampler import HFSampler
from opdcli.engines.hf_scorer import HFScorer
from opdcli.engines.types import GenerationControl, SamplingParams
from opdcli.methods.prune_online import DriftStopRule

TEXTS = ["<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n",
         "<|im_start|>user\nCompute 37*4+5.<|im_end|>\n<|im_start|>assistant\n",
         "<|im_start|>user\nWhat is 9-3?<|im_end|>\n<|im_start|>assistant\n"]


class _BodyCalls:
    """Counts the tokens each call of a model's body sees."""

    def __init__(self, model) -> None:
        self.tokens: list[int] = []
        model.base_model.register_forward_hook(lambda mod, args, kwargs, out: self.tokens.append(
            int(kwargs["input_ids"].numel())), with_kwargs=True)


@pytest.fixture(scope="module")
def models(tiny_dirs):
    s = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"]).eval()
    t = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"]).eval()
    return s, t


@pytest.mark.parametrize(("chunk", "batch_size", "temperature", "theta"),
                         [(3, 8, 1.0, 0.7), (5, 2, 1.0, 0.7), (4, 8, 0.0, 0.7)])
def test_follower_hidden_states_give_the_full_forwards_scores(models, toy_tokenizer, chunk, batch_size, temperature,
                                                              theta):
    s, t = models
    rule = DriftStopRule(k=4, theta=theta, w_drop=0.1, chunk=chunk)
    params = SamplingParams(n=3, temperature=temperature, max_new_tokens=23, batch_size=batch_size)
    sampler = HFSampler(s, toy_tokenizer, generator=torch.Generator().manual_seed(1), follower=t)
    rollout = sampler.sample(TEXTS, params, control=GenerationControl(23, rule))
    assert rollout.teacher_hidden_B_T_H is not None
    assert rollout.teacher_hidden_B_T_H.shape[:2] == rollout.response_ids_B_T.shape
    assert rollout.stopped_B.any()
    if temperature > 0:  # rows that run to the budget are covered too (greedy rows repeat)
        assert not rollout.stopped_B.all()
    scorer = HFScorer(s, t, k=6, chunk_tokens=4, batch_size=4)
    calls = _BodyCalls(t)
    reused = scorer.score(rollout, keep_teacher_hidden=True)
    assert calls.tokens == [], "the teacher's body ran again on tokens the follower scored"
    fresh = scorer.score(dataclasses.replace(rollout, teacher_hidden_B_T_H=None), keep_teacher_hidden=True)
    assert calls.tokens, "the reference pass must run the teacher"
    m = rollout.response_mask_B_T.bool()
    for name in ("teacher_lp_B_T", "teacher_topk_lp_B_T_K", "teacher_lp_on_student_topk_B_T_K"):
        a, b = getattr(reused, name), getattr(fresh, name)
        assert torch.allclose(a[m], b[m], atol=1e-5), name
    assert torch.equal(reused.teacher_topk_ids_B_T_K[m][:, :3], fresh.teacher_topk_ids_B_T_K[m][:, :3])
    assert torch.allclose(reused.teacher_hidden_B_T_H[m], fresh.teacher_hidden_B_T_H[m], atol=1e-5)
    # every generated token was scored by the follower exactly once (the last partial chunk too)
    assert rollout.follower_tokens == int(m.sum())


def test_follower_stops_rows_as_before_and_drops_them_from_its_cache(models, toy_tokenizer):
    """The follower's decode batch shrinks as rows end, and what it scores is the tokens generated."""
    s, t = models
    rule = DriftStopRule(k=4, theta=0.7, w_drop=0.1, chunk=2)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=30, batch_size=12)
    calls = _BodyCalls(t)
    sampler = HFSampler(s, toy_tokenizer, generator=torch.Generator().manual_seed(3), follower=t)
    rollout = sampler.sample(TEXTS, params, control=GenerationControl(30, rule))
    chunk_rows = [n // 2 for n in calls.tokens[1:]]  # after the prompt pass, one call per chunk of 2
    assert chunk_rows == sorted(chunk_rows, reverse=True) and chunk_rows[-1] < 12
    lengths = rollout.response_mask_B_T.sum(-1)
    assert int(lengths.min()) < int(lengths.max())


def test_sampling_uses_the_current_cache_api(models, toy_tokenizer):
    """No deprecation warning from the decode loop or the follower (transformers renamed
    past_key_values to cache; the loop passes whichever the installed release takes)."""
    import warnings

    s, t = models
    sampler = HFSampler(s, toy_tokenizer, generator=torch.Generator().manual_seed(0), follower=t)
    rule = DriftStopRule(k=4, theta=0.7, w_drop=0.1, chunk=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        batch = sampler.sample(TEXTS, SamplingParams(n=2, max_new_tokens=12), control=GenerationControl(12, rule))
    assert int(batch.response_mask_B_T.sum()) > 0
