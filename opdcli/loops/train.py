"""`opd train`: synchronous on-policy distillation, on one process or data-parallel.

    opd train --config configs/toy/opd.yaml --set train.max_steps=200
    torchrun --nproc_per_node 2 $(which opd) train --config configs/toy/opd.yaml

Each step: sample from the student, score with student and teacher, let the method turn
signals into weights / advantages, run the base objective on the student with grad, take an
optimizer step, push the new weights to the sampler, log. Held-out evaluation and checkpoints
run on their cadences. Under torchrun each rank owns an equal, contiguous share of the step's
sequences; the result equals one process running the same global batch.
"""

from __future__ import annotations

import sys
import time

from opdcli import dist, stages
from opdcli.assembly import Parts, sampler_class
from opdcli.config import TrainRunConfig
from opdcli.data import PromptSource, render
from opdcli.engines.hf_sampler import decode_responses
from opdcli.errors import ConfigError
from opdcli.methods import Method
from opdcli.objective import StudentStats
from opdcli.records.rows import write_rollout_records
from opdcli.run.context import RunResult
from opdcli.run.interrupt import StopOnSignal
from opdcli.run.progress import progress_bar
from opdcli.run.setup import prepare_training
from opdcli.run.tracking import timed
from opdcli.validate import validate_train_config


def step(*, cfg: TrainRunConfig, parts: Parts, method: Method, source: PromptSource, tokenizer,
         step_idx: int, d: dist.Dist) -> tuple[dict[str, float], tuple | None]:
    """One optimizer step. Returns the step's metrics and what rollouts.jsonl needs (None for a
    step skipped on a non-finite signal, train.on_nonfinite=skip)."""
    metrics: dict[str, float] = {}
    prompts = source.next_batch(cfg.rollout.prompts_per_step)
    # sample: this rank's rows of the student's own responses, under the method's control
    with timed(metrics, "sample"):
        control = method.generation_control(cfg.rollout.max_new_tokens, step_idx)
        rollout = stages.route(stages.sample(parts.sampler, [render(tokenizer, p) for p in prompts],
                                             stages.sampling_params(cfg.rollout), d, control), prompts)
    # score: student and teacher per-token log-probs and top-K, no grad
    # (the student's own scores come from its training forward where the method allows it)
    fused = stages.student_from_train(cfg, method)
    with timed(metrics, "score"):
        scored = stages.score(parts.scorer, rollout, cfg.loss.objective, fused)
    if cfg.model.teachers:
        metrics |= stages.route_signals(rollout, scored, cfg.model.teachers, d)
    if stages.guard(stages.bad_signal(scored, d, student=not fused), step_idx, cfg.train.on_nonfinite, metrics):
        return metrics, None  # skipped before any update
    # method: weights and advantages, computed on the global batch
    with timed(metrics, "method"):
        rows, whole = stages.gather(rollout, scored, d)
        out = stages.weigh(method, whole, rows, cfg.loss, step_idx, fused)
        mine = stages.local_rows(out, d)
    # train: the only forward with grad, over grad_accum micro-batches, one global normaliser
    with timed(metrics, "train"):
        collected: list | None = [] if fused else None
        metrics |= stages.learn(parts.learner, parts.scorer, rollout, scored, mine, cfg, step_idx, d, collected)
        parts.sampler.sync_weights(parts.learner.full_weights(), step_idx + 1)
    stages.guard(stages.bad_update(metrics, scored), step_idx, cfg.train.on_nonfinite, metrics)
    metrics["score/student_from_train"] = float(fused)
    if collected is not None:
        whole = stages.fill_student(whole, StudentStats.cat(collected), d)
    metrics |= stages.batch_signals(whole, rows.finished_B) | out.metrics
    return metrics, (prompts, rows, whole, out)


def run_train(cfg: TrainRunConfig, explicit: set[str], argv: list[str] | None = None) -> RunResult:
    """Set up, loop, evaluate, checkpoint. See the module docstring."""
    validate_train_config(cfg, explicit)
    d = dist.init(cfg.run.device, cfg.dist.backend)
    try:
        return _run(cfg, argv or sys.argv, d)
    finally:
        dist.shutdown(d)


def _run(cfg: TrainRunConfig, argv: list[str], d: dist.Dist) -> RunResult:
    if cfg.train.mode != "sync":
        raise ConfigError("train.mode=async is run by `opd train` itself (not by opd sweep); "
                          "use opd train, or train.mode=sync")
    run = prepare_training(cfg, argv, d, sampler_class(cfg))
    method, source, pair, parts, ctx = run.method, run.source, run.pair, run.parts, run.ctx

    def loop(stop: StopOnSignal) -> None:
        with progress_bar(cfg.train.max_steps, ctx.state.step, "opd train", show=d.is_main) as bar:
            for step_idx in range(ctx.state.step, cfg.train.max_steps):
                stop.check()
                t0 = time.perf_counter()
                metrics, logged = step(cfg=cfg, parts=parts, method=method, source=source, tokenizer=pair.tokenizer,
                                       step_idx=step_idx, d=d)
                if logged is not None and cfg.train.rollouts_every and step_idx % cfg.train.rollouts_every == 0 \
                        and d.is_main:
                    with timed(metrics, "log_rollouts"):
                        prompts, rows, whole, out = logged
                        write_rollout_records(ctx.rollouts, ctx.run_id, step_idx, prompts, rows, whole, out,
                                              decode_responses(pair.tokenizer, rows), method.name,
                                              cfg.train.rollouts_topk)
                metrics["time/step_total"] = time.perf_counter() - t0  # the step's wall time, before eval
                ctx.periodic(step_idx, metrics, parts.learner, method)
                bar.advance(metrics)

    return ctx.drive(parts.learner, method, loop)
