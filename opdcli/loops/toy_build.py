"""Rebuild the shipped toy teacher and student: `opd toy build`.

Both are tiny Qwen3-architecture models trained from scratch on gold solutions of the toy
task through the SFT path of `opd distill` (`distill.traces: gold`). The teacher trains long
enough to solve most held-out problems; the student is smaller and trained briefly, so it
starts weak and has room to learn from the teacher. Deterministic for a given seed and
thread count on CPU.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from opdcli.config import (
    DataConfig,
    DistillRunConfig,
    DistillSpec,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    ToyTaskConfig,
    TrainConfig,
)
from opdcli.errors import ModelError
from opdcli.toy.tokenizer import FORMS_EMBEDDINGS, build_forms_tokenizer, build_toy_tokenizer


@dataclass(frozen=True)
class ToyModelSpec:
    """Architecture and SFT budget of one toy model."""

    name: str
    hidden: int
    layers: int
    steps: int
    schedule_steps: int
    """Length of the learning-rate schedule; steps < schedule_steps stops mid-schedule."""
    lr: float = 3e-3
    warmup: int = 30
    init_from: str | None = None
    """Start from this toy model (a curriculum) instead of a random initialisation."""
    task: ToyTaskConfig = ToyTaskConfig()
    """The task variant the model is trained on."""
    prompts_per_step: int = 64
    max_new_tokens: int = 48
    head_dim: int | None = None
    """Attention head size (None: hidden / 4). The students use 32, a size vLLM's CPU backend runs."""

    @property
    def world(self) -> str:
        return self.task.world


TOY_SPECS = {
    "teacher": ToyModelSpec("teacher", hidden=128, layers=3, steps=1100, schedule_steps=1100),
    # a third of a 1000-step schedule: weak (under 10%) but still in the regime where it can learn
    # (head_dim 32, which vLLM's CPU backend runs; at head_dim 24 the same 7% took 500 steps)
    "student": ToyModelSpec("student", hidden=96, layers=2, steps=325, schedule_steps=1000, head_dim=32),
}
# The long-horizon variant: 8 chained additions / subtractions, answers of about 100 tokens.
LONG_TASK = ToyTaskConfig(n_ops=8, max_operand=20, ops="+-")
TOY_SPECS |= {
    "teacher-long": ToyModelSpec("teacher-long", hidden=128, layers=3, steps=1500, schedule_steps=1500,
                                 lr=2e-3, warmup=20, init_from="teacher", task=LONG_TASK,
                                 prompts_per_step=32, max_new_tokens=160),
    # step 250 of a 600-step schedule: about 16%, mid-schedule so that OPD can still move it
    "student-long": ToyModelSpec("student-long", hidden=96, layers=2, steps=250, schedule_steps=600,
                                 lr=2e-3, warmup=20, init_from="student", task=LONG_TASK,
                                 prompts_per_step=32, max_new_tokens=160, head_dim=32),
}

# Two domain experts grown from the student's own start (G-OPD's merge of domain teachers: the
# paper's math and code teachers are domain RL runs from the student's base): more SFT of the
# student on one domain each, additions / subtractions or multiplications. Same size as the
# student; a run routes each domain's prompts to its expert (model.teachers).
DOMAIN_ADD = ToyTaskConfig(ops="+-")
DOMAIN_MUL = ToyTaskConfig(ops="*")
_DOMAIN = {"lr": 2e-3, "warmup": 20, "init_from": "student", "head_dim": 32}
TOY_SPECS |= {
    "teacher-add": ToyModelSpec("teacher-add", hidden=96, layers=2, steps=300, schedule_steps=300, task=DOMAIN_ADD,
                                **_DOMAIN),
    "teacher-mul": ToyModelSpec("teacher-mul", hidden=96, layers=2, steps=300, schedule_steps=300, task=DOMAIN_MUL,
                                **_DOMAIN),
}

# The second toy world (opdcli.toy.forms): one multiplication then 16 additions / subtractions,
# each late step in one of three surface forms, answers of about 200 BPE tokens. Two teachers of
# the same size: one trained on the student's style mix (the compatible pair) and one that never
# saw the words form (the incompatible pair); a student-size teacher trained on from the
# student's own start (ExOPD's same-size reward extrapolation).
# Every model grows from an 8-operation stage (a curriculum): from scratch at 16 operations a
# teacher learned the arithmetic but not which operand of the question comes next (0% held-out
# after 1200 steps), while at 8 it takes the right operand 97% of the time.
FORMS_TASK = ToyTaskConfig(world="forms", n_ops=16, max_operand=49, style="even")
FORMS_SYMBOLIC_TASK = replace(FORMS_TASK, style="symbolic")
_FORMS = {"prompts_per_step": 32, "max_new_tokens": 320, "head_dim": 32}
_STAGE1 = {"lr": 2e-3, "warmup": 30}
_STAGE2 = {"lr": 1e-3, "warmup": 20}
TOY_SPECS |= {
    "teacher-forms-8": ToyModelSpec("teacher-forms-8", hidden=160, layers=4, steps=1200, schedule_steps=1200,
                                    task=replace(FORMS_TASK, n_ops=8), **_FORMS, **_STAGE1),
    "teacher-forms": ToyModelSpec("teacher-forms", hidden=160, layers=4, steps=700, schedule_steps=700,
                                  init_from="teacher-forms-8", task=FORMS_TASK, **_FORMS, **_STAGE2),
    # the incompatible teacher grows from the same 8-operation stage but learns the 16-operation
    # task only in the symbolic style: it unlearns the words form the student writes
    "teacher-forms-symbolic": ToyModelSpec("teacher-forms-symbolic", hidden=160, layers=4, steps=700,
                                           schedule_steps=700, init_from="teacher-forms-8",
                                           task=FORMS_SYMBOLIC_TASK, **_FORMS, **_STAGE2),
    # the student: half of an 8-operation schedule, then a short start at 16 (weak, still learning)
    "student-forms-8": ToyModelSpec("student-forms-8", hidden=128, layers=3, steps=500, schedule_steps=1000,
                                    task=replace(FORMS_TASK, n_ops=8), **_FORMS, **_STAGE1),
    "student-forms": ToyModelSpec("student-forms", hidden=128, layers=3, steps=200, schedule_steps=600,
                                  init_from="student-forms-8", task=FORMS_TASK, **_FORMS, **_STAGE2),
    "student-forms-plus": ToyModelSpec("student-forms-plus", hidden=128, layers=3, steps=600, schedule_steps=600,
                                       init_from="student-forms", task=FORMS_TASK, **_FORMS, **_STAGE2),
}


def init_model(tokenizer, hidden: int, layers: int, seed: int, head_dim: int | None = None,
               vocab_rows: int | None = None):
    """A randomly initialised Qwen3ForCausalLM sized for the toy tokenizer (4 query heads, 2 KV
    heads; `head_dim` None: hidden / 4; `vocab_rows` None: the tokenizer's length, else the
    padded embedding size)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_rows or len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim or hidden // 4,
        max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, rope_theta=10000.0,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_toy_model(spec: ToyModelSpec, out_dir: Path, *, distill: Any, seed: int = 0, steps: int | None = None,
                    eval_size: int = 256, weights_root: Path | None = None) -> dict[str, float]:
    """Initialise, SFT on gold solutions with `distill` (the CLI passes loops.distill.run_distill),
    and save to out_dir. Returns held-out metrics."""
    tok = build_forms_tokenizer() if spec.world == "forms" else build_toy_tokenizer()
    rows = FORMS_EMBEDDINGS if spec.world == "forms" else None
    with tempfile.TemporaryDirectory() as tmp:
        init_dir, run_dir = Path(tmp) / "init", Path(tmp) / "run"
        if spec.init_from is not None:
            root = weights_root if weights_root is not None else out_dir.parent
            if not (root / spec.init_from / "config.json").is_file():
                raise ModelError(f"toy model '{spec.name}' starts from '{spec.init_from}', which is not "
                                 f"built in {root}; build it first: opd toy build {spec.init_from}")
            shutil.copytree(root / spec.init_from, init_dir)
        else:
            model = init_model(tok, spec.hidden, spec.layers, seed, head_dim=spec.head_dim, vocab_rows=rows)
            model.save_pretrained(init_dir)
            tok.save_pretrained(init_dir)
        n_steps = spec.steps if steps is None else steps
        cfg = DistillRunConfig(
            run=RunConfig(out_dir=str(run_dir), seed=seed, device="cpu", dtype="float32"),
            model=ModelConfig(student=str(init_dir), teacher=str(init_dir)),
            data=DataConfig(source="toy", toy=spec.task),
            rollout=RolloutConfig(prompts_per_step=spec.prompts_per_step, max_new_tokens=spec.max_new_tokens),
            distill=DistillSpec(traces="gold", mode="sft"),
            optim=OptimConfig(lr=spec.lr, warmup_steps=min(spec.warmup, n_steps), schedule="linear",
                              min_lr_ratio=0.05, grad_clip=1.0,
                              schedule_steps=max(n_steps, spec.schedule_steps)),
            train=TrainConfig(max_steps=n_steps, keep_checkpoints=1),
            eval=EvalConfig(every=0, size=eval_size),
        )
        result = distill(cfg, explicit=set(), argv=["opd", "toy", "build", spec.name])
        final = Path(result.run_dir) / "checkpoints" / f"step_{n_steps}"
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(final, out_dir, ignore=shutil.ignore_patterns("trainer_state.pt"))
    return result.after
