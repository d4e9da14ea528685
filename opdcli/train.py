"""`opd train`: synchronous on-policy distillation.

    opd train --config configs/toy/opd.yaml --set train.max_steps=200

Each step: sample from the student, score with student and teacher, let the method turn
signals into weights / advantages, run the base objective on the student with grad, take an
optimizer step, log. Held-out evaluation and checkpoints run on their cadences.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from opdcli.config import TrainRunConfig
from opdcli.data import PromptSource, heldout_prompts, render
from opdcli.methods import Method, MethodOutput, build_method
from opdcli.models import (
    LoadedPair,
    check_logit_widths,
    check_same_vocabulary,
    load_model,
    load_pair,
    load_tokenizer,
)
from opdcli.objective import FULL_DISTRIBUTION, objective_loss
from opdcli.optim import build_optimizer, optimizer_step
from opdcli.rollout.hf import SamplingParams, decode_responses, sample
from opdcli.rollout_log import write_rollout_records
from opdcli.run_dir import RunContext, open_run, progress_bar, setup_process, validate_train_config
from opdcli.scoring import ScoredBatch, score_rollouts
from opdcli.signals import masked_mean, sampled_advantage, topk_overlap
from opdcli.tracking import timed


@dataclass
class TrainResult:
    run_dir: str
    before: dict[str, float]
    after: dict[str, float]
    steps: int


def step(*, cfg: TrainRunConfig, pair: LoadedPair, method: Method, source: PromptSource,
         optimizer, step_idx: int, generator: torch.Generator, reference=None) -> tuple[dict[str, float], Any]:
    """One optimizer step. Returns the step's metrics and what rollouts.jsonl needs."""
    metrics: dict[str, float] = {}
    student, teacher, tok = pair.student, pair.teacher, pair.tokenizer
    prompts = source.next_batch(cfg.rollout.prompts_per_step)
    # sample: the student's own responses under the method's generation budget
    with timed(metrics, "sample"):
        params = SamplingParams(
            n=cfg.rollout.samples_per_prompt, temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
            max_new_tokens=method.max_new_tokens(cfg.rollout.max_new_tokens, step_idx),
            batch_size=cfg.rollout.batch_size)
        rollout = sample(student, tok, [render(tok, p) for p in prompts], params, generator=generator,
                         stop=method.stop_factory(teacher))
    # score: student and teacher per-token log-probs and top-K, no grad
    with timed(metrics, "score"):
        scored = score_rollouts(student, teacher, rollout, k=cfg.scoring.top_k,
                                chunk_tokens=cfg.scoring.chunk_tokens, batch_size=cfg.scoring.batch_size,
                                version=step_idx, keep_teacher_hidden=cfg.loss.objective in FULL_DISTRIBUTION,
                                reference=reference)
    # method: weights and advantages from the signals
    with timed(metrics, "method"):
        advantages_B_T = sampled_advantage(scored.teacher_lp_B_T, scored.student_lp_B_T, scored.mask_B_T,
                                           cfg.loss.kl_coef, cfg.loss.discount)
        out = method.apply(scored, advantages_B_T, step_idx)
        if out.advantages_B_T is None:
            out.advantages_B_T = advantages_B_T
        assert bool((out.weights_B_T >= 0).all()), f"method {method.name} produced negative weights"
    # train: the only forward with grad, split into grad_accum micro-batches
    with timed(metrics, "train"):
        normalizer = max(1.0, float(scored.mask_B_T.sum()))
        loss_total, micro_metrics = 0.0, []
        B, n_micro = rollout.batch_size, cfg.optim.grad_accum
        size = -(-B // n_micro)
        for a in range(0, B, size):
            sl = slice(a, a + size)
            micro_out = MethodOutput(weights_B_T=out.weights_B_T[sl], advantages_B_T=out.advantages_B_T[sl])
            loss, lm = objective_loss(student, teacher, rollout.rows(sl), scored.rows(sl), micro_out,
                                      cfg.loss, normalizer, cfg.scoring.chunk_tokens)
            loss.backward()
            loss_total += float(loss.detach())
            micro_metrics.append(lm)
        metrics |= {k: sum(m[k] for m in micro_metrics) / len(micro_metrics) for k in micro_metrics[0]}
        metrics["loss/total"] = loss_total
        metrics["train/tokens_trained"] = float(((out.weights_B_T > 0) & (scored.mask_B_T > 0)).sum())
        metrics |= optimizer_step(student, optimizer, cfg.optim, step_idx, cfg.train.max_steps)
    metrics |= batch_signals(scored, rollout.finished_B) | out.metrics
    return metrics, (prompts, rollout, scored, out)


def batch_signals(scored: ScoredBatch, finished_B: torch.Tensor) -> dict[str, float]:
    m = scored.mask_B_T
    r = scored.teacher_lp_B_T - scored.student_lp_B_T
    overlap = topk_overlap(scored.student_topk_ids_B_T_K, scored.teacher_topk_ids_B_T_K)
    return {
        "signal/teacher_kl": float(masked_mean(-r, m)),
        "signal/teacher_lp": float(masked_mean(scored.teacher_lp_B_T, m)),
        "signal/student_lp": float(masked_mean(scored.student_lp_B_T, m)),
        "signal/topk_overlap": float(masked_mean(overlap, m)),
        "rollout/response_len": float(m.sum(-1).mean()),
        "rollout/finished_rate": float(finished_B.float().mean()),
        "rollout/tokens": float(m.sum()),
    }


def load_reference(method: Method, cfg: TrainRunConfig, pair: LoadedPair):
    """The frozen reference model a method asks for (G-OPD), checked against the student."""
    name = method.reference_model(cfg.model.student)
    if name is None:
        return None
    check_same_vocabulary(pair.tokenizer, load_tokenizer(name, cfg.model.trust_remote_code),
                          cfg.model.student, name)
    ref = load_model(name, pair.device, pair.dtype, trust_remote_code=cfg.model.trust_remote_code,
                     attn_implementation=cfg.model.attn_implementation)
    check_logit_widths(pair.student, ref, cfg.model.student, name)
    return ref


def run_train(cfg: TrainRunConfig, explicit: set[str], argv: list[str] | None = None) -> TrainResult:
    """Set up, loop, evaluate, checkpoint. See the module docstring."""
    validate_train_config(cfg, explicit)
    setup_process(cfg.run)
    method = build_method(cfg.method.name, cfg.method.options, cfg.loss)
    method.check_scoring(cfg.scoring.top_k)
    source = PromptSource(cfg.data, cfg.run.seed)  # data errors surface before models load
    heldout = heldout_prompts(cfg.data, cfg.eval.size) if cfg.eval.enabled else None
    pair = load_pair(cfg.model.student, cfg.model.teacher, cfg.run.device, cfg.run.dtype,
                     trust_remote_code=cfg.model.trust_remote_code,
                     attn_implementation=cfg.model.attn_implementation)
    optimizer = build_optimizer(pair.student, cfg.optim)
    method.attach(pair.tokenizer)
    reference = load_reference(method, cfg, pair)
    ctx: RunContext = open_run(cfg, argv or sys.argv, pair, optimizer, source, method, heldout)
    before = ctx.evaluate()
    ctx.log_eval(ctx.state.step, before, "before")
    with progress_bar(cfg.train.max_steps, ctx.state.step, "opd train") as bar:
        for step_idx in range(ctx.state.step, cfg.train.max_steps):
            metrics, logged = step(cfg=cfg, pair=pair, method=method, source=source,
                                   optimizer=optimizer, step_idx=step_idx, generator=ctx.generator,
                                   reference=reference)
            if cfg.train.rollouts_every and step_idx % cfg.train.rollouts_every == 0:
                with timed(metrics, "log_rollouts"):
                    prompts, rollout, scored, out = logged
                    write_rollout_records(ctx.rollouts, ctx.run_id, step_idx, prompts, rollout, scored, out,
                                          decode_responses(pair.tokenizer, rollout), method.name,
                                          cfg.train.rollouts_topk)
            ctx.periodic(step_idx, metrics, method)
            bar.advance(metrics)
    after = ctx.evaluate()
    ctx.log_eval(ctx.state.step, after, "after")
    ctx.save(method, final=True)
    ctx.close()
    return TrainResult(str(ctx.run_dir), before, after, ctx.state.step)
