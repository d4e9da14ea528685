"""The vLLM generator: one `LLM` engine, one `SamplingParams(n=k)` request per prompt.

vLLM is imported lazily (optional extra `opd[vllm]`). Before generating, every rendered prompt
is tokenised and `len(prompt) + max_tokens` is checked against the engine's `max_model_len`;
vLLM would otherwise truncate or fail mid-run. Tests inject a fake engine and a fake
`SamplingParams` class.
"""

from __future__ import annotations

from typing import Any

from benchmarks.generators import ChatPrompt, Completion, GenParams, render_chat, thinking_open
from opdcli.errors import ConfigError


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise ConfigError("--generator vllm needs vLLM: pip install 'opd[vllm]' (GPU machines), "
                          "or use --generator hf") from None
    return vllm


class VLLMGenerator:
    """Generate with a vLLM engine (built here, or injected as `engine`)."""

    name = "vllm"

    def __init__(self, model: str, *, engine: Any = None, sampling_params_cls: Any = None,
                 max_model_len: int | None = None, dtype: str = "auto", explicit_thinking: bool = False,
                 engine_kwargs: dict[str, Any] | None = None, seed: int = 0) -> None:
        from opdcli.models import resolve_model_path

        self.model_name = model
        self.path = resolve_model_path(model) if engine is None else model
        if engine is None or sampling_params_cls is None:
            vllm = _import_vllm()
            sampling_params_cls = sampling_params_cls or vllm.SamplingParams
            if engine is None:
                from opdcli.engines.vllm_engine import check_vllm_model

                check_vllm_model(self.path, _platform(), "model")
                kwargs = {"dtype": dtype, "seed": seed, **(engine_kwargs or {})}
                if max_model_len is not None:
                    kwargs["max_model_len"] = max_model_len
                engine = vllm.LLM(model=self.path, **kwargs)
        self.engine, self.sampling_params_cls = engine, sampling_params_cls
        self.tokenizer = engine.get_tokenizer()
        self.max_model_len = max_model_len or _engine_max_len(engine)
        self.explicit_thinking = explicit_thinking

    def describe(self) -> dict[str, Any]:
        return {"generator": self.name, "model": self.model_name, "model_path": self.path,
                "max_model_len": self.max_model_len}

    def close(self) -> None:
        """Drop the engine so that the next checkpoint (--run-dir) gets the GPU memory back."""
        import gc

        self.engine = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def check_lengths(self, texts: list[str], prompts: list[ChatPrompt], max_tokens: int) -> None:
        if self.max_model_len is None:
            return
        lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        worst = max(range(len(texts)), key=lambda i: lengths[i])
        if lengths[worst] + max_tokens > self.max_model_len:
            raise ConfigError(
                f"prompt '{prompts[worst].problem_id}' has {lengths[worst]} tokens; with --max-tokens "
                f"{max_tokens} that exceeds max_model_len {self.max_model_len}. Lower --max-tokens to at "
                f"most {self.max_model_len - lengths[worst]} or raise --max-model-len"
            )

    def generate(self, prompts: list[ChatPrompt], params: GenParams) -> list[list[Completion]]:
        if params.temperature == 0 and params.n > 1:
            raise ConfigError(f"greedy decoding (temperature 0) gives one distinct sample, not --n {params.n}; "
                              "set --temperature > 0 or --n 1")
        texts = [render_chat(self.tokenizer, p, params, self.explicit_thinking) for p in prompts]
        self.check_lengths(texts, prompts, params.max_tokens)
        # vLLM's CPU backend fails on a per-request seed with n > 1 ("CPU Generator does not use
        # offset"): there the engine's seed (set at start-up) is the run's seed
        seed = {"seed": params.seed} if _platform() == "cuda" else {}
        sp = self.sampling_params_cls(
            n=params.n, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, min_p=params.min_p,
            max_tokens=params.max_tokens, **seed,
        )
        outputs = self.engine.generate(texts, sp)
        result = []
        for text, out in zip(texts, outputs, strict=True):
            result.append([Completion(o.text, len(o.token_ids), "length" if o.finish_reason == "length" else "stop",
                                      thinking_open(text)) for o in out.outputs])
        return result


def _platform() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _engine_max_len(engine: Any) -> int | None:
    for path in ("llm_engine.model_config.max_model_len", "model_config.max_model_len"):
        obj = engine
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, int):
            return obj
    return None
