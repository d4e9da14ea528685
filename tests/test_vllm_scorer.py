"""Teacher scoring on vLLM, on a fake engine (no vLLM needed): prompt_logprobs parsed by hand,
requests built from each row's own prompt + response, and the refusals of what vLLM cannot
score. Against real vLLM: tests/test_vllm_real.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from opdcli.config import LossConfig, TrainRunConfig, load_config
from opdcli.engines.vllm_scorer import (
    InProcessTeacher,
    VLLMTeacherScorer,
    check_teacher_engine,
    parse_prompt_logprobs,
)
from opdcli.errors import ConfigError
from opdcli.methods import build_method


def _entry(pairs):
    """{id: (logprob, rank)} -> vLLM's {id: Logprob}."""
    return {i: SimpleNamespace(logprob=lp, rank=r) for i, (lp, r) in pairs.items()}


def _plain(entries):
    return [None if d is None else {t: (v.logprob, v.rank) for t, v in d.items()} for d in entries]


def test_parse_prompt_logprobs_by_hand():
    ids = [5, 7, 9]
    entries = [None,
               _entry({7: (-0.5, 1), 3: (-1.5, 2), 4: (-2.0, 3)}),
               _entry({9: (-4.0, 6), 1: (-0.1, 1), 2: (-2.5, 2), 8: (-3.0, 3)})]  # actual token outside top-3
    lp, top_ids, top_lp = parse_prompt_logprobs(_plain(entries), ids, 1, 2, 3)
    assert lp == [-0.5, -4.0]
    assert top_ids == [[7, 3, 4], [1, 2, 8]] and top_lp == [[-0.5, -1.5, -2.0], [-0.1, -2.5, -3.0]]


class FakeTeacherLLM:
    def __init__(self):
        self.requests = []

    def generate(self, requests, sp, use_tqdm=False):
        self.requests = requests
        outs = []
        for req in requests:
            ids = req["prompt_token_ids"]
            entries = [None] + [_entry({t: (-0.01 * t, 1 if t == 2 else 2), 2: (-0.02, 1)} if t != 2 else
                                       {2: (-0.02, 1), 3: (-0.03, 2)}) for t in ids[1:]]
            outs.append(SimpleNamespace(prompt_logprobs=entries))
        return outs


def test_teacher_scores_read_each_rows_response_positions():
    B, P, T = 2, 3, 3
    ids = torch.tensor([[0, 11, 12, 21, 22, 23], [13, 14, 15, 24, 25, 0]])
    am = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    rm = torch.tensor([[1, 1, 1], [1, 1, 0]])
    from opdcli.engines.types import RolloutBatch

    batch = RolloutBatch(ids, am, P, ids[:, P:], rm, torch.zeros(B, T), torch.ones(B, dtype=torch.bool), (0, 1),
                         ("a", "b"), version_B=torch.zeros(B, dtype=torch.long))
    llm = FakeTeacherLLM()
    scorer = VLLMTeacherScorer(SimpleNamespace(batch_size=8), InProcessTeacher(llm, lambda **kw: kw), k=2)
    lp, top_ids, top_lp = scorer.teacher_scores(batch)
    assert [r["prompt_token_ids"] for r in llm.requests] == [[11, 12, 21, 22, 23], [13, 14, 15, 24, 25]]
    assert torch.allclose(lp[0], torch.tensor([-0.21, -0.22, -0.23])) and lp[1].tolist()[2] == 0.0
    assert torch.allclose(lp[1, :2], torch.tensor([-0.24, -0.25]))
    assert top_ids[0, 0].tolist() == [2, 21] and torch.allclose(top_lp[0, 0], torch.tensor([-0.02, -0.21]))
    assert scorer.scored_tokens == 5
    with pytest.raises(ConfigError, match="teacher_engine=hf"):
        scorer.score(batch, keep_teacher_hidden=True)


@pytest.mark.parametrize(("sets", "match"), [
    (["loss.objective=rkl"], "loss.objective=rkl needs the teacher's logits"),
    (["loss.objective=topk"], "student's top-K ids"),
    (["loss.objective=sampled", "method.name=release"], "method 'release'"),
    (["loss.objective=sampled", "method.name=topd"], "method 'topd'"),
    (["loss.objective=sampled", "method.name=prune", "method.options.online=true"], "online truncation"),
    (["loss.objective=sampled", "scoring.top_k=32"], "vllm.max_logprobs"),
])
def test_refusals_before_any_model_loads(sets, match):
    cfg, _ = load_config(TrainRunConfig, None, ["scoring.teacher_engine=vllm", *sets])
    method = build_method(cfg.method.name, cfg.method.options, cfg.loss)
    with pytest.raises(ConfigError, match=match):
        check_teacher_engine(cfg, method)


def test_what_a_vllm_teacher_can_score_passes():
    for name in ("opd", "gopd", "prune", "fopd"):
        cfg, _ = load_config(TrainRunConfig, None, ["scoring.teacher_engine=vllm", "loss.objective=sampled",
                                                    f"method.name={name}"])
        method = build_method(name, cfg.method.options, LossConfig(objective="sampled"))
        check_teacher_engine(cfg, method)


def test_a_vllm_teacher_is_checked_but_not_loaded(tiny_dirs, tmp_path):
    import json
    import shutil

    from opdcli.errors import ModelError
    from opdcli.models import load_pair

    pair = load_pair(str(tiny_dirs["student"]), str(tiny_dirs["teacher"]), "cpu", "float32", load_teacher=False)
    assert pair.teacher is None and pair.student is not None
    wide = tmp_path / "wide"
    shutil.copytree(tiny_dirs["teacher"], wide)
    cfg = json.loads((wide / "config.json").read_text())
    cfg["vocab_size"] += 7  # a padded head: the same vocabulary
    (wide / "config.json").write_text(json.dumps(cfg))
    load_pair(str(tiny_dirs["student"]), str(wide), "cpu", "float32", load_teacher=False)
    cfg["vocab_size"] -= 14  # narrower than the tokenizer: ids it cannot score
    (wide / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="output logits but its tokenizer has"):
        load_pair(str(tiny_dirs["student"]), str(wide), "cpu", "float32", load_teacher=False)
