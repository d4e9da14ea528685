"""Cross-field config rules of the training commands; a flag that cannot take effect raises."""

from __future__ import annotations

import warnings
from typing import Any

from opdcli.config import FULL_DISTRIBUTION, TrainRunConfig
from opdcli.errors import ConfigError
from opdcli.records.schema import MAX_TOPK


def _refuse(explicit: set[str], keys: list[str], reason: str) -> None:
    for key in keys:
        if key in explicit:
            raise ConfigError(f"{key} cannot take effect: {reason}; remove it or change the objective")


def validate_train_config(cfg: TrainRunConfig, explicit: set[str]) -> None:
    """Cross-field rules; a flag that cannot take effect raises."""
    obj = cfg.loss.objective
    if not 1 <= cfg.scoring.top_k <= MAX_TOPK:
        raise ConfigError(f"scoring.top_k is {cfg.scoring.top_k}; it must be in 1..{MAX_TOPK}")
    if cfg.train.rollouts_topk > cfg.scoring.top_k:
        raise ConfigError(f"train.rollouts_topk ({cfg.train.rollouts_topk}) exceeds scoring.top_k "
                          f"({cfg.scoring.top_k}); lower it or raise scoring.top_k")
    if obj in FULL_DISTRIBUTION:
        _refuse(explicit, ["loss.surrogate", "loss.clip_low", "loss.clip_high", "loss.dual_clip", "loss.kl_coef",
                           "loss.discount", "loss.topk_weight"],
                f"loss.objective={obj} is differentiated analytically, not by a policy gradient")
    else:
        _refuse(explicit, ["loss.support", "loss.support_k", "loss.tail_bucket"],
                f"loss.objective={obj} has no distribution support (use rkl, fkl or jsd)")
    if obj != "jsd":
        _refuse(explicit, ["loss.beta", "loss.jsd_temperature"], "only loss.objective=jsd uses it")
    if obj == "topk":
        _refuse(explicit, ["loss.kl_coef", "loss.discount", "loss.surrogate", "loss.dual_clip"],
                "the top-K objective builds its own per-candidate advantages with a PPO clip")
    if obj == "sampled":
        _refuse(explicit, ["loss.topk_weight"], "only loss.objective=topk weighs candidates")
        if cfg.loss.surrogate != "ppo":
            _refuse(explicit, ["loss.clip_low", "loss.clip_high", "loss.dual_clip"], "only loss.surrogate=ppo clips")
        elif cfg.loss.dual_clip is not None and not cfg.loss.dual_clip > 1.0:
            raise ConfigError(f"loss.dual_clip is {cfg.loss.dual_clip}; it must be > 1, or null to disable it")
    if cfg.loss.support == "full":
        _refuse(explicit, ["loss.support_k", "loss.tail_bucket"], "loss.support=full has no top-K")
    if not 0.0 <= cfg.loss.discount <= 1.0:
        raise ConfigError(f"loss.discount is {cfg.loss.discount}; it must be in [0, 1]")
    if not 0.0 <= cfg.loss.beta <= 1.0:
        raise ConfigError(f"loss.beta is {cfg.loss.beta}; it must be in [0, 1]")
    validate_common(cfg, explicit)
    _check_teachers(cfg, explicit)
    if cfg.train.mode == "sync":
        for key in sorted(k for k in explicit if k.startswith("asynchronous.") or k == "run.ray_address"):
            raise ConfigError(f"{key} cannot take effect: train.mode=sync runs no rollout workers; "
                              "set train.mode=async or remove it")
    else:
        a = cfg.asynchronous
        if a.workers < 1 or a.buffer < 1 or a.worker_threads < 1 or (a.max_lag is not None and a.max_lag < 0):
            raise ConfigError("asynchronous.workers, buffer and worker_threads must be at least 1 and "
                              "max_lag >= 0 (or null)")
        if a.max_restarts < 0 or a.worker_gpus < 0:
            raise ConfigError("asynchronous.max_restarts and worker_gpus must be >= 0")
    _check_nccl(cfg)
    if cfg.method.name == "fopd" and (cfg.rollout.top_p < 1 or cfg.rollout.top_k > 0 or cfg.rollout.temperature != 1.0):
        raise ConfigError("method fopd measures drift between the sampler's and the student's log-probs, which "
                          "rollout.temperature/top_p/top_k make differ even without lag; set them to 1/1/0")
    stored = cfg.method.name == "fopd" and cfg.method.options.get("supervision") == "stored"
    if stored and not (cfg.train.mode == "async" and cfg.asynchronous.worker_scoring):
        raise ConfigError("method.options.supervision=stored trains on the rollout workers' own teacher scores; "
                          "set train.mode=async and asynchronous.worker_scoring=true, or supervision=fresh")
    if (cfg.rollout.top_p < 1 or cfg.rollout.top_k > 0 or cfg.rollout.temperature != 1.0) and obj != "sampled":
        warnings.warn(f"rollouts are not sampled from the student itself (temperature/top-p/top-k) and "
                      f"loss.objective={obj} has no importance ratio: the gradient is biased", stacklevel=2)


def _check_teachers(cfg: TrainRunConfig, explicit: set[str]) -> None:
    """model.teachers (domain teachers by tag): what routed scoring can serve."""
    teachers = cfg.model.teachers
    if not teachers:
        return
    if any(not isinstance(tag, str) or not tag or not isinstance(name, str) or not name
           for tag, name in teachers.items()):
        raise ConfigError("model.teachers maps tags to models, e.g. {math: ./rl-math, code: ./rl-code}; "
                          "every tag and model must be a non-empty string")
    fix = "set loss.objective=sampled (G-OPD's objective) or topk, or use one teacher"
    if cfg.loss.objective in FULL_DISTRIBUTION:
        raise ConfigError(f"model.teachers with loss.objective={cfg.loss.objective}: full-distribution objectives "
                          f"apply one teacher's head inside the training forward; {fix}")
    if cfg.train.mode == "async" and cfg.asynchronous.worker_scoring:
        raise ConfigError("model.teachers with asynchronous.worker_scoring: rollout workers hold model.teacher "
                          "only; set asynchronous.worker_scoring=false (the learner scores every teacher)")


def check_routes(cfg: Any, tags: set[str] | None, method: Any) -> None:
    """Refuse, before any model loads, model.teachers that no prompt reaches (`tags`: the tags
    the prompts name, None for toy prompts), a prompt whose tag names no teacher, a vLLM
    teacher, and a method that runs model.teacher during sampling."""
    teachers = cfg.model.teachers
    if not teachers:
        return
    field = cfg.data.teacher_field
    if cfg.scoring.teacher_engine != "hf":
        raise ConfigError("model.teachers with scoring.teacher_engine=vllm: the vLLM teacher serves model.teacher "
                          "only; set scoring.teacher_engine=hf")
    if tags is None:
        raise ConfigError("model.teachers cannot take effect: the toy prompts name no teacher; use a data file "
                          f"whose rows name theirs in a '{field}' field (data.teacher_field)")
    if not tags:
        raise ConfigError(f"model.teachers cannot take effect: no row of {cfg.data.source} has a '{field}' field "
                          "naming its teacher; add one, or set data.teacher_field")
    unknown = sorted(tags - set(teachers))
    if unknown:
        raise ConfigError(f"{cfg.data.source} names teacher '{unknown[0]}' in its '{field}' field, which "
                          f"model.teachers lacks (it has: {', '.join(sorted(teachers))}); add "
                          f"model.teachers.{unknown[0]}=<model> or fix the data")
    if method.stop_rule() is not None:
        raise ConfigError(f"method '{method.name}' with model.teachers: online truncation runs model.teacher along "
                          "generation, not each row's domain teacher; set method.options.online=false")


def _check_nccl(cfg: Any) -> None:
    """vllm.weight_sync=nccl: the learner and the Ray workers' vLLM engines, each on its own GPU
    (the CUDA device itself is checked with the engine, opdcli.assembly.check_engine)."""
    if cfg.vllm.weight_sync != "nccl":
        return
    if cfg.train.mode != "async" or cfg.rollout.engine != "vllm":
        raise ConfigError("vllm.weight_sync=nccl broadcasts weights to the rollout workers' vLLM engines on other "
                          "GPUs: set train.mode=async and rollout.engine=vllm, or vllm.weight_sync=inprocess")
    if cfg.asynchronous.worker_gpus <= 0:
        raise ConfigError("vllm.weight_sync=nccl needs every rollout worker on a GPU of its own: set "
                          "asynchronous.worker_gpus=1")


def _check_lora(cfg: Any, explicit: set[str]) -> None:
    lora = cfg.model.lora
    if lora.r < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1 or not lora.target_modules:
        raise ConfigError("model.lora needs r >= 0, alpha > 0, dropout in [0, 1) and at least one target module")
    if lora.r == 0:
        _refuse(explicit, [k for k in explicit if k.startswith("model.lora.") and k != "model.lora.r"],
                "model.lora.r is 0 (full fine-tuning); set model.lora.r > 0 for adapters")
        return
    if cfg.rollout.engine == "vllm":
        raise ConfigError("model.lora with rollout.engine=vllm: the engine takes merged weights, which a LoRA "
                          "student does not push yet; use rollout.engine=hf")
    if getattr(getattr(cfg, "train", None), "mode", "sync") != "sync":
        raise ConfigError("model.lora with train.mode=async: rollout workers take full weights, which a LoRA "
                          "student does not send yet; use train.mode=sync")


def validate_common(cfg: Any, explicit: set[str]) -> None:
    _check_lora(cfg, explicit)
    if hasattr(cfg, "distill") and cfg.model.teachers:
        raise ConfigError("model.teachers cannot take effect in opd distill: traces and SFT use model.teacher "
                          "only; remove it (opd train routes prompts to domain teachers)")
    if "data.teacher_field" in explicit and not cfg.model.teachers:
        raise ConfigError("data.teacher_field cannot take effect: model.teachers is empty, so every prompt goes to "
                          "model.teacher; remove it or set model.teachers")
    if "run.master_weights" in explicit and cfg.run.dtype == "float32":
        raise ConfigError("run.master_weights cannot take effect: with run.dtype=float32 the student's weights are "
                          "float32 already; remove it, or set run.dtype=bfloat16 for mixed precision")
    r = cfg.rollout
    for key, value in (("rollout.prompts_per_step", r.prompts_per_step), ("rollout.samples_per_prompt",
                       r.samples_per_prompt), ("rollout.max_new_tokens", r.max_new_tokens),
                       ("rollout.batch_size", r.batch_size), ("train.max_steps", cfg.train.max_steps),
                       ("optim.grad_accum", cfg.optim.grad_accum)):
        if value < 1:
            raise ConfigError(f"{key} is {value}; it must be at least 1")
    if hasattr(cfg, "optim"):  # the training commands
        _check_optim_and_saving(cfg)
    if r.temperature < 0 or not 0 < r.top_p <= 1:
        raise ConfigError("rollout.temperature must be >= 0 and rollout.top_p in (0, 1]")
    if cfg.optim.grad_accum > r.prompts_per_step * r.samples_per_prompt:
        raise ConfigError(f"optim.grad_accum ({cfg.optim.grad_accum}) exceeds the sequences per step "
                          f"({r.prompts_per_step * r.samples_per_prompt}); lower it")
    if cfg.eval.samples < 0:
        raise ConfigError(f"eval.samples is {cfg.eval.samples}; it must be >= 0 (0: greedy evaluation only)")
    if cfg.eval.samples == 0:
        _refuse(explicit, ["eval.temperature", "eval.seed", "eval.samples_every"],
                "only the sampled evaluation (eval.samples > 0) uses it")
    elif not cfg.eval.temperature > 0:
        raise ConfigError(f"eval.temperature is {cfg.eval.temperature}; the sampled evaluation needs a "
                          "temperature > 0 (greedy accuracy is always reported)")
    elif cfg.eval.samples_every < 0 or (cfg.eval.samples_every and (
            not cfg.eval.every or cfg.eval.samples_every % cfg.eval.every)):
        raise ConfigError(f"eval.samples_every is {cfg.eval.samples_every}; it must be 0 (every evaluation) or a "
                          f"multiple of eval.every ({cfg.eval.every}), the steps where evaluations happen")
    if cfg.data.source != "toy":
        _refuse(explicit, [k for k in explicit if k.startswith("data.toy.")],
                "data.toy.* only applies to data.source=toy")
    elif cfg.data.toy.world == "forms":
        _refuse(explicit, ["data.toy.ops"], "the forms world always multiplies first, then adds and subtracts")
        if cfg.data.toy.canonical_steps < 0:
            raise ConfigError(f"data.toy.canonical_steps is {cfg.data.toy.canonical_steps}; it must be >= 0")
    else:
        _refuse(explicit, ["data.toy.style", "data.toy.canonical_steps"],
                "only data.toy.world=forms writes steps in several surface forms")
    if r.engine != "vllm" and cfg.scoring.teacher_engine != "vllm":
        for key in sorted(k for k in explicit if k.startswith("vllm.")):
            raise ConfigError(f"{key} cannot take effect: no vLLM engine runs (rollout.engine and "
                              "scoring.teacher_engine are hf); set one of them to vllm or remove it")
    elif r.engine == "vllm" and "rollout.batch_size" in explicit:
        raise ConfigError("rollout.batch_size cannot take effect: vLLM schedules its own batches; remove it")
    v = cfg.vllm
    if not 0 < v.gpu_memory_utilization <= 1 or v.kv_cache_space_gb <= 0 or v.prompt_budget < 1 \
            or (v.max_model_len is not None and v.max_model_len <= r.max_new_tokens):
        raise ConfigError("vllm.gpu_memory_utilization must be in (0, 1], kv_cache_space_gb > 0, prompt_budget "
                          f">= 1 and max_model_len (when set) above rollout.max_new_tokens ({r.max_new_tokens})")
    _check_teacher_url(cfg, explicit)


def _check_optim_and_saving(cfg: Any) -> None:
    import math

    o, t = cfg.optim, cfg.train
    if not math.isfinite(o.lr) or o.lr < 0:
        raise ConfigError(f"optim.lr is {o.lr}; it must be a finite number >= 0 (e.g. 1e-6 for a real model)")
    if o.lr > 1.0:
        warnings.warn(f"optim.lr is {o.lr}: far above any usual range (1e-7..1e-2); expect the student to "
                      "diverge (the step guard stops the run on a non-finite update)", stacklevel=3)
    for key, value in (("optim.weight_decay", o.weight_decay), ("optim.eps", o.eps), ("optim.grad_clip", o.grad_clip),
                       ("optim.min_lr_ratio", o.min_lr_ratio)):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{key} is {value}; it must be a finite number >= 0")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas is {list(o.betas)}; each must be in [0, 1)")
    for key, value in (("optim.warmup_steps", o.warmup_steps), ("train.save_every", t.save_every),
                       ("train.keep_checkpoints", t.keep_checkpoints), ("train.rollouts_every", t.rollouts_every),
                       ("train.rollouts_topk", t.rollouts_topk)):
        if value < 0:
            raise ConfigError(f"{key} is {value}; it must be >= 0 (0 turns it off)")


ENDPOINT_KEYS = frozenset({"vllm.teacher_url", "vllm.request_timeout_s", "vllm.request_retries",
                           "vllm.max_concurrent_requests"})


def _check_teacher_url(cfg: Any, explicit: set[str]) -> None:
    v = cfg.vllm
    if v.teacher_url is None:
        for key in sorted(ENDPOINT_KEYS - {"vllm.teacher_url"}):
            if key in explicit:
                raise ConfigError(f"{key} cannot take effect: it applies to the teacher endpoint only; set "
                                  "vllm.teacher_url or remove it")
        return
    if cfg.rollout.engine != "vllm":
        for key in sorted(k for k in explicit if k.startswith("vllm.") and k not in ENDPOINT_KEYS):
            raise ConfigError(f"{key} cannot take effect: no in-process vLLM engine runs (the teacher is at "
                              "vllm.teacher_url, rollout.engine is hf); remove it")
    if cfg.scoring.teacher_engine != "vllm":
        raise ConfigError("vllm.teacher_url cannot take effect: the teacher is scored by transformers; set "
                          "scoring.teacher_engine=vllm or remove vllm.teacher_url")
    if not str(v.teacher_url).startswith(("http://", "https://")):
        raise ConfigError(f"vllm.teacher_url is {v.teacher_url!r}; give the server's address, e.g. "
                          "http://127.0.0.1:8000")
    if v.request_timeout_s <= 0 or v.request_retries < 0 or v.max_concurrent_requests < 1:
        raise ConfigError("vllm.request_timeout_s must be > 0, request_retries >= 0 and max_concurrent_requests >= 1")


def check_sampler(sampler: Any, method: Any) -> None:
    """Refuse, before any model loads, a method whose per-token stop the sampler cannot host."""
    if method.stop_rule() is not None and not sampler.supports_stop_rules:
        fix = {"vllm": "rollout.engine=hf or ", "ray": "train.mode=sync or "}.get(sampler.name, "")
        raise ConfigError(f"method '{method.name}' stops rows during sampling (online truncation), which the "
                          f"{sampler.name} rollout engine cannot do; set {fix}method.options.online=false")


def method_objective(cfg: TrainRunConfig, user_keys: set[str]) -> tuple[TrainRunConfig, str | None]:
    """The method's own base objective when the user did not choose loss.objective (it came from
    the shipped default config or the defaults) and the configured one is not the method's:
    returns the config to run and a line saying what was applied (None: unchanged)."""
    import dataclasses

    from opdcli.methods.base import method_class

    cls = method_class(cfg.method.name)
    want = cls.default_objective
    if want is None or cfg.loss.objective == want or "loss.objective" in user_keys:
        return cfg, None
    note = (f"method {cfg.method.name} uses loss.objective={want} (its paper's objective; the default "
            f"config's {cfg.loss.objective} does not apply to it; recorded in config.yaml)")
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, objective=want)), note
