"""Rollout workers as Ray actors: each holds a copy of the student in an HFSampler and samples
the prompt batches it is handed with the newest weights it has been sent.

Weights are published through the object store (`ray.put` of a CPU state dict, once per
version); a worker loads them only when its version is older. `ray.init()` starts a local
cluster unless `run.ray_address` names one to join.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from opdcli.engines.types import GenerationControl, RolloutBatch, SamplingParams


class RolloutWorker:
    """The body of the Ray actor (plain Python so that it is testable without Ray)."""

    def __init__(self, model: str, device: str, dtype: str, seed: int, threads: int, *,
                 trust_remote_code: bool = False, attn_implementation: str = "sdpa") -> None:
        from opdcli.engines.hf_sampler import HFSampler
        from opdcli.models import load_model, load_tokenizer, resolve_device, resolve_dtype

        torch.set_num_threads(threads)
        dev = resolve_device(device)
        lm = load_model(model, dev, resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code,
                        attn_implementation=attn_implementation)
        self.sampler = HFSampler(lm, load_tokenizer(model, trust_remote_code),
                                 generator=torch.Generator(device=dev).manual_seed(seed))

    def sample(self, prompt_texts_P: list[str], params: SamplingParams, control: GenerationControl | None,
               weights: dict[str, torch.Tensor] | None, version: int) -> tuple[RolloutBatch, float]:
        """(the batch, stamped with the version it was sampled with; seconds spent)."""
        start = time.perf_counter()
        if weights is not None:
            self.sampler.sync_weights(weights, version)
        batch = self.sampler.sample(prompt_texts_P, params, control=control)
        seconds = time.perf_counter() - start
        return batch, seconds


class RayWorkerPool:
    """`n` RolloutWorker actors; the sampler interface the asynchronous loop uses.

    It cannot host a per-token stop rule (the workers have no teacher): `supports_stop_rules`.
    """

    name = "ray-hf"
    supports_stop_rules = False

    def __init__(self, n: int, model: str, device: str, dtype: str, seed: int, threads: int,
                 address: str | None = None, **load: Any) -> None:
        import ray

        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     num_cpus=None if address else max(n + 1, 2))
        actor = ray.remote(num_cpus=1)(RolloutWorker)
        self.workers = [actor.remote(model, device, dtype, seed + 1000 * (i + 1), threads, **load)
                        for i in range(n)]
        self.versions = [-1] * n
        self.weights_ref: Any = None
        self.version = 0

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Put new weights in the object store (once); workers pick them up at their next batch."""
        self.weights_ref = self.ray.put({k: v.detach().cpu() for k, v in state.items()})
        self.version = version

    def submit(self, i: int, prompt_texts_P: list[str], params: SamplingParams,
               control: GenerationControl | None) -> Any:
        stale = self.versions[i] != self.version
        self.versions[i] = self.version
        return self.workers[i].sample.remote(prompt_texts_P, params, control,
                                             self.weights_ref if stale else None, self.version)

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w)
        self.workers = []
        self.ray.shutdown()
