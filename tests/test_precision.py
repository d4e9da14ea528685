"""Mixed precision for the trained student (run.dtype bfloat16, run.master_weights): float32
weights, gradients, optimizer state and checkpoints; forwards under autocast; the teacher in
bfloat16. Pure bfloat16 training loses small AdamW updates, which is why this is the default."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdcli.config import ModelConfig
from opdcli.engines.hf_sampler import sample
from opdcli.engines.types import SamplingParams
from opdcli.lm import ResponseLM, output_head
from opdcli.models import load_configured_pair, resolve_model_path
from opdcli.precision import compute_dtype, sampling_replica

ROOT = Path(__file__).resolve().parents[1]
TOY = ModelConfig(student="toy:student", teacher="toy:teacher")
PROMPT = "<|im_start|>user\nCompute 3+4.<|im_end|>\n<|im_start|>assistant\n"


def _adamw_changed_share(model: torch.nn.Module, lr: float) -> float:
    """Share of the weights one AdamW step at `lr` moves (the same loss and batch every time)."""
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    ids = torch.randint(5, 90, (8, 24), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = sum(int((p.detach().float() != before[n]).sum()) for n, p in model.named_parameters())
    return changed / sum(p.numel() for p in model.parameters())


def test_a_bf16_run_keeps_float32_student_weights_and_a_bf16_teacher():
    pair = load_configured_pair(TOY, "cpu", "bfloat16", master_weights=True)
    assert {p.dtype for p in pair.student.parameters()} == {torch.float32}
    assert {p.dtype for p in pair.teacher.parameters()} == {torch.bfloat16}
    assert compute_dtype(pair.student) == torch.bfloat16 and compute_dtype(pair.teacher) is None
    pure = load_configured_pair(TOY, "cpu", "bfloat16", master_weights=False)
    assert {p.dtype for p in pure.student.parameters()} == {torch.bfloat16}
    fp32 = load_configured_pair(TOY, "cpu", "float32", master_weights=True)  # nothing to do in float32
    assert compute_dtype(fp32.student) is None


def test_small_adamw_updates_survive_only_with_master_weights():
    mixed = load_configured_pair(TOY, "cpu", "bfloat16", master_weights=True).student
    pure = load_configured_pair(TOY, "cpu", "bfloat16", master_weights=False).student
    assert _adamw_changed_share(mixed, 1e-6) > 0.99
    assert _adamw_changed_share(pure, 1e-6) < 0.05  # the loss this mode exists to prevent


def test_every_student_forward_runs_in_the_compute_dtype_and_the_region_closes():
    student = load_configured_pair(TOY, "cpu", "bfloat16", master_weights=True).student
    ids = torch.tensor([[5, 6, 7, 8]])
    assert student(input_ids=ids).logits.dtype == torch.bfloat16  # the whole model
    hidden = student.base_model(input_ids=ids).last_hidden_state  # body then head, as the scorer does
    assert output_head(student)(hidden).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(IndexError):  # a forward that fails leaves no region open
        student(input_ids=torch.tensor([[10**6]]))
    assert not torch.is_autocast_enabled("cpu")


def test_mixed_forwards_match_float32_within_bf16_rounding_and_grads_are_float32():
    mixed = load_configured_pair(TOY, "cpu", "bfloat16", master_weights=True).student
    fp32 = load_configured_pair(TOY, "cpu", "float32").student
    ids = torch.randint(5, 90, (4, 20), generator=torch.Generator().manual_seed(1))
    lp_mixed = mixed(input_ids=ids).logits.float().log_softmax(-1)
    lp_fp32 = fp32(input_ids=ids).logits.log_softmax(-1)
    kl = (lp_fp32.exp() * (lp_fp32 - lp_mixed)).sum(-1)
    assert kl.mean() < 1e-3 and kl.max() < 1e-2  # the same distributions up to bf16 rounding
    assert (lp_mixed - lp_fp32).abs().max() > 0  # and the compute really was bf16
    mixed(input_ids=ids, labels=ids).loss.backward()
    assert {p.grad.dtype for p in mixed.parameters() if p.grad is not None} == {torch.float32}


def test_the_sampler_decodes_a_mixed_student_in_one_region_and_replicas_are_bf16_copies():
    pair = load_configured_pair(TOY, "cpu", "bfloat16", master_weights=True)
    params = SamplingParams(n=3, max_new_tokens=12, temperature=1.0)
    batch = sample(pair.student, pair.tokenizer, [PROMPT], params, generator=torch.Generator().manual_seed(0))
    assert batch.response_mask_B_T.sum() > 0 and not torch.is_autocast_enabled("cpu")
    replica = sampling_replica(pair.student)
    assert {p.dtype for p in replica.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in replica.parameters())
    with torch.no_grad():
        next(pair.student.parameters()).add_(1.0)  # the replica is a copy, not a view
    assert not torch.equal(next(replica.parameters()).float(), next(pair.student.parameters()))
    again = sample(replica, pair.tokenizer, [PROMPT], params, generator=torch.Generator().manual_seed(0))
    assert again.response_ids_B_T.shape[0] == 3
    twin = copy.deepcopy(pair.student)  # a deep copy runs its own autocast hooks, on its own weights
    assert twin(input_ids=torch.tensor([[5, 6, 7]])).logits.dtype == torch.bfloat16
    assert {p.dtype for p in twin.parameters()} == {torch.float32} and not torch.is_autocast_enabled("cpu")


def test_a_wrapped_mixed_student_scores_in_the_compute_dtype():
    student = load_configured_pair(TOY, "cpu", "bfloat16", master_weights=True).student
    wrapped = ResponseLM(student)
    assert compute_dtype(wrapped) == torch.bfloat16
    hidden = torch.randn(2, 3, student.config.hidden_size)
    assert wrapped(hidden_B_T_H=hidden, compute=lambda h, head: head(h)).dtype == torch.bfloat16


@pytest.mark.slow
def test_opd_train_in_bf16_moves_every_weight_at_a_small_lr_and_checkpoints_float32(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "opdcli.cli", "train", "--config", str(ROOT / "configs/toy/opd.yaml")]
    for s in ("run.dtype=bfloat16", "train.max_steps=3", "eval.size=8", "optim.lr=1e-6", "optim.warmup_steps=0",
              "rollout.prompts_per_step=8", f"run.out_dir={run}"):
        args += ["--set", s]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    start = load_file(str(Path(resolve_model_path("toy:student")) / "model.safetensors"))
    end = load_file(str(run / "checkpoints" / "step_3" / "model.safetensors"))
    assert {v.dtype for v in end.values()} == {torch.float32}
    moved = sum(int((start[k] != end[k]).sum()) for k in start) / sum(v.numel() for v in start.values())
    assert moved > 0.99


def test_a_padded_head_cut_to_the_tokenizer_also_runs_in_the_compute_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    from opdcli.models import load_tokenizer

    src = resolve_model_path("toy:student")
    model = AutoModelForCausalLM.from_pretrained(src)
    model.resize_token_embeddings(112, mean_resizing=False)  # a head wider than the tokenizer
    model.save_pretrained(tmp_path / "padded")
    load_tokenizer(src).save_pretrained(tmp_path / "padded")
    m = ModelConfig(student=str(tmp_path / "padded"), teacher="toy:teacher")
    student = load_configured_pair(m, "cpu", "bfloat16", master_weights=True).student
    head = output_head(student)
    assert type(head).__name__ == "_SlicedHead"  # the rows past the tokenizer are cut off
    logits = head(torch.randn(2, 3, student.config.hidden_size))
    assert logits.dtype == torch.bfloat16 and logits.shape[-1] == 100


def test_master_weights_with_a_float32_run_is_refused():
    from opdcli.config import TrainRunConfig, load_config
    from opdcli.errors import ConfigError
    from opdcli.validate import validate_common

    cfg, explicit = load_config(TrainRunConfig, str(ROOT / "configs/toy/opd.yaml"),
                                ["run.dtype=float32", "run.master_weights=false"])
    with pytest.raises(ConfigError, match="run.master_weights cannot take effect.*run.dtype=bfloat16"):
        validate_common(cfg, explicit)
    cfg, explicit = load_config(TrainRunConfig, str(ROOT / "configs/toy/opd.yaml"),
                                ["run.dtype=bfloat16", "run.master_weights=false"])
    validate_common(cfg, explicit)  # pure bf16 training is a choice, not an error


def test_replicas_and_engines_receive_the_compute_dtype_with_the_same_rounding():
    from opdcli.precision import replica_weights

    pair = load_configured_pair(TOY, "cpu", "bfloat16", master_weights=True)
    state = pair.student.state_dict()
    sent = replica_weights(pair.student, state)
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert {v.dtype for v in sent.values()} == {torch.bfloat16} and sent.keys() == state.keys()
    cast_there, cast_here = sampling_replica(pair.student), sampling_replica(pair.student)
    with torch.no_grad():
        next(pair.student.parameters()).add_(1e-3)  # weights the replicas do not hold yet
    cast_there.load_state_dict(pair.student.state_dict())  # float32 sent, the replica casts
    cast_here.load_state_dict(replica_weights(pair.student, pair.student.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(cast_there.state_dict().values(), cast_here.state_dict().values(),
                                                 strict=True))
    plain = load_configured_pair(TOY, "cpu", "float32", load_teacher=False).student
    plain_state = plain.state_dict()
    assert replica_weights(plain, plain_state) is plain_state  # nothing to cast in a float32 run
