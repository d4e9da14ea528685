"""Rollout workers as Ray actors: each holds a copy of the student in an HFSampler (or a vLLM
engine, rollout.engine=vllm) and samples the prompt batches it is handed with the newest weights
it has been sent.

Weights are published through the object store (`ray.put` of a CPU state dict, once per
version); a worker loads them only when its version is older. With `vllm.weight_sync=nccl` they
are broadcast GPU to GPU instead (opdcli.engines.nccl_weights). `ray.init()` starts a local
cluster unless `run.ray_address` names one to join.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import torch

from opdcli.engines.types import GenerationControl, RolloutBatch, SamplingParams


class RolloutWorker:
    """The body of the Ray actor (plain Python so that it is testable without Ray)."""

    def __init__(self, model: str, device: str, dtype: str, seed: int, threads: int, *,
                 teacher: str | None = None, chunk_tokens: int = 1024, score_batch: int = 64,
                 trust_remote_code: bool = False, attn_implementation: str = "sdpa", engine: str = "hf",
                 vllm: Any = None, max_model_len: int = 1024) -> None:
        from opdcli.engines.hf_sampler import HFSampler
        from opdcli.engines.hf_scorer import HFScorer
        from opdcli.models import (
            fit_vocab,
            load_model,
            load_tokenizer,
            resolve_device,
            resolve_dtype,
            resolve_model_path,
        )

        torch.set_num_threads(threads)
        dev = resolve_device(device)

        tokenizer = load_tokenizer(model, trust_remote_code)

        def load(path: str):
            loaded = load_model(path, dev, resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code,
                                attn_implementation=attn_implementation)
            return fit_vocab(loaded, len(tokenizer), path)

        if engine == "vllm":  # the engine holds the weights; new ones are pushed into it
            from opdcli.engines.vllm_engine import VLLMSampler

            self.sampler = VLLMSampler(resolve_model_path(model), tokenizer, vllm, device_type=dev.type,
                                       dtype=str(resolve_dtype(dtype, dev)).removeprefix("torch."), seed=seed,
                                       max_model_len=max_model_len)
        else:
            self.sampler = HFSampler(load(model), tokenizer, generator=torch.Generator(device=dev).manual_seed(seed))
        self.scorer = None if teacher is None else HFScorer(None, load(teacher), k=1, chunk_tokens=chunk_tokens,
                                                            batch_size=score_batch)

    def sample(self, prompt_texts_P: list[str], params: SamplingParams, control: GenerationControl | None,
               weights: dict[str, torch.Tensor] | None, version: int) -> tuple[RolloutBatch, float]:
        """(the batch on CPU, stamped with the version it was sampled with and, with a teacher,
        carrying its log-probs of the sampled tokens; seconds spent)."""
        start = time.perf_counter()
        if weights is not None:
            self.sampler.sync_weights(weights, version)
        batch = self.sampler.sample(prompt_texts_P, params, control=control)
        if self.scorer is not None:
            batch = dataclasses.replace(batch, teacher_lp_B_T=self.scorer.teacher_token_lp(batch))
        seconds = time.perf_counter() - start
        return batch.to("cpu"), seconds

    def ready(self) -> bool:
        """True once the models are loaded (the actor's constructor has run)."""
        return True

    # vllm.weight_sync=nccl (opdcli.engines.nccl_weights): the engine's side of the weight group
    def device_uuid(self) -> str:
        from opdcli.engines.nccl_weights import device_uuid

        return device_uuid()

    def join_weight_group(self, address: str, port: int, world_size: int, rank: int) -> None:
        self.sampler.join_weight_group(address, port, world_size, rank)

    def receive_weights(self, meta: dict[str, list], version: int) -> None:
        self.sampler.receive_weights(meta, version)

    def leave_weight_group(self) -> None:
        self.sampler.leave_weight_group()


class RayWorkerPool:
    """`n` RolloutWorker actors; the sampler interface the asynchronous loop uses.

    It cannot host a per-token stop rule (the workers have no follower): `supports_stop_rules`.
    A worker whose process died is replaced by `restart` (new seed, weights sent again).
    """

    name = "ray"
    supports_stop_rules = False

    def __init__(self, n: int, model: str, device: str, dtype: str, seed: int, threads: int,
                 address: str | None = None, gpus: float = 0, nccl: bool = False, **load: Any) -> None:
        import ray

        self.ray = ray
        if not ray.is_initialized():
            with _without_learner_gpu(device if nccl and not address else None) as num_gpus:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         num_cpus=None if address else max(n + 1, 2), num_gpus=num_gpus)
        have = ray.cluster_resources().get("GPU", 0)
        if gpus and have < n * gpus:  # Ray would wait for them forever
            from opdcli.errors import ConfigError

            ray.shutdown()
            raise ConfigError(f"asynchronous.worker_gpus={gpus} asks Ray for {n * gpus:g} GPUs for {n} workers and "
                              f"the cluster has {have:g}; lower asynchronous.workers or worker_gpus, or add GPUs")
        self._actor = ray.remote(num_cpus=1, num_gpus=gpus)(RolloutWorker)
        self._args, self._load, self.seed = (model, device, dtype), dict(load, threads=threads), seed
        self.restarts = [0] * n
        self.workers = [self._start(i) for i in range(n)]
        self.versions = [-1] * n
        self.weights_ref: Any = None
        self.version = 0
        self.group = None
        if nccl:
            from opdcli.engines.nccl_weights import WeightGroup

            self.wait_ready()
            self.group = WeightGroup(ray, self.workers)

    def _start(self, i: int) -> Any:
        seed = self.seed + 1000 * (i + 1) + 100_000 * self.restarts[i]
        load = dict(self._load)
        return self._actor.remote(*self._args, seed, load.pop("threads"), **load)

    def wait_ready(self) -> None:
        """Block until every worker has loaded its models (so that step timings exclude it)."""
        self.ray.get([w.ready.remote() for w in self.workers])

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Put new weights in the object store (once); workers pick them up at their next batch.
        With NCCL (`group`): broadcast them, each worker receiving after its current batch."""
        self.version = version
        if self.group is not None:
            self.group.push(state, version)
            self.versions = [version] * len(self.workers)
            return
        self.weights_ref = self.ray.put({k: v.detach().cpu() for k, v in state.items()})

    def submit(self, i: int, prompt_texts_P: list[str], params: SamplingParams,
               control: GenerationControl | None) -> Any:
        stale = self.versions[i] != self.version
        self.versions[i] = self.version
        return self.workers[i].sample.remote(prompt_texts_P, params, control,
                                             self.weights_ref if stale else None, self.version)

    def died(self, exc: BaseException) -> bool:
        """Whether `exc` (from ray.get) means the worker's process is gone, not a bug in its task."""
        e = self.ray.exceptions
        return isinstance(exc, (e.ActorDiedError, e.ActorUnavailableError, e.WorkerCrashedError,
                                e.NodeDiedError, e.ObjectLostError))

    def restart(self, i: int) -> None:
        """Replace worker `i` by a fresh actor (its next batch gets the current weights)."""
        try:
            self.ray.kill(self.workers[i])
        except Exception:  # noqa: BLE001 - already gone is what we expect
            pass
        self.restarts[i] += 1
        self.workers[i] = self._start(i)
        self.versions[i] = -1
        if self.group is not None:  # a new member: a new group, and the last weights again
            self.ray.get(self.workers[i].ready.remote())
            self.group.rebuild(self.workers, [j != i for j in range(len(self.workers))])
            self.versions[i] = self.version

    def close(self) -> None:
        """Kill every actor and, when this process started the cluster, stop it."""
        for w in self.workers:
            try:
                self.ray.kill(w)
            except Exception:  # noqa: BLE001 - a dead actor needs no killing
                pass
        self.workers = []
        if self.group is not None:
            try:
                self.group.wait()
            finally:
                self.group.close()
        self.ray.shutdown()


@contextlib.contextmanager
def _without_learner_gpu(device: str | None):
    """While a local Ray cluster starts: CUDA_VISIBLE_DEVICES without the learner's GPU, so that no
    worker lands on it (NCCL needs every rank on its own device); yields the GPUs left (None:
    let Ray count them)."""
    if device is None:
        yield None
        return
    import os

    from opdcli.models import resolve_device

    dev = resolve_device(device)
    learner = dev.index if dev.index is not None else torch.cuda.current_device()
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = before.split(",") if before else [str(i) for i in range(torch.cuda.device_count())]
    rest = [d for j, d in enumerate(visible) if j != learner]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(rest)
    try:
        yield len(rest)
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
