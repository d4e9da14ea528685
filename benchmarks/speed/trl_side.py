"""TRL's DistillationTrainer on the same work as `opd train` (`--vs-trl`; `pip install trl`).

Settings that make the comparison fair (TRL 1.16's defaults differ): the same student and
teacher objects' folders loaded in fp32, with `bf16` on exactly when the run's dtype is
bfloat16 (TRL defaults to it; TRL's bf16 is autocast over fp32 weights, as opd's mixed precision
is for the student, while opd's teacher holds bf16 weights), no gradient
checkpointing (TRL defaults to it), the run's learning rate and gradient clip (TRL defaults to
lr 1e-6; no warm-up, as each block of steps is a fresh trainer on the same models), `beta=1.0` (TRL's generalised JSD at beta 1 is the full-vocabulary reverse
KL(student || teacher), our loss.objective=rkl), temperature 1, top-k 0, top-p 1, the same
rendered prompt texts (plain strings, so that both tokenise the same ids), one completion per
prompt, the whole batch in one micro-batch, `max_completion_length` = rollout.max_new_tokens,
dropout off. TRL always samples on-policy with `generate` once per optimizer step and computes
its loss in chunks; a step is timed from `on_step_begin` to `on_step_end` (generation, both
forwards, backward and the optimizer).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any


class TRLSide:
    """A DistillationTrainer kept between blocks of steps, so that the runs can alternate."""

    def __init__(self, student: str, teacher: str, texts: list[str], cfg: Any) -> None:
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from opdcli.models import resolve_dtype, resolve_model_path

        self.tok = AutoTokenizer.from_pretrained(resolve_model_path(student))
        self.tok.padding_side = "left"
        self.student = AutoModelForCausalLM.from_pretrained(resolve_model_path(student), dtype=torch.float32)
        self.teacher = AutoModelForCausalLM.from_pretrained(resolve_model_path(teacher), dtype=torch.float32)
        self.data = Dataset.from_dict({"prompt": list(texts)})
        self.cfg, self.batch = cfg, len(texts)
        self.bf16 = resolve_dtype(cfg.run.dtype, self.student.device) == torch.bfloat16
        self.times: list[float] = []
        self.out = tempfile.mkdtemp(prefix="opd-trl-")

    def run(self, steps: int, keep: bool) -> None:
        """`steps` optimizer steps (a fresh trainer on the same models; optimizer state restarts,
        which costs nothing per step); their wall times are kept when `keep`."""
        from transformers import TrainerCallback
        from transformers.trainer_callback import PrinterCallback
        from trl import DistillationConfig, DistillationTrainer

        times = self.times

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if keep:
                    times.append(time.perf_counter() - self.t)

        o, r = self.cfg.optim, self.cfg.rollout
        args = DistillationConfig(
            output_dir=self.out, max_steps=steps, per_device_train_batch_size=self.batch,
            gradient_accumulation_steps=1, learning_rate=o.lr, lr_scheduler_type="constant", max_grad_norm=o.grad_clip, weight_decay=o.weight_decay,
            beta=1.0, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_completion_length=r.max_new_tokens,
            bf16=self.bf16, fp16=False, use_cpu=not _cuda(), gradient_checkpointing=False, use_vllm=False,
            logging_steps=10**6, report_to="none", save_strategy="no", dataloader_num_workers=0,
            dataloader_pin_memory=False, disable_dropout=True, seed=self.cfg.run.seed, disable_tqdm=True)
        trainer = DistillationTrainer(model=self.student, teacher_model=self.teacher, args=args,
                                      train_dataset=self.data, processing_class=self.tok, callbacks=[Timer()])
        trainer.remove_callback(PrinterCallback)
        trainer.train()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
