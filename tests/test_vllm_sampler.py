"""The vLLM rollout engine's own logic on a fake engine (no vLLM needed): requests, the
RolloutBatch it builds, shards, weight pushes, and the refusals that come before any engine
starts. The same engine against real vLLM is in tests/test_vllm_real.py (make test-vllm)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opdcli.config import VLLMConfig
from opdcli.engines.types import GenerationControl, RowShard, SamplingParams
from opdcli.engines.vllm_engine import VLLMSampler, check_vllm_model, model_head_dim, sleep_enabled
from opdcli.errors import ConfigError
from opdcli.precision import mixed_precision


class FakeParams:
    def __init__(self, **kw):
        self.kw = kw


@dataclass
class FakeLLM:
    """Answers request r of n samples with tokens (10 + r, 11 + r, ...) of lengths 1..n; the
    last sample ends with EOS, the others run out of budget."""

    eos: int
    calls: list = field(default_factory=list)
    rpc: list = field(default_factory=list)
    resets: int = 0

    def generate(self, requests, params, use_tqdm=False):
        self.calls.append((requests, params))
        outs = []
        for r, (req, sp) in enumerate(zip(requests, params, strict=True)):
            samples = []
            for i in range(sp.kw["n"]):
                toks = [10 + r + j for j in range(i + 1)]
                reason = "length"
                if i == sp.kw["n"] - 1:
                    toks, reason = toks + [self.eos], "stop"
                lps = [{t: SimpleNamespace(logprob=-0.1 * (j + 1))} for j, t in enumerate(toks)]
                samples.append(SimpleNamespace(token_ids=toks, logprobs=lps, finish_reason=reason))
            outs.append(SimpleNamespace(prompt_token_ids=req["prompt_token_ids"], outputs=samples))
        return outs

    def collective_rpc(self, method, kwargs=None):
        self.rpc.append((method, kwargs))

    def reset_prefix_cache(self):
        self.resets += 1


def _sampler(toy_tokenizer, module=None, **vkw):
    llm = FakeLLM(toy_tokenizer.eos_token_id)
    s = VLLMSampler("unused", toy_tokenizer, VLLMConfig(**vkw), module=module, llm=llm, sampling_params_cls=FakeParams,
                    max_model_len=256)
    return s, llm


def test_rows_follow_the_hf_engines_layout(toy_tokenizer):
    s, llm = _sampler(toy_tokenizer)
    texts = ["<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\nHi<|im_end|>\n"]
    s.version = 3
    batch = s.sample(texts, SamplingParams(n=2, temperature=1.0, max_new_tokens=8))
    requests, params = llm.calls[0]
    enc = [toy_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert [r["prompt_token_ids"] for r in requests] == enc  # ids, unpadded, one request per prompt
    assert all(p.kw["n"] == 2 and p.kw["logprobs"] == 0 and p.kw["max_tokens"] == 8 and "seed" not in p.kw
               for p in params)
    assert batch.prompt_index_B == (0, 0, 1, 1) and batch.batch_size == 4
    P = batch.prompt_len
    assert P == max(map(len, enc))
    # left-padded prompts, then right-padded responses; EOS inside the mask
    assert batch.input_ids_B_L[2, P - len(enc[1]):P].tolist() == enc[1]
    assert batch.attention_mask_B_L[2, :P - len(enc[1])].sum() == 0
    eos = toy_tokenizer.eos_token_id
    assert batch.response_ids_B_T[0, :1].tolist() == [10] and batch.response_mask_B_T[0].tolist() == [1, 0, 0]
    assert batch.response_ids_B_T[1].tolist() == [10, 11, eos] and batch.response_mask_B_T[1].tolist() == [1, 1, 1]
    assert batch.response_ids_B_T[3].tolist() == [11, 12, eos]
    assert batch.finished_B.tolist() == [False, True, False, True]
    assert torch.allclose(batch.behavior_lp_B_T[1], torch.tensor([-0.1, -0.2, -0.3]))
    assert batch.behavior_lp_B_T[0, 1:].abs().sum() == 0
    assert batch.version_B.tolist() == [3, 3, 3, 3]
    assert torch.equal(batch.attention_mask_B_L[:, P:], batch.response_mask_B_T)


def test_a_shard_asks_only_for_its_rows_and_greedy_asks_once(toy_tokenizer):
    s, llm = _sampler(toy_tokenizer)
    texts = ["a", "b", "c"]
    batch = s.sample(texts, SamplingParams(n=2, max_new_tokens=4), shard=RowShard(1, 4, 6))
    requests, params = llm.calls[0]
    assert [p.kw["n"] for p in params] == [1, 2] and batch.prompt_index_B == (0, 1, 1)
    assert len(requests) == 2  # prompt 2 has no row in this shard
    greedy = s.sample(texts, SamplingParams(n=2, temperature=0.0, max_new_tokens=4))
    _, params = llm.calls[1]
    assert all(p.kw["n"] == 1 and p.kw["logprobs"] is None for p in params)
    assert torch.equal(greedy.response_ids_B_T[0], greedy.response_ids_B_T[1])  # one answer, repeated
    assert greedy.behavior_lp_B_T.abs().sum() == 0


def test_refusals_before_generation(toy_tokenizer):
    s, llm = _sampler(toy_tokenizer)
    with pytest.raises(ConfigError, match="max_model_len 256"):
        s.sample(["x"], SamplingParams(max_new_tokens=300))
    with pytest.raises(ConfigError, match="rollout.engine=hf"):
        s.sample(["x"], SamplingParams(), control=GenerationControl(8, stop=object()))
    assert llm.calls == []
    with pytest.raises(ConfigError, match="no sleep mode"):
        sleep_enabled(VLLMConfig(sleep=True), "cpu")
    assert sleep_enabled(VLLMConfig(), "cuda") and not sleep_enabled(VLLMConfig(), "cpu")
    assert not sleep_enabled(VLLMConfig(sleep=False), "cuda")


def test_weight_pushes(toy_tokenizer, tmp_path):
    from opdcli.loops.toy_build import init_model

    module = init_model(toy_tokenizer, 32, 1, 0)
    s, llm = _sampler(toy_tokenizer, module=module)
    s.sync_weights(None, 5)  # the mirrored module's weights, by reference
    method, kwargs = llm.rpc[-1]
    names = [k for k, _ in kwargs["weights_iterator"]]
    assert method == "reload_weights" and names == list(module.state_dict())
    assert llm.resets == 1 and s.version == 5
    new = {k: v + 1.0 for k, v in module.state_dict().items()}
    s.sync_weights(new, 6)  # a replica under torchrun: refreshed too
    assert torch.equal(module.state_dict()["model.norm.weight"], new["model.norm.weight"])
    mixed = mixed_precision(init_model(toy_tokenizer, 32, 1, 0), torch.bfloat16)  # float32 weights, bf16 engine
    m_sampler, m_llm = _sampler(toy_tokenizer, module=mixed)
    m_sampler.sync_weights(None, 1)
    assert {v.dtype for _, v in m_llm.rpc[-1][1]["weights_iterator"]} == {torch.bfloat16}  # half the bytes pushed
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}
    folder, f_llm = _sampler(toy_tokenizer, module=module, weight_sync="folder")
    seen = {}
    f_llm.collective_rpc = lambda method, kwargs=None: seen.update(
        method=method, files=sorted(p.name for p in Path(kwargs["weights_path"]).iterdir()))
    folder.sync_weights(None, 1)
    assert seen == {"method": "reload_weights", "files": ["model.safetensors"]}


def test_head_dim_check(tmp_path, toy_tokenizer):
    from tests.conftest import save_tiny_model

    odd = save_tiny_model(tmp_path / "odd", toy_tokenizer, 96, 1)  # head_dim 24
    assert model_head_dim(str(odd)) == 24
    with pytest.raises(ConfigError, match="head_dim 24, which vLLM's CPU attention backend does not run"):
        check_vllm_model(str(odd), "cpu", "student")
    check_vllm_model(str(odd), "cuda", "student")  # the GPU backends run it
    cfg = json.loads((odd / "config.json").read_text())
    cfg["head_dim"] = 32
    (odd / "config.json").write_text(json.dumps(cfg))
    check_vllm_model(str(odd), "cpu", "student")


def _opd(*args: str):
    import subprocess
    import sys

    exe = str(Path(sys.executable).parent / "opd")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def test_cli_refusals_are_one_line_and_come_before_any_model_loads(tmp_path):
    import importlib.util

    base = ["train", "--config", "configs/toy/opd.yaml", "--set", f"run.out_dir={tmp_path / 'r'}"]
    off = _opd(*base, "--set", "vllm.sleep=false")
    assert off.returncode != 0 and "vllm.sleep cannot take effect: no vLLM engine runs" in off.stderr
    assert "Traceback" not in off.stderr
    online = _opd(*base, "--set", "train.mode=async", "--method", "prune", "--set", "method.options.online=true")
    assert online.returncode != 0 and "Traceback" not in online.stderr
    assert "set train.mode=sync or method.options.online=false" in online.stderr
    if importlib.util.find_spec("vllm") is None:  # this environment: the install hint
        missing = _opd(*base, "--set", "rollout.engine=vllm")
        assert missing.returncode != 0 and "rollout.engine=vllm needs vLLM" in missing.stderr
        assert "Traceback" not in missing.stderr and not (tmp_path / "r").exists()
