"""The set-up both training loops share: the method (checked before any model loads), the
prompt stream, the models (resumed weights included), the run's parts and its directory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from opdcli import dist
from opdcli.assembly import Parts, assemble, check_engine, check_placement, teacher_loading
from opdcli.data import PromptSource, heldout_prompts
from opdcli.doctor import preflight
from opdcli.engines.vllm_scorer import check_teacher_engine
from opdcli.methods import Method, build_method
from opdcli.models import (
    LoadedPair,
    load_configured_pair,
    load_reference,
    load_teachers,
    load_weights,
)
from opdcli.run.context import RunContext, open_run, resume_point, setup_process
from opdcli.run.trackers import check_trackers
from opdcli.stages import student_from_train
from opdcli.validate import check_routes, check_sampler


@dataclass
class Training:
    method: Method
    source: Any
    pair: LoadedPair
    parts: Parts
    ctx: RunContext


def prepare_training(cfg: Any, argv: list[str], d: dist.Dist, sampler: Any,
                     wrap_source: Callable[[PromptSource], Any] | None = None, local_sampling: bool = True) -> Training:
    """Everything up to the first step; `sampler` is the engine class the loop samples with
    (its capabilities are checked), `wrap_source` adapts the prompt stream the run resumes.
    `local_sampling` false: the loop samples elsewhere (Ray workers), so this process builds no
    rollout engine of its own (its parts' sampler only holds the policy)."""
    setup_process(cfg.run)
    method = build_method(cfg.method.name, cfg.method.options, cfg.loss)
    method.check_scoring(cfg.scoring.top_k)
    check_sampler(sampler, method)
    check_placement(cfg, d, cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt,
                    method.stop_rule() is not None)
    source = PromptSource(cfg.data, cfg.run.seed)  # data errors surface before models load
    check_routes(cfg, source.teacher_tags(), method)  # model.teachers: before any engine is built
    check_teacher_engine(cfg, method)
    student_from_train(cfg, method)  # scoring.student_scores=train_forward where it cannot act: refused now
    check_engine(cfg, cfg.model.student, "student")
    preflight(cfg, report=d.is_main)  # the pair's tokenizers, templates, EOS, context: `opd doctor`
    check_trackers(cfg.train)  # train.wandb / trackio without their package: refused before models load
    heldout = heldout_prompts(cfg.data, cfg.eval.size) if cfg.eval.enabled else None
    ckpt = resume_point(cfg)
    m = cfg.model
    pair = load_configured_pair(m, dist.device_for(cfg.run.device, d), cfg.run.dtype,
                                master_weights=cfg.run.master_weights, **teacher_loading(cfg))
    if ckpt is not None:
        load_weights(pair.student, ckpt)
    method.attach(pair.tokenizer)
    reference = load_reference(method.reference_model(m.student), pair, m)
    parts = assemble(cfg, pair, d, torch.Generator(device=pair.device), reference=reference,
                     engine=cfg.rollout.engine if local_sampling else "hf", teachers=load_teachers(pair, m))
    feed = wrap_source(source) if wrap_source is not None else source
    ctx = open_run(cfg, argv, d, eval_model=parts.policy, tokenizer=pair.tokenizer, device=pair.device,
                   dtype=pair.dtype, source=feed, heldout=heldout, learner=parts.learner, method=method, ckpt=ckpt)
    parts.sampler.generator = ctx.generator
    parts.sampler.sync_weights(None, ctx.state.step)
    return Training(method, feed, pair, parts, ctx)
