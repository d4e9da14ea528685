"""The transformers sampling engine: filtering, masks, EOS, and behaviour log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from opdcli.engines.hf_sampler import decode_responses, process_logits, sample
from opdcli.engines.types import SamplingParams
from opdcli.lm import response_hidden, token_stats


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dirs["student"])
    return model, tok


PROMPTS = ["<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nCompute 13*4-7+2.<|im_end|>\n<|im_start|>assistant\n"]


def test_top_p_and_top_k_filtering_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = process_logits(logits, 1.0, 0.7, 0).isfinite()[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7, so the second token is needed too
    assert process_logits(logits, 1.0, 0.5, 0).isfinite()[0].tolist() == [True, False, False, False]
    assert process_logits(logits, 1.0, 1.0, 3).isfinite()[0].tolist() == [True, True, True, False]
    scaled = process_logits(logits, 0.5, 1.0, 0)
    assert torch.allclose(scaled, logits / 0.5)


def test_shapes_masks_and_eos(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    batch = sample(model, tok, PROMPTS, SamplingParams(n=3, max_new_tokens=12, batch_size=4), generator=g)
    assert batch.batch_size == 6 and batch.response_len <= 12
    assert batch.prompt_index_B == (0, 0, 0, 1, 1, 1)
    m = batch.response_mask_B_T
    # the mask is a prefix of ones; tokens after it are padding
    assert torch.all(m[:, 1:] <= m[:, :-1])
    assert torch.all(batch.response_ids_B_T[m == 0] == tok.pad_token_id)
    lengths = m.sum(-1)
    for b in range(6):
        last = batch.response_ids_B_T[b, lengths[b] - 1]
        assert bool(batch.finished_B[b]) == (int(last) == tok.eos_token_id)
        if not batch.finished_B[b]:
            assert lengths[b] == 12
    assert torch.all(batch.behavior_lp_B_T <= 0)
    assert len(decode_responses(tok, batch)) == 6


def _on_policy_lp(model, batch):
    with torch.no_grad():
        return token_stats(response_hidden(model, batch), model.get_output_embeddings(),
                           batch.response_ids_B_T, 1, 64).lp_B_T


def test_behavior_lp_equals_full_forward_at_temperature_one(tiny):
    """KV-cache loop with left padding gives the same log-probs as one full forward."""
    model, tok = tiny
    g = torch.Generator().manual_seed(1)
    batch = sample(model, tok, PROMPTS, SamplingParams(n=2, max_new_tokens=10), generator=g)
    lp = _on_policy_lp(model, batch)
    m = batch.response_mask_B_T.bool()
    assert torch.allclose(batch.behavior_lp_B_T[m], lp[m], atol=1e-4)


def test_behavior_lp_follows_temperature(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(2)
    batch = sample(model, tok, PROMPTS[:1], SamplingParams(n=1, temperature=0.5, max_new_tokens=1), generator=g)
    with torch.no_grad():
        logits = model(**tok(PROMPTS[:1], return_tensors="pt", add_special_tokens=False)).logits[0, -1]
    expected = (logits / 0.5).log_softmax(-1)[batch.response_ids_B_T[0, 0]]
    assert math.isclose(float(batch.behavior_lp_B_T[0, 0]), float(expected), abs_tol=1e-4)


def test_seeded_sampling_is_reproducible_and_greedy_is_deterministic(tiny):
    model, tok = tiny
    params = SamplingParams(n=2, max_new_tokens=8)
    a = sample(model, tok, PROMPTS, params, generator=torch.Generator().manual_seed(5))
    b = sample(model, tok, PROMPTS, params, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.response_ids_B_T, b.response_ids_B_T)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    assert torch.equal(sample(model, tok, PROMPTS, greedy).response_ids_B_T,
                       sample(model, tok, PROMPTS, greedy).response_ids_B_T)


def test_stop_fn_stops_rows(tiny):
    model, tok = tiny

    seen = []

    def factory(ids_B_P, am_B_P):
        def stop_after_three(t, tok_B, valid_B, logits_B_V):
            seen.append((t, tok_B.shape, logits_B_V.shape))
            return torch.full_like(valid_B, t >= 2)
        return stop_after_three

    batch = sample(model, tok, PROMPTS, SamplingParams(n=1, max_new_tokens=10), stop=factory,
                   generator=torch.Generator().manual_seed(0))
    assert int(batch.response_mask_B_T.sum(-1).max()) <= 3
    assert seen[0] == (0, (2,), (2, len(tok)))
