"""The run directory and what every training command writes into it.

open_run creates (or resumes) run_dir, writes config.yaml (resolved), command.txt and
environment.json, opens metrics.jsonl and rollouts.jsonl, and restores the trainer state
when run.resume is set. Under torchrun only the main rank writes and logs; every rank takes
part in held-out evaluation (a share of the problems each) and in the collectives of a checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opdcli import __version__
from opdcli.config import dump_config
from opdcli.dist import Dist
from opdcli.errors import ConfigError
from opdcli.records import RolloutWriter
from opdcli.run.checkpoint import TrainState, load_trainer_state, resolve_resume, save_checkpoint
from opdcli.run.interrupt import StopOnSignal
from opdcli.run.progress import console
from opdcli.run.rundir import check_resume_config, cut_to_step, lock_run_dir
from opdcli.run.trackers import open_trackers
from opdcli.run.tracking import MetricsLogger, timed

STALL_STEPS = 10
"""Steps in a row without any change to the student before a warning."""


@dataclass
class RunResult:
    """What a training command returns: its directory, held-out metrics and steps done."""

    run_dir: str
    before: dict[str, float]
    after: dict[str, float]
    steps: int


@dataclass
class RunContext:
    """A run's files, resumable state and the model its held-out evaluation samples from."""

    run_dir: Path
    run_id: str
    cfg: Any
    d: Dist
    eval_model: Any
    """A plain transformers model with the learner's current weights (the sampler's)."""
    tokenizer: Any
    source: Any
    metrics: MetricsLogger | None
    rollouts: RolloutWriter | None
    state: TrainState
    generator: torch.Generator
    heldout: list[Any] | None
    resumed: bool = False
    lock: int | None = None
    """The run directory's lock (rundir.lock_run_dir), held until close()."""
    skipped_steps: int = 0
    idle_steps: int = 0
    collapse_warned: bool = False

    def evaluate(self, sampled: bool = True) -> dict[str, float]:
        """Greedy held-out accuracy of the student (every rank decodes a share; empty without a
        set), and the sampled one when eval.samples > 0 and `sampled`."""
        if self.heldout is None:
            return {}
        from opdcli.run.heldout import heldout_accuracy

        e = self.cfg.eval
        tokens = e.max_new_tokens or self.cfg.rollout.max_new_tokens
        stops = tuple(self.cfg.rollout.stop_tokens)
        out = heldout_accuracy(self.eval_model, self.tokenizer, self.heldout, tokens, e.batch_size,
                               d=self.d, stop_tokens=stops)
        if e.samples > 0 and sampled:
            out |= heldout_accuracy(self.eval_model, self.tokenizer, self.heldout, tokens, e.batch_size,
                                    prefix="eval/heldout_sampled", d=self.d, stop_tokens=stops,
                                    samples=e.samples, temperature=e.temperature, seed=e.seed)
        return out

    def periodic(self, step_idx: int, metrics: dict[str, float], learner: Any, method: Any) -> None:
        """After an optimizer step: bookkeeping, cadenced eval, logging and checkpoints."""
        self.state.step, self.state.prompt_position = step_idx + 1, self.source.position
        self._watch_updates(metrics)
        every, done = self.cfg.eval.every, step_idx + 1
        if every and done % every == 0 and done < self.cfg.train.max_steps:
            sampled = not self.cfg.eval.samples_every or done % self.cfg.eval.samples_every == 0
            with timed(metrics, "eval"):
                metrics |= self.evaluate(sampled)
        if self.metrics is not None:
            self.metrics.log(done, metrics)
        if self.cfg.train.save_every and done % self.cfg.train.save_every == 0:
            self.save(learner, method)

    def _watch_updates(self, metrics: dict[str, float]) -> None:
        """Count skipped steps (train/skipped_steps) and warn once when STALL_STEPS steps in a row
        changed nothing (skipped, zero gradient or zero learning rate)."""
        skipped = bool(metrics.get("train/skipped") or metrics.get("optim/skipped"))
        self.skipped_steps += skipped
        metrics["train/skipped_steps"] = float(self.skipped_steps)
        idle = skipped or metrics.get("optim/grad_norm", 1.0) == 0 or metrics.get("optim/lr", 1.0) == 0
        self.idle_steps = self.idle_steps + 1 if idle else 0
        self._watch_collapse(metrics)
        if self.idle_steps == STALL_STEPS and self.d.is_main:
            console.print(f"[yellow]warning:[/yellow] the student has not changed for {STALL_STEPS} steps "
                          f"(step {self.state.step}: skipped, zero gradient or zero learning rate); check optim.lr, "
                          "the teacher and the method's weights", highlight=False)

    def _watch_collapse(self, metrics: dict[str, float]) -> None:
        """Warn once when the student's own samples look uniform over its vocabulary (mean
        sampled log-prob within 10% of -log V): a diverged update, usually a learning rate far
        too high, that stays finite."""
        import math

        lp = metrics.get("signal/student_lp")
        vocab = getattr(getattr(self.eval_model, "config", None), "vocab_size", None)
        if self.collapse_warned or lp is None or not isinstance(vocab, int) or vocab < 2 or not math.isfinite(lp):
            return
        if lp <= -0.9 * math.log(vocab):
            self.collapse_warned = True
            if self.d.is_main:
                console.print(f"[yellow]warning:[/yellow] at step {self.state.step} the student's samples have a mean "
                              f"log-prob of {lp:.2f}, close to a uniform distribution over its {vocab} tokens "
                              f"({-math.log(vocab):.2f}): training has likely diverged; lower optim.lr "
                              f"(now {metrics.get('optim/lr')})", highlight=False)

    def log_eval(self, step: int, values: dict[str, float], label: str) -> None:
        if not values or self.metrics is None:
            return
        if label == "before" and self.resumed:
            label = "resumed"  # the run's own eval_before rows are already in metrics.jsonl
        self.metrics.log(step, {k.replace("eval/", f"eval_{label}/", 1): v for k, v in values.items()})
        acc = next((v for k, v in values.items() if k.endswith("/accuracy")), None)
        if acc is not None:
            console.print(f"[bold]held-out accuracy {label}[/bold] (step {step}): {100 * acc:.1f}%")

    def save(self, learner: Any, method: Any, final: bool = False) -> Path | None:
        """Checkpoint (a collective under torchrun; the main rank writes)."""
        weights, optimizer_state = learner.checkpoint_state()
        if not self.d.is_main:
            return None
        self.state.method = method.state_dict() if method is not None else {}
        self.state.generator = self.generator.get_state()
        return save_checkpoint(self.run_dir, self.eval_model, self.tokenizer, optimizer_state, self.state,
                               keep=self.cfg.train.keep_checkpoints, final=final, weights=weights,
                               merge=self.cfg.model.lora.merge)

    def drive(self, learner: Any, method: Any, loop: Callable[[StopOnSignal], None]) -> RunResult:
        """A training command's life: held-out evaluation before, `loop(stop)` (which calls
        `stop.check()` before each step), evaluation after, the final checkpoint. Ctrl-C or
        SIGTERM stops at a step boundary with a checkpoint (KeyboardInterrupt goes on to the
        CLI, exit 130); the run files are always closed."""
        try:
            with StopOnSignal(self.d) as stop:
                before = self.evaluate()
                self.log_eval(self.state.step, before, "before")
                loop(stop)
                after = self.evaluate()
                self.log_eval(self.state.step, after, "after")
                self.save(learner, method, final=True)
        except KeyboardInterrupt:
            self.interrupted(learner, method)
            raise
        finally:
            self.close()
        return RunResult(str(self.run_dir), before, after, self.state.step)

    def interrupted(self, learner: Any, method: Any) -> None:
        """Ctrl-C / SIGTERM: checkpoint the steps done since the last save and say how to resume."""
        root = self.run_dir / "checkpoints"
        saved = (root / f"step_{self.state.step}").is_dir()
        path = root / f"step_{self.state.step}" if saved or self.state.step == 0 else self.save(learner, method)
        if self.d.is_main:
            where = f"checkpoint {path}" if self.state.step else "no step finished, nothing to save"
            console.print(f"interrupted at step {self.state.step}: {where}; resume with "
                          f"--set run.resume={self.run_dir}", highlight=False)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.rollouts is not None:
            self.rollouts.close()
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def resume_point(cfg: Any) -> Path | None:
    """The checkpoint run.resume names (checked before any model loads), or None."""
    return None if cfg.run.resume is None else resolve_resume(cfg.run.resume)


def open_run(cfg: Any, argv: list[str], d: Dist, *, eval_model: Any, tokenizer: Any, device: torch.device,
             dtype: torch.dtype, source: Any, heldout: list[Any] | None, learner: Any = None, method: Any = None,
             write_rollouts: bool = True, ckpt: Path | None = None) -> RunContext:
    """Prepare the run directory and restore the trainer state of `ckpt` (resume_point(cfg); the
    caller has loaded its weights)."""
    run_dir = Path(cfg.run.out_dir).expanduser()
    state = TrainState()
    lock = lock_run_dir(run_dir) if d.is_main else None  # before anything in it changes
    try:
        if ckpt is not None:
            state = load_trainer_state(ckpt, learner.load_optimizer_state)
            if d.is_main:
                check_resume_config(ckpt.parent.parent / "config.yaml", cfg, run_dir, state.step)
            source.skip_to(state.prompt_position)
            if method is not None:
                method.load_state_dict(state.method)
            if d.is_main:
                console.print(f"resuming from {ckpt} at step {state.step}")
        elif (run_dir / "metrics.jsonl").exists() and not cfg.run.overwrite:
            raise ConfigError(
                f"run directory '{run_dir}' already holds a run; pick a new run.out_dir, "
                "resume it with --set run.resume=<dir>, or pass --set run.overwrite=true"
            )
        d.barrier()  # every rank has checked the directory before the main rank changes it
        metrics = rollouts = None
        if d.is_main:
            if ckpt is None and (run_dir / "metrics.jsonl").exists():
                for name in ("metrics.jsonl", "rollouts.jsonl"):
                    (run_dir / name).unlink(missing_ok=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            if ckpt is not None:
                cut = cut_to_step(run_dir, state.step)
                if any(cut):
                    console.print(f"resume: moved {cut[0]} metrics rows and {cut[1]} rollout records written after "
                                  f"step {state.step} to metrics.cut.jsonl / rollouts.cut.jsonl")
            dump_config(cfg, run_dir / "config.yaml")
            (run_dir / "command.txt").write_text(shlex.join(argv) + "\n", encoding="utf-8")
            env = {"opd": __version__, "torch": torch.__version__, "python": platform.python_version(),
                   "device": str(device), "dtype": str(dtype), "world_size": d.world,
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (run_dir / "environment.json").write_text(json.dumps(env, indent=2) + "\n", encoding="utf-8")
            metrics = MetricsLogger(run_dir, cfg.train.tensorboard, open_trackers(cfg, run_dir))
            rollouts = RolloutWriter(run_dir / "rollouts.jsonl") if write_rollouts else None
            if rollouts is not None and metrics.trackers:
                rollouts.listeners.append(metrics.sample)
        generator = torch.Generator(device=device).manual_seed(cfg.run.seed)
        if state.generator is not None:
            generator.set_state(state.generator)
    except BaseException:
        if lock is not None:
            os.close(lock)  # nothing written under the lock is left half-done; let the next run in
        raise
    return RunContext(run_dir, uuid.uuid4().hex[:12], cfg, d, eval_model, tokenizer, source, metrics,
                      rollouts, state, generator, heldout, resumed=ckpt is not None, lock=lock)



def setup_process(run: Any) -> None:
    """Seed python and torch, and set the CPU thread count, before anything else runs."""
    import random

    random.seed(run.seed)
    torch.manual_seed(run.seed)
    if run.threads > 0:
        torch.set_num_threads(run.threads)
