"""The run directory and what every command writes into it.

open_run creates (or resumes) run_dir, writes config.yaml (resolved), command.txt and
environment.json, opens metrics.jsonl and rollouts.jsonl, and restores the trainer state
when run.resume is set. Also: cross-field config validation and the rich progress bar.
"""

from __future__ import annotations

import json
import platform
import shlex
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from opdcli import __version__
from opdcli.checkpoint import TrainState, load_trainer_state, resolve_resume, save_checkpoint
from opdcli.config import TrainRunConfig, dump_config
from opdcli.errors import ConfigError
from opdcli.records import RolloutWriter
from opdcli.tracking import MetricsLogger

console = Console(stderr=True)


@dataclass
class RunContext:
    run_dir: Path
    run_id: str
    cfg: Any
    pair: Any
    optimizer: Any
    source: Any
    metrics: MetricsLogger
    rollouts: RolloutWriter | None
    state: TrainState
    generator: torch.Generator
    heldout: list[Any] | None

    def evaluate(self) -> dict[str, float]:
        """Greedy held-out accuracy of the student (empty when the data has no held-out set)."""
        if self.heldout is None:
            return {}
        from opdcli.heldout import heldout_accuracy

        tokens = self.cfg.eval.max_new_tokens or self.cfg.rollout.max_new_tokens
        return heldout_accuracy(self.pair.student, self.pair.tokenizer, self.heldout, tokens,
                                self.cfg.eval.batch_size)

    def periodic(self, step_idx: int, metrics: dict[str, float], method: Any) -> None:
        """After an optimizer step: bookkeeping, cadenced eval, logging and checkpoints."""
        self.state.step, self.state.prompt_position = step_idx + 1, self.source.position
        every, done = self.cfg.eval.every, step_idx + 1
        if every and done % every == 0 and done < self.cfg.train.max_steps:
            from opdcli.tracking import timed

            with timed(metrics, "eval"):
                metrics |= self.evaluate()
        self.metrics.log(done, metrics)
        if self.cfg.train.save_every and done % self.cfg.train.save_every == 0:
            self.save(method)

    def log_eval(self, step: int, values: dict[str, float], label: str) -> None:
        if not values:
            return
        self.metrics.log(step, {k.replace("eval/", f"eval_{label}/", 1): v for k, v in values.items()})
        acc = next((v for k, v in values.items() if k.endswith("/accuracy")), None)
        if acc is not None:
            console.print(f"[bold]held-out accuracy {label}[/bold] (step {step}): {100 * acc:.1f}%")

    def save(self, method, final: bool = False) -> Path:
        self.state.method = method.state_dict() if method is not None else {}
        self.state.generator = self.generator.get_state()
        return save_checkpoint(self.run_dir, self.pair.student, self.pair.tokenizer, self.optimizer,
                               self.state, keep=self.cfg.train.keep_checkpoints, final=final)

    def close(self) -> None:
        self.metrics.close()
        if self.rollouts is not None:
            self.rollouts.close()


def open_run(cfg: Any, argv: list[str], pair, optimizer, source, method, heldout, *,
             write_rollouts: bool = True) -> RunContext:
    run_dir = Path(cfg.run.out_dir).expanduser()
    state = TrainState()
    resume = cfg.run.resume
    if resume is not None:
        ckpt = resolve_resume(resume)
        from opdcli.models import load_model

        loaded = load_model(str(ckpt), pair.device, pair.dtype, trainable=True)
        pair.student.load_state_dict(loaded.state_dict())
        state = load_trainer_state(ckpt, optimizer)
        source.skip_to(state.prompt_position)
        if method is not None:
            method.load_state_dict(state.method)
        console.print(f"resuming from {ckpt} at step {state.step}")
    elif (run_dir / "metrics.jsonl").exists() and not cfg.run.overwrite:
        raise ConfigError(
            f"run directory '{run_dir}' already holds a run; pick a new run.out_dir, "
            "resume it with --set run.resume=<dir>, or pass --set run.overwrite=true"
        )
    elif (run_dir / "metrics.jsonl").exists():
        for name in ("metrics.jsonl", "rollouts.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    (run_dir / "command.txt").write_text(shlex.join(argv) + "\n", encoding="utf-8")
    env = {"opd": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": str(pair.device), "dtype": str(pair.dtype), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (run_dir / "environment.json").write_text(json.dumps(env, indent=2) + "\n", encoding="utf-8")
    rollouts = RolloutWriter(run_dir / "rollouts.jsonl") if write_rollouts else None
    generator = torch.Generator(device=pair.device).manual_seed(cfg.run.seed)
    if state.generator is not None:
        generator.set_state(state.generator)
    return RunContext(run_dir, uuid.uuid4().hex[:12], cfg, pair, optimizer, source,
                      MetricsLogger(run_dir, cfg.train.tensorboard), rollouts, state, generator, heldout)


def setup_process(run: Any) -> None:
    """Seed python and torch, and set the CPU thread count, before anything else runs."""
    import random

    random.seed(run.seed)
    torch.manual_seed(run.seed)
    if run.threads > 0:
        torch.set_num_threads(run.threads)


def _refuse(explicit: set[str], keys: list[str], reason: str) -> None:
    for key in keys:
        if key in explicit:
            raise ConfigError(f"{key} cannot take effect: {reason}; remove it or change the objective")


def validate_train_config(cfg: TrainRunConfig, explicit: set[str]) -> None:
    """Cross-field rules; a flag that cannot take effect raises."""
    obj = cfg.loss.objective
    if not 1 <= cfg.scoring.top_k <= 64:
        raise ConfigError(f"scoring.top_k is {cfg.scoring.top_k}; it must be in 1..64")
    if cfg.train.rollouts_topk > cfg.scoring.top_k:
        raise ConfigError(f"train.rollouts_topk ({cfg.train.rollouts_topk}) exceeds scoring.top_k "
                          f"({cfg.scoring.top_k}); lower it or raise scoring.top_k")
    if obj in ("rkl", "fkl", "jsd"):
        _refuse(explicit, ["loss.surrogate", "loss.clip_low", "loss.clip_high", "loss.kl_coef",
                           "loss.discount", "loss.topk_weight"],
                f"loss.objective={obj} is differentiated analytically, not by a policy gradient")
    else:
        _refuse(explicit, ["loss.support", "loss.support_k", "loss.tail_bucket"],
                f"loss.objective={obj} has no distribution support (use rkl, fkl or jsd)")
    if obj != "jsd":
        _refuse(explicit, ["loss.beta", "loss.jsd_temperature"], "only loss.objective=jsd uses it")
    if obj == "topk":
        _refuse(explicit, ["loss.kl_coef", "loss.discount", "loss.surrogate"],
                "the top-K objective builds its own per-candidate advantages with a PPO clip")
    if obj == "sampled":
        _refuse(explicit, ["loss.topk_weight"], "only loss.objective=topk weighs candidates")
        if cfg.loss.surrogate != "ppo":
            _refuse(explicit, ["loss.clip_low", "loss.clip_high"], "only loss.surrogate=ppo clips")
    if cfg.loss.support == "full":
        _refuse(explicit, ["loss.support_k", "loss.tail_bucket"], "loss.support=full has no top-K")
    if not 0.0 <= cfg.loss.discount <= 1.0:
        raise ConfigError(f"loss.discount is {cfg.loss.discount}; it must be in [0, 1]")
    if not 0.0 <= cfg.loss.beta <= 1.0:
        raise ConfigError(f"loss.beta is {cfg.loss.beta}; it must be in [0, 1]")
    validate_common(cfg, explicit)
    if (cfg.rollout.top_p < 1 or cfg.rollout.top_k > 0 or cfg.rollout.temperature != 1.0) and obj != "sampled":
        warnings.warn(f"rollouts are not sampled from the student itself (temperature/top-p/top-k) and "
                      f"loss.objective={obj} has no importance ratio: the gradient is biased", stacklevel=2)


def validate_common(cfg: Any, explicit: set[str]) -> None:
    r = cfg.rollout
    for key, value in (("rollout.prompts_per_step", r.prompts_per_step), ("rollout.samples_per_prompt",
                       r.samples_per_prompt), ("rollout.max_new_tokens", r.max_new_tokens),
                       ("rollout.batch_size", r.batch_size), ("train.max_steps", cfg.train.max_steps),
                       ("optim.grad_accum", cfg.optim.grad_accum)):
        if value < 1:
            raise ConfigError(f"{key} is {value}; it must be at least 1")
    if r.temperature < 0 or not 0 < r.top_p <= 1:
        raise ConfigError("rollout.temperature must be >= 0 and rollout.top_p in (0, 1]")
    if cfg.optim.grad_accum > r.prompts_per_step * r.samples_per_prompt:
        raise ConfigError(f"optim.grad_accum ({cfg.optim.grad_accum}) exceeds the sequences per step "
                          f"({r.prompts_per_step * r.samples_per_prompt}); lower it")
    if cfg.data.source != "toy":
        _refuse(explicit, [k for k in explicit if k.startswith("data.toy.")],
                "data.toy.* only applies to data.source=toy")


class _Bar:
    def __init__(self, progress: Progress, task: Any) -> None:
        self.progress, self.task = progress, task

    def advance(self, metrics: dict[str, float]) -> None:
        parts = []
        for key, label in (("loss/total", "loss"), ("signal/teacher_kl", "kl"),
                           ("eval/heldout/accuracy", "acc"), ("rollout/response_len", "len")):
            if key in metrics:
                parts.append(f"{label} {metrics[key]:.3f}" if label != "len" else f"len {metrics[key]:.0f}")
        self.progress.update(self.task, advance=1, info="  ".join(parts))


@contextmanager
def progress_bar(total: int, start: int, label: str) -> Iterator[_Bar]:
    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console)
    with progress:
        task = progress.add_task(label, total=total, completed=start, info="")
        yield _Bar(progress, task)
