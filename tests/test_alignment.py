"""The off-by-one that silently destroys the signal: log-prob at t comes from logits at t-1.

A mock LM whose logits at position i put almost all mass on token (ids[i] + 1) % V makes the
alignment visible: on a response that counts upward, correctly aligned log-probs are ~0 and a
shift by one makes them very negative. A tiny real Qwen3 model pins the same against a
straightforward full-logits computation.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from opdcli.engines.hf_scorer import score_rollouts
from opdcli.engines.types import RolloutBatch
from opdcli.lm import response_hidden, token_stats

V = 11


class CountingLM(torch.nn.Module):
    """hidden = one-hot of the input token; lm_head maps token i to a peak at i + 1."""

    def __init__(self) -> None:
        super().__init__()
        head = torch.full((V, V), -20.0)
        for i in range(V):
            head[(i + 1) % V, i] = 20.0
        self.head = torch.nn.Linear(V, V, bias=False)
        self.head.weight.data = head
        self.base_model = self._base

    def _base(self, input_ids, attention_mask, position_ids):
        return SimpleNamespace(last_hidden_state=torch.nn.functional.one_hot(input_ids, V).float())

    def get_output_embeddings(self):
        return self.head


def _batch(prompt: list[list[int]], response: list[list[int]], mask: list[list[int]]) -> RolloutBatch:
    ids = torch.tensor([p + r for p, r in zip(prompt, response, strict=True)])
    resp, m = torch.tensor(response), torch.tensor(mask)
    am = torch.cat([torch.ones(len(prompt), len(prompt[0]), dtype=torch.long), m], 1)
    return RolloutBatch(ids, am, len(prompt[0]), resp, m, torch.zeros(resp.shape), torch.ones(len(prompt), dtype=torch.bool),
                        tuple(range(len(prompt))), tuple("p" for _ in prompt))


def test_logprob_at_t_comes_from_logits_at_t_minus_one():
    lm = CountingLM()
    batch = _batch([[1, 2, 3], [4, 5, 6]], [[4, 5, 6, 7], [7, 8, 9, 0]], [[1, 1, 1, 1], [1, 1, 1, 0]])
    stats = token_stats(response_hidden(lm, batch), lm.head, batch.response_ids_B_T, 2, chunk_tokens=3)
    assert stats.lp_B_T.shape == (2, 4)
    assert torch.all(stats.lp_B_T[batch.response_mask_B_T.bool()] > -1e-6)
    # the student's argmax at t is the next token in the count, i.e. response[t]
    valid = batch.response_mask_B_T.bool()
    assert torch.equal(stats.topk_ids_B_T_K[..., 0][valid], batch.response_ids_B_T[valid])
    # prompt ends in 4, response 5 5 5: only the first 5 follows its predecessor; reading the
    # logits at t instead of t-1 would score the first token badly and the rest well
    rep = _batch([[1, 2, 4]], [[5, 5, 5]], [[1, 1, 1]])
    lp = token_stats(response_hidden(lm, rep), lm.head, rep.response_ids_B_T, 1, 8).lp_B_T[0]
    assert lp[0] > -1e-6 and torch.all(lp[1:] < -30)


def test_tiny_qwen3_matches_full_logits_and_chunking_is_exact(tiny_dirs, toy_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"]).eval()
    g = torch.Generator().manual_seed(0)
    pad = toy_tokenizer.pad_token_id
    prompt = [[pad, pad, 5, 6, 7], [8, 9, 10, 11, 12]]  # left padding on row 0
    am_prompt = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    resp = torch.randint(4, 90, (2, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    resp = torch.where(mask.bool(), resp, torch.full_like(resp, pad))
    ids = torch.cat([torch.tensor(prompt), resp], 1)
    am = torch.cat([am_prompt, mask], 1)
    batch = RolloutBatch(ids, am, 5, resp, mask, torch.zeros(2, 6), torch.ones(2, dtype=torch.bool), (0, 1), ("a", "b"))
    with torch.no_grad():
        a = token_stats(response_hidden(model, batch), model.get_output_embeddings(), resp, 4, chunk_tokens=1)
        b = token_stats(response_hidden(model, batch), model.get_output_embeddings(), resp, 4, chunk_tokens=64)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        for row in range(2):  # reference: one unpadded sequence at a time, full logits
            keep = am[row].bool()
            seq = ids[row][keep][None]
            logits = model(input_ids=seq, position_ids=pos[row][keep][None] * 0 + torch.arange(seq.shape[1])).logits[0]
            lsm = logits.log_softmax(-1)
            n_prompt = int(am_prompt[row].sum())
            for t in range(int(mask[row].sum())):
                expected = lsm[n_prompt + t - 1, resp[row, t]]
                assert torch.allclose(a.lp_B_T[row, t], expected, atol=1e-4), (row, t)
    assert torch.allclose(a.lp_B_T, b.lp_B_T) and torch.equal(a.topk_ids_B_T_K, b.topk_ids_B_T_K)


def test_chunked_checkpointed_grads_equal_plain(tiny_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"]).train()
    resp = torch.tensor([[10, 11, 12, 13, 14]])
    ids = torch.cat([torch.tensor([[20, 21, 22]]), resp], 1)
    batch = RolloutBatch(ids, torch.ones_like(ids), 3, resp, torch.ones_like(resp), torch.zeros(1, 5),
                         torch.ones(1, dtype=torch.bool), (0,), ("a",))
    grads = []
    for chunk in (2, 100):
        model.zero_grad()
        st = token_stats(response_hidden(model, batch), model.get_output_embeddings(), resp, 3, chunk)
        st.lp_B_T.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert grads[0].abs().sum() > 0


def _two_rows() -> tuple[torch.Tensor, torch.Tensor, RolloutBatch]:
    """Two 2-token prompts with 3-token responses, all valid, sampled by policy version 7."""
    resp = torch.tensor([[10, 11, 12], [13, 14, 15]])
    ids = torch.cat([torch.tensor([[20, 21], [22, 23]]), resp], 1)
    batch = RolloutBatch(ids, torch.ones_like(ids), 2, resp, torch.ones_like(resp), torch.zeros(2, 3),
                         torch.ones(2, dtype=torch.bool), (0, 1), ("a", "b"), version_B=torch.tensor([7, 7]))
    return ids, resp, batch


def test_score_rollouts_teacher_on_student_topk_is_gathered(tiny_dirs):
    from transformers import AutoModelForCausalLM

    s = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"]).eval()
    t = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"]).eval()
    ids, resp, batch = _two_rows()
    sc = score_rollouts(s, t, batch, k=4, chunk_tokens=2, batch_size=1)
    with torch.no_grad():
        t_lsm = t(input_ids=ids).logits.log_softmax(-1)[:, 1:4]
    expected = t_lsm.gather(-1, sc.student_topk_ids_B_T_K)
    assert torch.allclose(sc.teacher_lp_on_student_topk_B_T_K, expected, atol=1e-5)
    assert torch.allclose(sc.teacher_lp_B_T, t_lsm.gather(-1, resp[..., None]).squeeze(-1), atol=1e-5)
    assert sc.version_B.tolist() == [7, 7]
    assert (sc.student_topk_lp_B_T_K[..., :-1] >= sc.student_topk_lp_B_T_K[..., 1:]).all()


def test_scorer_gives_the_student_on_the_teachers_top_k_only_when_asked(tiny_dirs):
    """TOPD's union divergence reads the student's log-probs of the teacher's top-K ids: the
    scorer gathers them from the student's full distribution at the same positions."""
    from transformers import AutoModelForCausalLM

    from opdcli.engines.hf_scorer import HFScorer

    s = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"]).eval()
    t = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"]).eval()
    ids, resp, batch = _two_rows()
    plain = HFScorer(s, t, k=4, chunk_tokens=2, batch_size=1).score(batch)
    assert plain.student_lp_on_teacher_topk_B_T_K is None
    sc = HFScorer(s, t, k=4, chunk_tokens=2, batch_size=1, student_on_teacher_topk=True).score(batch)
    with torch.no_grad():
        s_lsm = s(input_ids=ids).logits.log_softmax(-1)[:, 1:4]
    assert torch.allclose(sc.student_lp_on_teacher_topk_B_T_K, s_lsm.gather(-1, sc.teacher_topk_ids_B_T_K), atol=1e-5)
    assert torch.equal(sc.teacher_topk_ids_B_T_K, plain.teacher_topk_ids_B_T_K)
    assert torch.allclose(sc.student_lp_B_T, plain.student_lp_B_T)
