"""`opd train --set train.mode=async`: asynchronous on-policy distillation on Ray rollout workers.

    opd train --method fopd --set train.mode=async --set asynchronous.workers=2

`asynchronous.workers` Ray actors sample prompt batches with the newest weights they have been
sent, while the learner scores, weighs and trains on the oldest finished batch; at most
`asynchronous.buffer` batches are in flight or waiting. Every row carries the version that
sampled it; rows more than `asynchronous.max_lag` versions old are dropped before scoring.
The learner publishes its weights through the object store after every optimizer step.
Method `fopd` turns lag and drift into freshness weights; any other method runs as
"async without control" (stale rows dropped, nothing else corrected).
"""

from __future__ import annotations

import sys
import time
from collections import deque

from opdcli import stages
from opdcli.assembly import engine_max_len
from opdcli.config import TrainRunConfig
from opdcli.data import PromptSource, render
from opdcli.dist import ALONE, from_env
from opdcli.engines.hf_sampler import decode_responses
from opdcli.engines.ray_workers import RayWorkerPool
from opdcli.errors import ConfigError, OpdError
from opdcli.records.rows import write_rollout_records
from opdcli.run.context import RunResult
from opdcli.run.interrupt import StopOnSignal
from opdcli.run.progress import console, progress_bar
from opdcli.run.setup import prepare_training
from opdcli.run.tracking import timed
from opdcli.validate import validate_train_config


class _TrainedFeed:
    """The prompt stream, whose position counts only the prompts of batches already trained on
    (a resumed run samples the in-flight batches again)."""

    def __init__(self, source: PromptSource, per_batch: int) -> None:
        self.source, self.per_batch, self.inflight = source, per_batch, 0

    @property
    def position(self) -> int:
        return self.source.position - self.per_batch * self.inflight

    def next_batch(self, n: int):
        return self.source.next_batch(n)

    def skip_to(self, position: int) -> None:
        self.source.skip_to(position)


def run_train_async(cfg: TrainRunConfig, explicit: set[str], argv: list[str] | None = None) -> RunResult:
    """Set up the learner and the worker pool, loop, evaluate, checkpoint; always stop the workers."""
    validate_train_config(cfg, explicit)
    if from_env().active:
        raise ConfigError("train.mode=async runs one learner process; start it without torchrun")
    run = prepare_training(cfg, argv or sys.argv, ALONE, RayWorkerPool, local_sampling=False,
                           wrap_source=lambda s: _TrainedFeed(s, cfg.rollout.prompts_per_step))
    method, feed, pair, parts, ctx = run.method, run.source, run.pair, run.parts, run.ctx
    m, a = cfg.model, cfg.asynchronous
    pool = RayWorkerPool(a.workers, m.student, cfg.run.device, cfg.run.dtype, cfg.run.seed, a.worker_threads,
                         address=cfg.run.ray_address, trust_remote_code=m.trust_remote_code,
                         attn_implementation=m.attn_implementation,
                         teacher=m.teacher if a.worker_scoring else None, chunk_tokens=cfg.scoring.chunk_tokens,
                         score_batch=cfg.scoring.batch_size, engine=cfg.rollout.engine, vllm=cfg.vllm,
                         max_model_len=engine_max_len(cfg), gpus=a.worker_gpus,
                         nccl=cfg.vllm.weight_sync == "nccl")
    try:  # Ctrl-C or a scheduler's SIGTERM: stop after the step, with a checkpoint
        return ctx.drive(parts.learner, method,
                         lambda stop: _loop(cfg, parts, method, feed, pool, ctx, pair.tokenizer, pair.device, stop))
    finally:
        pool.close()


def _collect(pool: RayWorkerPool, inflight: deque, resubmit, max_restarts: int):
    """The oldest batch in flight: (rollout, seconds, worker, prompts). A worker whose process died
    is replaced and its batch sampled again (up to `max_restarts` times per worker); any other
    failure stops the run with the worker's own last error line."""
    while True:
        ref, worker, prompts = inflight.popleft()
        try:
            rollout, seconds = pool.ray.get(ref)
            return rollout, seconds, worker, prompts
        except pool.ray.exceptions.RayError as exc:
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            if not pool.died(exc):
                raise OpdError(f"rollout worker {worker} failed: {cause}") from None
            if pool.restarts[worker] >= max_restarts:
                raise OpdError(f"rollout worker {worker} died ({type(exc).__name__}: {cause}) after "
                               f"{pool.restarts[worker]} restart(s); raise asynchronous.max_restarts or "
                               "look at the worker's log under /tmp/ray/session_latest/logs") from None
            pool.restart(worker)
            console.print(f"[yellow]rollout worker {worker} died ({type(exc).__name__}); restarted it "
                          f"({pool.restarts[worker]} of {max_restarts}) and resampled its batch[/]")
            inflight.appendleft((resubmit(worker, prompts), worker, prompts))


def _loop(cfg: TrainRunConfig, parts, method, feed: _TrainedFeed, pool: RayWorkerPool, ctx, tokenizer,
          device, stop: StopOnSignal) -> None:
    a, P = cfg.asynchronous, cfg.rollout.prompts_per_step
    params = stages.sampling_params(cfg.rollout)
    pool.publish(parts.learner.replica_state(), ctx.state.step)
    inflight: deque = deque()

    def send(worker: int, prompts):
        control = method.generation_control(cfg.rollout.max_new_tokens, pool.version)
        return pool.submit(worker, [render(tokenizer, p) for p in prompts], params, control)

    def submit(worker: int) -> None:
        prompts = feed.next_batch(P)
        inflight.append((send(worker, prompts), worker, prompts))
        feed.inflight = len(inflight)

    try:
        pool.wait_ready()
    except pool.ray.exceptions.RayError as exc:
        raise OpdError(f"a rollout worker could not start: {(str(exc).strip().splitlines() or [''])[-1]}") from None
    for k in range(a.buffer):
        submit(k % a.workers)
    start, generated, busy = time.perf_counter(), 0.0, 0.0
    with progress_bar(cfg.train.max_steps, ctx.state.step, "opd train (async)") as bar:
        while ctx.state.step < cfg.train.max_steps:
            stop.check()
            step_idx, metrics, t0 = ctx.state.step, {}, time.perf_counter()
            with timed(metrics, "wait"):  # the learner's idle time
                rollout, seconds, worker, prompts = _collect(pool, inflight, send, a.max_restarts)
                rollout = stages.route(rollout.to(device), prompts)
                fill = len(pool.ray.wait([r for r, _, _ in inflight], num_returns=len(inflight), timeout=0)[0]) \
                    if inflight else 0
            submit(worker)  # the worker goes on at once, with the newest weights
            busy += seconds
            generated += float(rollout.response_mask_B_T.sum())
            lag_B = step_idx - rollout.version_B
            keep = [b for b, lag in enumerate(lag_B.tolist()) if a.max_lag is None or lag <= a.max_lag]
            metrics |= {"async/lag_mean": float(lag_B.float().mean()), "async/lag_max": float(lag_B.max()),
                        "async/lag_p50": float(lag_B.float().median()),
                        "async/lag_p90": float(lag_B.float().quantile(0.9)),
                        "async/dropped_stale_frac": 1.0 - len(keep) / max(1, rollout.batch_size),
                        "async/buffer_fill": fill / max(1, a.buffer)}
            if keep:
                rollout = rollout.rows(keep)
                with timed(metrics, "score"):
                    scored = stages.score(parts.scorer, rollout, cfg.loss.objective)
                if cfg.model.teachers:
                    metrics |= stages.route_signals(rollout, scored, cfg.model.teachers, ALONE)
                with timed(metrics, "method"):
                    rows, whole = stages.gather(rollout, scored, ALONE)
                    out = stages.weigh(method, whole, rows, cfg.loss, step_idx)
                with timed(metrics, "train"):
                    # a non-finite signal stops the run, or (skip) the step trains on nothing
                    if not stages.guard(stages.bad_signal(scored, ALONE), step_idx, cfg.train.on_nonfinite, metrics):
                        metrics |= stages.learn(parts.learner, parts.scorer, rollout, scored, out, cfg, step_idx,
                                                ALONE)
                        stages.guard(stages.bad_update(metrics, scored), step_idx, cfg.train.on_nonfinite, metrics)
                    parts.sampler.sync_weights(None, step_idx + 1)
                    pool.publish(parts.learner.replica_state(), step_idx + 1)
                metrics |= stages.batch_signals(whole, rows.finished_B) | out.metrics
                if cfg.train.rollouts_every and step_idx % cfg.train.rollouts_every == 0:
                    with timed(metrics, "log_rollouts"):
                        write_rollout_records(ctx.rollouts, ctx.run_id, step_idx, prompts, rows, whole, out,
                                              decode_responses(tokenizer, rows), method.name,
                                              cfg.train.rollouts_topk, with_lag=True)
            wall = time.perf_counter() - start
            metrics |= {"async/learner_idle_frac": metrics["time/wait"] / max(1e-9, time.perf_counter() - t0),
                        "async/worker_idle_frac": max(0.0, 1.0 - busy / max(1e-9, a.workers * wall)),
                        "async/generated_tokens_per_s": generated / max(1e-9, wall),
                        "time/step_total": time.perf_counter() - t0}  # the step's wall time, before eval
            if not keep:  # every row was too stale: no optimizer step, nothing trained
                ctx.metrics.log(step_idx, metrics)
                continue
            ctx.periodic(step_idx, metrics, parts.learner, method)
            bar.advance(metrics)
