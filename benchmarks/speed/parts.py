"""The step and its parts, timed in one process on one batch and one set of models.

Parts, each alone: `sample` (the student's rollout), `score` (student + teacher no-grad
scoring), `method` (weights and advantages), `train` (forward + backward + optimizer step +
weight sync). The full step is `opdcli.loops.train.step`, the function `opd train` runs, on the
same fixed prompts. Repetitions alternate step and parts after warm-up; medians are reported.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.speed.memory import peak

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("sample", "score", "method", "train")


@dataclass(frozen=True)
class Setup:
    """A pair of models and a batch."""

    name: str
    student: str
    teacher: str
    prompts: int
    max_new_tokens: int
    sets: tuple[str, ...] = ()


def toy_setup() -> Setup:
    """The shipped toy pair, 64 sequences x up to 40 new tokens, full-vocabulary reverse KL."""
    return Setup("toy", "toy:student", "toy:teacher", 64, 40)


def large_setup(tmp: Path) -> Setup:
    """Random toy-shaped Qwen3 pair (student about 6M, teacher about 19M parameters), 16
    sequences x 256 new tokens; EOS suppressed so that rows decode the whole budget."""
    return Setup("large", str(_random_model(tmp / "student", 256, 6, 1)),
                 str(_random_model(tmp / "teacher", 384, 8, 2)), 16, 256)


def _random_model(folder: Path, hidden: int, layers: int, seed: int) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opdcli.toy.tokenizer import build_toy_tokenizer

    tok = build_toy_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64, head_dim=32,
                      max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id].zero_()
        model.lm_head.weight[tok.eos_token_id, 0] = -50.0  # EOS never wins
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class FixedPrompts:
    """A prompt source that hands out the same prompts every step (one batch for all timings)."""

    def __init__(self, prompts: list[Any]) -> None:
        self.prompts = prompts

    def next_batch(self, n: int) -> list[Any]:
        return self.prompts[:n]


@dataclass
class Bench:
    setup: Setup
    times: dict[str, list[float]] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    tokens: list[float] = field(default_factory=list)
    params: dict[str, int] = field(default_factory=dict)

    def median(self, key: str) -> float:
        return statistics.median(self.times[key])

    def summary(self) -> dict[str, float]:
        parts = sum(self.median(p) for p in PARTS)
        step = self.median("step")
        out = {f"{k}_s": self.median(k) for k in ("step", *PARTS)}
        out |= {"sum_parts_s": parts, "step_over_parts": step / parts,
                "tokens_per_step": statistics.median(self.tokens),
                "tokens_per_s": statistics.median(self.tokens) / step}
        if "trl_step" in self.times:
            out |= {"trl_step_s": self.median("trl_step"), "trl_over_opd": self.median("trl_step") / step}
        return out | {f"mem_{k}_mb": v / 2**20 for k, v in self.memory.items()}


def config(setup: Setup, out_dir: Path, extra: list[str]):
    from opdcli.config import TrainRunConfig, load_config

    sets = [f"model.student={setup.student}", f"model.teacher={setup.teacher}", f"run.out_dir={out_dir}",
            "run.overwrite=true", f"rollout.prompts_per_step={setup.prompts}", "rollout.samples_per_prompt=1",
            f"rollout.max_new_tokens={setup.max_new_tokens}", "loss.objective=rkl", "eval.enabled=false",
            "train.rollouts_every=0", "train.max_steps=1000", *setup.sets, *extra]
    return load_config(TrainRunConfig, ROOT / "configs/toy/opd.yaml", sets)[0]


def run(setup: Setup, out_dir: Path, reps: int, warmup: int, extra: list[str], vs_trl: bool = False) -> Bench:
    """Time the step and each part `reps` times (alternating) after `warmup` rounds; with
    `vs_trl`, one TRL DistillationTrainer step on the same work after each of ours."""
    from opdcli import stages
    from opdcli.assembly import sampler_class
    from opdcli.data import render
    from opdcli.dist import ALONE
    from opdcli.loops.train import step
    from opdcli.run.setup import prepare_training

    cfg = config(setup, out_dir, extra)
    run_ = prepare_training(cfg, ["benchmarks.speed"], ALONE, sampler_class(cfg),  # rollout.engine
                            wrap_source=lambda s: FixedPrompts(s.next_batch(setup.prompts)))
    method, source, parts, tok = run_.method, run_.source, run_.parts, run_.pair.tokenizer
    device = run_.pair.device
    texts = [render(tok, p) for p in source.prompts]
    params = stages.sampling_params(cfg.rollout)
    bench = Bench(setup, params={"student": sum(p.numel() for p in run_.pair.student.parameters())})
    trl = None
    if vs_trl:
        from benchmarks.speed.trl_side import TRLSide

        trl = TRLSide(setup.student, setup.teacher, texts, cfg)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(key: str, keep: bool, fn, *args):
        sync()
        t0 = time.perf_counter()
        result = fn(*args)
        sync()
        if keep:
            bench.times.setdefault(key, []).append(time.perf_counter() - t0)
        return result

    # the parts do what the step does: with the student's scores from the training forward
    # (scoring.student_scores), scoring runs the teacher only and training collects them
    fused = stages.student_from_train(cfg, method)
    bench.params["student_from_train"] = int(fused)

    def weigh(rollout, scored, i: int):
        rows, whole = stages.gather(rollout, scored, ALONE)
        return stages.weigh(method, whole, rows, cfg.loss, i, fused)

    def train(rollout, scored, out, i: int):
        stages.learn(parts.learner, parts.scorer, rollout, scored, out, cfg, i, ALONE, [] if fused else None)
        parts.sampler.sync_weights(parts.learner.full_weights(), i + 1)

    def full_step(i: int):
        return step(cfg=cfg, parts=parts, method=method, source=source, tokenizer=tok, step_idx=i, d=ALONE)

    for i in range(warmup + reps):
        keep = i >= warmup
        metrics, _ = timed("step", keep, full_step, i)
        if keep:
            bench.tokens.append(float(metrics.get("train/tokens_trained", 0.0)))
        control = method.generation_control(cfg.rollout.max_new_tokens, i)
        rollout = timed("sample", keep, stages.sample, parts.sampler, texts, params, ALONE, control)
        scored = timed("score", keep, stages.score, parts.scorer, rollout, cfg.loss.objective, fused)
        out = timed("method", keep, weigh, rollout, scored, i)
        timed("train", keep, train, rollout, scored, out, i)
        if trl is not None:
            trl.run(1, keep)
    if trl is not None:
        bench.times["trl_step"] = trl.times
    _memory(bench, parts, rollout, cfg, device, fused)
    return bench


def _memory(bench: Bench, parts, rollout, cfg, device, fused: bool) -> None:
    """Peak memory of scoring vs the bare forwards it needs (both models' transformer bodies and
    the logits of one chunk), and of the training forward + backward."""
    from opdcli import stages
    from opdcli.lm import unwrap

    ids, am = rollout.input_ids_B_L, rollout.attention_mask_B_L
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    student = parts.scorer.student
    teacher = parts.scorer.teacher
    with torch.no_grad(), peak(device, bench.memory, "bare_forwards"):
        for m in ((teacher,) if fused else (student, teacher)):
            body = unwrap(m).model
            body(input_ids=ids, attention_mask=am, position_ids=pos)
    with peak(device, bench.memory, "score"):
        stages.score(parts.scorer, rollout, cfg.loss.objective, fused)
