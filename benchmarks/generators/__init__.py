"""Generators: chat prompts in, k completions per prompt out, behind one interface.

`hf` (transformers, our sampling loop), `vllm` (one `LLM` engine, `SamplingParams(n=k)`) and
`replay` (completions read from a JSONL file, to re-score old runs). Sampling settings come
from a preset, then the bench's own defaults, then explicit flags; the resolved values are
recorded in results.json.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Protocol

from opdcli.errors import ConfigError

GENERATORS = ("hf", "vllm", "replay")


@dataclass(frozen=True)
class GenParams:
    """Sampling settings of one evaluation."""

    n: int = 1
    temperature: float = 0.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    min_p: float = 0.0
    max_tokens: int = 256
    thinking: bool | None = None
    """enable_thinking for the chat template; None leaves the template's default."""
    seed: int = 0
    preset: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # Qwen3 model card, thinking mode: T 0.6, top-p 0.95, top-k 20, min-p 0, 32768 tokens.
    "qwen3-thinking": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
                       "max_tokens": 32768, "thinking": True},
    # Qwen3 model card, non-thinking mode: T 0.7, top-p 0.8, top-k 20, min-p 0.
    "qwen3-nothink": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0,
                      "max_tokens": 32768, "thinking": False},
    "greedy": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_tokens": 4096,
               "thinking": None},
}


def resolve_params(bench_sampling: dict[str, Any], preset: str | None,
                   overrides: dict[str, Any]) -> GenParams:
    """Preset (flag, else the bench's), then the bench's own values, then explicit flags.

    The bench's values (such as its max_tokens) apply only with its own preset; its `n` always
    applies unless `--n` is given.
    """
    bench = dict(bench_sampling)
    bench_preset = bench.pop("preset", "greedy")
    name = preset or bench_preset
    if name not in PRESETS:
        raise ConfigError(f"unknown sampling preset '{name}'; choose from {', '.join(sorted(PRESETS))}")
    values: dict[str, Any] = dict(PRESETS[name], preset=name)
    if preset is None or preset == bench_preset:
        values.update(bench)
    elif "n" in bench:
        values["n"] = bench["n"]
    known = {f.name for f in fields(GenParams)}
    values.update({k: v for k, v in overrides.items() if v is not None and k in known})
    params = GenParams(**values)
    if params.n < 1 or params.max_tokens < 1:
        raise ConfigError(f"--n ({params.n}) and --max-tokens ({params.max_tokens}) must be at least 1")
    if not 0 < params.top_p <= 1 or params.temperature < 0:
        raise ConfigError(f"--top-p must be in (0, 1] and --temperature >= 0 (got {params.top_p}, {params.temperature})")
    return params


@dataclass(frozen=True)
class ChatPrompt:
    """One problem's chat messages."""

    problem_id: str
    messages: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class Completion:
    """One sampled completion (text without the prompt)."""

    text: str
    n_tokens: int | None = None
    finish_reason: str = "stop"
    """stop (EOS or stop string) or length (hit max_tokens)."""
    thinking_open: bool = False
    """The rendered prompt ended inside an open <think> block."""


class Generator(Protocol):
    name: str

    def generate(self, prompts: list[ChatPrompt], params: GenParams) -> list[list[Completion]]: ...

    def describe(self) -> dict[str, Any]: ...


_warned: set[str] = set()


def supports_thinking(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "enable_thinking" in str(template)


def render_chat(tokenizer: Any, prompt: ChatPrompt, params: GenParams, explicit_thinking: bool) -> str:
    """The chat template with a generation prompt; enable_thinking only where the template reads it."""
    kwargs: dict[str, Any] = {}
    if params.thinking is not None:
        if supports_thinking(tokenizer):
            kwargs["enable_thinking"] = params.thinking
        elif explicit_thinking:
            raise ConfigError("--thinking/--no-thinking has no effect: this model's chat template has no "
                              "enable_thinking switch; drop the flag")
        elif "thinking" not in _warned:
            _warned.add("thinking")
            warnings.warn("the chat template has no enable_thinking switch; ignoring the preset's "
                          "thinking setting", stacklevel=2)
    return tokenizer.apply_chat_template(list(prompt.messages), add_generation_prompt=True,
                                         tokenize=False, **kwargs)


def thinking_open(prompt_text: str) -> bool:
    return prompt_text.rfind("<think>") > prompt_text.rfind("</think>")


def with_params(params: GenParams, **changes: Any) -> GenParams:
    return replace(params, **changes)
