"""Assemble a run's parts from its config and loaded models: the learner, the sampler and
the scorer, placed for one process or for data-parallel ranks.

Alone, the sampler and the scorer share the learner's module (no copies, no weight sync).
Under torchrun the student is sharded (FSDP2) for training, and the sampler holds a full
replica that `sync_weights` refreshes after every optimizer step; the scorer scores the
student on that replica, the teacher and reference replicated or sharded (`dist.frozen_models`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from opdcli.dist import Dist
from opdcli.engines.hf_sampler import HFSampler
from opdcli.engines.hf_scorer import HFScorer
from opdcli.errors import ConfigError
from opdcli.learner import Learner, shard
from opdcli.lm import ResponseLM, vocab_size
from opdcli.methods import method_class
from opdcli.models import LoadedPair
from opdcli.precision import sampling_replica


@dataclass
class Parts:
    learner: Learner | None
    sampler: Any
    """HFSampler or VLLMSampler (rollout.engine)."""
    scorer: HFScorer

    @property
    def policy(self) -> Any:
        """The plain transformers model holding the current policy weights (eval, checkpoints)."""
        return self.sampler.model


def check_placement(cfg: Any, d: Dist, rows_per_step: int, stop_rule: bool) -> None:
    """Refuse layouts the data-parallel step cannot run (before any model loads)."""
    if not d.active:
        return
    if rows_per_step % d.world:
        raise ConfigError(f"the step's {rows_per_step} sequences (rollout.prompts_per_step x samples_per_prompt) "
                          f"do not split evenly over {d.world} ranks; make them a multiple of {d.world}")
    if rows_per_step // d.world < cfg.optim.grad_accum:
        raise ConfigError(f"optim.grad_accum ({cfg.optim.grad_accum}) exceeds the {rows_per_step // d.world} "
                          "sequences of each rank; lower it")
    if stop_rule and cfg.dist.frozen_models == "shard":
        raise ConfigError("online truncation runs the teacher along each rank's own generation, which a "
                          "sharded teacher cannot do; set dist.frozen_models=replicate")


def assemble(cfg: Any, pair: LoadedPair, d: Dist, generator: torch.Generator, *, reference=None,
             train: bool = True, engine: str | None = None, teachers: dict | None = None) -> Parts:
    """The learner (None when `train` is false), sampler and scorer of a run; `engine` overrides
    rollout.engine (hf for a process that only holds the policy); `teachers`: the domain teachers
    of model.teachers, by tag."""
    teachers = dict(teachers or {})
    policy = pair.student
    if train and d.active:  # the sampler's full replica, taken before the learner shards the student
        policy = sampling_replica(pair.student)
    learner = Learner(pair.student, cfg.optim, d) if train else None
    teacher, ref = pair.teacher, reference
    if d.active and cfg.dist.frozen_models == "shard":
        unique = {id(m): m for m in (teacher, *teachers.values()) if m is not None}  # a shared model once
        sharded = {key: shard(ResponseLM(m)) for key, m in unique.items()}
        teacher = None if teacher is None else sharded[id(teacher)]  # None: a vLLM teacher
        ref = None if ref is None else shard(ResponseLM(ref))
        teachers = {tag: sharded[id(m)] for tag, m in teachers.items()}
    follower = pair.teacher if cfg.dist.frozen_models == "replicate" or not d.active else None
    if (engine or cfg.rollout.engine) == "vllm":
        sampler = vllm_sampler(cfg, cfg.model.student, pair.tokenizer, module=policy, device=pair.device,
                               dtype=pair.dtype, follower=follower)
    else:
        sampler = HFSampler(policy, pair.tokenizer, generator=generator, follower=follower)
    scored_student = learner.module if learner is not None and not d.active else policy
    method = getattr(cfg, "method", None)
    cross = method is not None and method_class(method.name).reads_student_on_teacher_topk
    scorer = HFScorer(scored_student, teacher, k=cfg.scoring.top_k, chunk_tokens=cfg.scoring.chunk_tokens,
                      batch_size=cfg.scoring.batch_size, reference=ref, student_on_teacher_topk=cross,
                      teachers=teachers, lockstep=d.active and cfg.dist.frozen_models == "shard")
    if cfg.scoring.teacher_engine == "vllm":
        scorer = vllm_teacher(cfg, scorer, pair)
    return Parts(learner, sampler, scorer)


def vllm_teacher(cfg: Any, hf: HFScorer, pair: LoadedPair):
    """A VLLMTeacherScorer: the teacher on an in-process vLLM engine, or at vllm.teacher_url; the
    student on `hf`."""
    from opdcli.engines.vllm_scorer import VLLMTeacherScorer

    width = vocab_size(pair.student)
    return VLLMTeacherScorer(hf, _teacher_source(cfg, pair), k=cfg.scoring.top_k, vocab_size=width)


def _teacher_source(cfg: Any, pair: LoadedPair):
    if cfg.vllm.teacher_url is not None:
        from opdcli.engines.vllm_endpoint import TeacherEndpoint

        return TeacherEndpoint.connect(cfg, pair.tokenizer)
    from opdcli.engines.vllm_engine import build_llm, check_vllm_model, import_vllm
    from opdcli.engines.vllm_scorer import InProcessTeacher
    from opdcli.models import resolve_model_path

    path = resolve_model_path(cfg.model.teacher)
    device_type = torch.device(pair.device).type
    check_vllm_model(path, device_type, "teacher")
    llm = build_llm(path, cfg.vllm, device_type=device_type, dtype=str(pair.dtype).removeprefix("torch."),
                    seed=cfg.run.seed, max_model_len=engine_max_len(cfg) + 1, max_logprobs=cfg.vllm.max_logprobs)
    return InProcessTeacher(llm, import_vllm("scoring.teacher_engine=vllm").SamplingParams)


def teacher_loading(cfg: Any) -> dict[str, bool]:
    """load_pair's teacher options: its weights only for a transformers teacher, its files not
    at all for a teacher endpoint."""
    return {"load_teacher": cfg.scoring.teacher_engine == "hf",
            "teacher_files": cfg.scoring.teacher_engine == "hf" or cfg.vllm.teacher_url is None}


def sampler_class(cfg: Any) -> type:
    """The rollout engine's class (its capabilities are checked before any model loads)."""
    if cfg.rollout.engine == "vllm":
        from opdcli.engines.vllm_engine import VLLMSampler

        return VLLMSampler
    return HFSampler


def engine_max_len(cfg: Any) -> int:
    """The vLLM engines' longest prompt + response: vllm.max_model_len, else the prompt budget +
    rollout.max_new_tokens."""
    return cfg.vllm.max_model_len or cfg.vllm.prompt_budget + cfg.rollout.max_new_tokens


def check_engine(cfg: Any, rollout_model: str, role: str) -> None:
    """Refuse, before any model loads, a vLLM engine this environment or its model cannot run:
    the rollout engine's (on `rollout_model`, the run's `role`) and the teacher's (or the teacher
    endpoint that does not answer, serve model.teacher, tokenize like the student or fit the run)."""
    if cfg.scoring.teacher_engine == "vllm" and cfg.vllm.teacher_url is not None:
        from opdcli.engines.vllm_endpoint import TeacherEndpoint
        from opdcli.models import load_tokenizer

        TeacherEndpoint.connect(cfg, load_tokenizer(cfg.model.student, cfg.model.trust_remote_code))
    elif cfg.scoring.teacher_engine == "vllm":
        _check_engine_for(cfg, cfg.model.teacher, "teacher", "scoring.teacher_engine=vllm")
    if cfg.rollout.engine == "vllm":
        _check_engine_for(cfg, rollout_model, role, "rollout.engine=vllm")


def _check_engine_for(cfg: Any, model_path: str, role: str, flag: str) -> None:
    from opdcli.engines.vllm_engine import check_vllm_model, import_vllm, sleep_enabled
    from opdcli.models import resolve_device, resolve_model_path

    device_type = resolve_device(cfg.run.device).type
    if cfg.vllm.weight_sync == "nccl" and device_type != "cuda":
        raise ConfigError(f"vllm.weight_sync=nccl broadcasts between GPUs, and run.device is {device_type}; "
                          "use vllm.weight_sync=inprocess (one box) or folder")
    import_vllm(flag)
    sleep_enabled(cfg.vllm, device_type)
    check_vllm_model(resolve_model_path(model_path), device_type, role)


def vllm_sampler(cfg: Any, model_path: str, tokenizer, *, module, device: torch.device | str, dtype: torch.dtype,
                 follower: Any = None):
    """A VLLMSampler on `model_path` with the run's vllm settings, resolved dtype and seed."""
    from opdcli.engines.vllm_engine import VLLMSampler
    from opdcli.models import resolve_model_path

    return VLLMSampler(resolve_model_path(model_path), tokenizer, cfg.vllm, module=module,
                       device_type=torch.device(device).type, dtype=str(dtype).removeprefix("torch."),
                       seed=cfg.run.seed, max_model_len=engine_max_len(cfg), follower=follower,
                       max_logprobs=cfg.vllm.max_logprobs)
