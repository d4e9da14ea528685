"""End to end on the shipped toy models: OPD and distillation change and improve the student.

Small budgets (tens of steps on CPU); the assertions are about direction, with margins the
runs clear by far: the teacher-student divergence on the student's own samples falls under
OPD, and the SFT loss on teacher traces falls under distillation.
"""

from __future__ import annotations

import pytest

from opdcli import config as C
from opdcli.tracking import read_metrics

pytestmark = pytest.mark.slow


def _mean(rows, key, sl):
    values = [r[key] for r in rows if key in r][sl]
    return sum(values) / len(values)


def test_opd_lowers_teacher_kl_and_resume_continues(tmp_path):
    from opdcli.train import run_train

    overrides = [f"run.out_dir={tmp_path / 'run'}", "train.max_steps=30", "rollout.prompts_per_step=8",
                 "eval.every=0", "eval.size=64", "train.save_every=15", "train.rollouts_every=5"]
    cfg, explicit = C.load_config(C.TrainRunConfig, "configs/toy/opd.yaml", overrides)
    result = run_train(cfg, explicit, argv=["test"])
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first, last = _mean(rows, "signal/teacher_kl", slice(0, 6)), _mean(rows, "signal/teacher_kl", slice(-6, None))
    assert last < 0.8 * first, (first, last)
    assert result.steps == 30
    # resume from the step-15 checkpoint: continues at step 16 and ends at 30
    resumed = [f"run.out_dir={tmp_path / 'resumed'}", f"run.resume={tmp_path / 'run' / 'checkpoints' / 'step_15'}"]
    cfg2, explicit2 = C.load_config(C.TrainRunConfig, "configs/toy/opd.yaml", overrides + resumed)
    run_train(cfg2, explicit2, argv=["test"])
    steps = [r["progress/step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "loss/total" in r]
    assert steps == list(range(16, 31))


def test_distill_sft_on_teacher_traces_lowers_its_loss(tmp_path):
    from opdcli.distill import run_distill

    overrides = [f"run.out_dir={tmp_path / 'run'}", "train.max_steps=25", "rollout.prompts_per_step=8",
                 "eval.every=0", "eval.size=64"]
    cfg, explicit = C.load_config(C.DistillRunConfig, "configs/toy/distill.yaml", overrides)
    result = run_distill(cfg, explicit, argv=["test"])
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert _mean(rows, "loss/sft", slice(-5, None)) < 0.8 * _mean(rows, "loss/sft", slice(0, 5))
    assert (tmp_path / "run" / "checkpoints" / "step_25" / "model.safetensors").is_file()
    assert result.after["eval/heldout/accuracy"] >= result.before["eval/heldout/accuracy"]
