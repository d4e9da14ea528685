"""The transformers generator: the training sampler (`opdcli.engines.hf_sampler.HFSampler`) on CPU or GPU.

Prompts go through the model's chat template (with `enable_thinking` where the template has
that switch). min-p is not implemented by the loop, so a min_p > 0 raises.
"""

from __future__ import annotations

from typing import Any

from benchmarks.generators import ChatPrompt, Completion, GenParams, render_chat, thinking_open
from opdcli.errors import ConfigError


class HFGenerator:
    """Generate with a transformers model loaded by `opdcli.models.load_model`."""

    name = "hf"

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", batch_size: int = 64,
                 explicit_thinking: bool = False, trust_remote_code: bool = False) -> None:
        from opdcli.models import (
            fit_vocab,
            load_model,
            load_tokenizer,
            resolve_device,
            resolve_dtype,
            resolve_model_path,
        )

        self.model_name, self.path = model, resolve_model_path(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(model, trust_remote_code)
        self.model = fit_vocab(load_model(model, self.device, self.dtype, trust_remote_code=trust_remote_code),
                               len(self.tokenizer), model)
        self.batch_size, self.explicit_thinking = batch_size, explicit_thinking

    def describe(self) -> dict[str, Any]:
        return {"generator": self.name, "model": self.model_name, "model_path": self.path,
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "batch_size": self.batch_size}

    def generate(self, prompts: list[ChatPrompt], params: GenParams) -> list[list[Completion]]:
        import torch

        from opdcli.engines.hf_sampler import HFSampler, decode_responses
        from opdcli.engines.types import SamplingParams
        from opdcli.run.progress import work_bar

        if params.min_p > 0:
            raise ConfigError(f"the hf generator does not implement min-p (got {params.min_p}); use --min-p 0 "
                              "or --generator vllm")
        texts = [render_chat(self.tokenizer, p, params, self.explicit_thinking) for p in prompts]
        sp = SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                            top_k=params.top_k, max_new_tokens=params.max_tokens, batch_size=self.batch_size)
        gen = torch.Generator(device=self.device).manual_seed(params.seed)
        with work_bar(len(texts) * params.n, f"generating ({self.model_name})") as bar:
            batch = HFSampler(self.model, self.tokenizer, generator=gen).sample(texts, sp, on_block=bar.advance)
        responses = decode_responses(self.tokenizer, batch)
        lengths = batch.response_mask_B_T.sum(-1).tolist()
        finished = batch.finished_B.tolist()
        out: list[list[Completion]] = [[] for _ in prompts]
        for b, p in enumerate(batch.prompt_index_B):
            out[p].append(Completion(responses[b], int(lengths[b]), "stop" if finished[b] else "length",
                                     thinking_open(texts[p])))
        return out
