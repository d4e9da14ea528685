"""Generators: preset resolution, the vLLM generator on a fake engine (SamplingParams(n=k),
max_model_len check), enable_thinking through the chat template, and replay file formats."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from benchmarks.generators import ChatPrompt, GenParams, render_chat, resolve_params
from benchmarks.generators.replay import ReplayGenerator
from benchmarks.generators.vllm import VLLMGenerator
from opdcli.errors import ConfigError


def test_presets_then_bench_values_then_flags():
    bench = {"preset": "greedy", "n": 1, "max_tokens": 64}
    p = resolve_params(bench, None, {})
    assert (p.preset, p.temperature, p.max_tokens, p.n) == ("greedy", 0.0, 64, 1)
    p = resolve_params(bench, "qwen3-thinking", {"n": 4})
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.thinking, p.n) == (0.6, 0.95, 20, 32768, True, 4)
    p = resolve_params({"preset": "qwen3-thinking", "n": 16}, None, {"max_tokens": 100, "temperature": None})
    assert (p.n, p.max_tokens, p.temperature) == (16, 100, 0.6)
    nothink = resolve_params({}, "qwen3-nothink", {})
    assert (nothink.temperature, nothink.top_p, nothink.thinking) == (0.7, 0.8, False)
    with pytest.raises(ConfigError, match="unknown sampling preset 'qwen4'"):
        resolve_params(bench, "qwen4", {})
    with pytest.raises(ConfigError, match="--top-p"):
        resolve_params(bench, None, {"top_p": 0.0})


@dataclass
class FakeOut:
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class FakeRequestOutput:
    outputs: list[FakeOut]


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeTokenizer:
    chat_template = "{% if enable_thinking %}...{% endif %}"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, **kwargs):
        think = "<think>\n" if kwargs.get("enable_thinking") else ""
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>" + think

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}


@dataclass
class FakeEngine:
    max_len: int = 64
    calls: list = field(default_factory=list)

    def get_tokenizer(self):
        return FakeTokenizer()

    @property
    def llm_engine(self):
        return type("E", (), {"model_config": type("C", (), {"max_model_len": self.max_len})()})()

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        n = params.kwargs["n"]
        return [FakeRequestOutput([FakeOut(f"</think>\\boxed{{{i}}}", [1, 2, 3], "length" if i == 0 else "stop")
                                   for i in range(n)]) for _ in prompts]


@pytest.mark.parametrize("platform", ["cuda", "cpu"])
def test_vllm_generator_one_request_per_prompt_with_n(platform, monkeypatch):
    import benchmarks.generators.vllm as vllm_gen

    monkeypatch.setattr(vllm_gen, "_platform", lambda: platform)
    engine = FakeEngine()
    gen = VLLMGenerator("fake-model", engine=engine, sampling_params_cls=FakeSamplingParams)
    assert gen.max_model_len == 64
    prompts = [ChatPrompt("a", ({"role": "user", "content": "one two"},)),
               ChatPrompt("b", ({"role": "user", "content": "three"},))]
    params = GenParams(n=3, temperature=0.6, top_p=0.95, top_k=0, min_p=0.05, max_tokens=16, thinking=True, seed=7)
    out = gen.generate(prompts, params)
    assert len(engine.calls) == 1
    texts, sp = engine.calls[0]
    seed = {"seed": 7} if platform == "cuda" else {}  # the CPU engine takes its seed at start-up only
    assert sp.kwargs == {"n": 3, "temperature": 0.6, "top_p": 0.95, "top_k": -1, "min_p": 0.05,
                         "max_tokens": 16} | seed
    assert all(t.endswith("<think>\n") for t in texts)
    assert [len(c) for c in out] == [3, 3]
    assert out[0][0].finish_reason == "length" and out[0][1].finish_reason == "stop"
    assert out[0][0].n_tokens == 3 and out[0][0].thinking_open


def test_vllm_generator_checks_max_model_len_up_front():
    engine = FakeEngine(max_len=20)
    gen = VLLMGenerator("fake-model", engine=engine, sampling_params_cls=FakeSamplingParams)
    long = ChatPrompt("long", ({"role": "user", "content": " ".join(["w"] * 10)},))
    with pytest.raises(ConfigError, match=r"prompt 'long' has \d+ tokens.*exceeds max_model_len 20"):
        gen.generate([long], GenParams(n=2, temperature=1.0, max_tokens=16))
    assert engine.calls == []
    with pytest.raises(ConfigError, match="greedy"):
        gen.generate([long], GenParams(n=2, temperature=0.0, max_tokens=1))


def test_vllm_missing_is_a_clean_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ConfigError, match="needs vLLM"):
        VLLMGenerator("toy:teacher")


def test_thinking_switch_only_where_the_template_reads_it(toy_tokenizer):
    prompt = ChatPrompt("p", ({"role": "user", "content": "Compute 1+2."},))
    text = render_chat(FakeTokenizer(), prompt, GenParams(thinking=False), explicit_thinking=True)
    assert not text.endswith("<think>\n")
    with pytest.raises(ConfigError, match="no enable_thinking switch"):
        render_chat(toy_tokenizer, prompt, GenParams(thinking=True), explicit_thinking=True)
    with pytest.warns(UserWarning, match="no enable_thinking switch"):
        from benchmarks import generators

        generators._warned.discard("thinking")
        render_chat(toy_tokenizer, prompt, GenParams(thinking=True), explicit_thinking=False)


def test_replay_formats(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"id": "a", "completions": ["x", {"text": "y", "finish_reason": "length", "n_tokens": 9}]},
            {"problem_id": "a", "sample": 2, "text": "z"},
            {"id": 3, "text": "w", "n_tokens": 4}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    gen = ReplayGenerator(path)
    out = gen.generate([ChatPrompt("a", ()), ChatPrompt("3", ())], GenParams())
    assert [c.text for c in out[0]] == ["x", "y", "z"] and out[0][1].finish_reason == "length"
    assert out[1][0].n_tokens == 4
    assert gen.describe()["samples"] == 4
