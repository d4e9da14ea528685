"""Checkpoints pad their output head past the tokenizer (151,936 or 152,064 rows around a
151,669-token Qwen tokenizer). Identical tokenizers with different head widths are one
vocabulary: every model is scored and sampled over the tokenizer's ids only, so a padded pair
gives exactly the unpadded pair's samples, scores and training step, whatever the padded rows
hold. A head narrower than its tokenizer, or another vocabulary, is still refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opdcli import config as C
from opdcli.engines.hf_sampler import HFSampler
from opdcli.engines.hf_scorer import HFScorer
from opdcli.engines.types import SamplingParams
from opdcli.errors import ModelError
from opdcli.lm import vocab_size
from opdcli.models import load_pair, load_tokenizer, resolve_model_path
from opdcli.run.tracking import read_metrics


def _padded(src: str, dst: Path, rows: int) -> Path:
    """`src` with its head (and tied embeddings) padded to `rows`, the padded rows made loud:
    unless they are cut off they dominate every softmax."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(src))
    n = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        head = model.get_output_embeddings().weight
        head[n:] = 50.0 * torch.randn(rows - n, head.shape[1], generator=gen)
    model.save_pretrained(dst)
    load_tokenizer(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def padded(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("padded")
    return {"student": str(_padded("toy:student", root / "student", 112)),
            "teacher": str(_padded("toy:teacher", root / "teacher", 128))}


def test_a_padded_pair_loads_and_is_cut_to_the_tokenizer(padded):
    pair = load_pair(padded["student"], padded["teacher"], "cpu", "float32")
    assert pair.student.get_output_embeddings().weight.shape[0] == 112
    assert pair.teacher.get_output_embeddings().weight.shape[0] == 128
    assert vocab_size(pair.student) == vocab_size(pair.teacher) == len(pair.tokenizer) == 100


def test_padded_models_sample_and_score_exactly_as_unpadded(padded):
    plain = load_pair("toy:student", "toy:teacher", "cpu", "float32")
    pad = load_pair(padded["student"], padded["teacher"], "cpu", "float32")
    texts = ["<|im_start|>user\nCompute 12+7.<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nCompute 3*4.<|im_end|>\n<|im_start|>assistant\n"]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=30)

    def run(p):
        rollout = HFSampler(p.student, p.tokenizer, generator=torch.Generator().manual_seed(5)).sample(texts, params)
        scored = HFScorer(p.student, p.teacher, k=8, chunk_tokens=16, batch_size=4).score(rollout)
        return rollout, scored

    (r0, s0), (r1, s1) = run(plain), run(pad)
    assert torch.equal(r0.response_ids_B_T, r1.response_ids_B_T)
    assert int(r1.response_ids_B_T.max()) < 100
    assert torch.allclose(r0.behavior_lp_B_T, r1.behavior_lp_B_T, atol=1e-5)
    for name in ("student_lp_B_T", "teacher_lp_B_T", "student_topk_lp_B_T_K", "teacher_topk_lp_B_T_K",
                 "teacher_lp_on_student_topk_B_T_K"):
        assert torch.allclose(getattr(s0, name), getattr(s1, name), atol=1e-5), name
    assert torch.equal(s0.teacher_topk_ids_B_T_K, s1.teacher_topk_ids_B_T_K)


def _train(tmp_path: Path, name: str, student: str, teacher: str, objective: str):
    from opdcli.loops.train import run_train

    out = tmp_path / name
    cfg, explicit = C.load_config(C.TrainRunConfig, None, [
        f"run.out_dir={out}", f"model.student={student}", f"model.teacher={teacher}", "train.max_steps=3",
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "eval.enabled=false", "train.save_every=0",
        "rollout.max_new_tokens=24", f"loss.objective={objective}"])
    run_train(cfg, explicit, argv=["test"])
    weights = load_file(str(next((out / "checkpoints").glob("step_*")) / "model.safetensors"))
    return weights, [r for r in read_metrics(out / "metrics.jsonl") if "loss/total" in r]


@pytest.mark.parametrize("objective", ["rkl", "sampled"])
def test_training_a_padded_pair_is_training_the_unpadded_pair(tmp_path, padded, objective):
    w0, m0 = _train(tmp_path, "plain", "toy:student", "toy:teacher", objective)
    w1, m1 = _train(tmp_path, "padded", padded["student"], padded["teacher"], objective)
    assert len(m0) == len(m1) == 3
    for a, b in zip(m0, m1, strict=True):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-4, abs=1e-6)
    head = "lm_head.weight" if "lm_head.weight" in w1 else "model.embed_tokens.weight"
    assert w1[head].shape[0] == 112, "the saved student keeps its padded head"
    assert torch.allclose(w1[head][:100], w0[head], atol=1e-5)
    for name in w0:
        if name != head:
            assert torch.allclose(w0[name], w1[name], atol=1e-5), name


def test_a_head_narrower_than_its_tokenizer_is_refused(tmp_path):
    tok = load_tokenizer("toy:student")
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy:student"))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelError, match="has 100 output logits but its tokenizer has 102 tokens"):
        load_pair(str(tmp_path / "m"), str(tmp_path / "m"), "cpu", "float32")


def test_gradient_checkpointing_trains_the_same_student(tmp_path):
    """model.gradient_checkpointing recomputes activations in backward: same losses and weights."""
    from opdcli.loops.train import run_train

    def train(name: str, extra: list[str]):
        out = tmp_path / name
        cfg, explicit = C.load_config(C.TrainRunConfig, None, [
            f"run.out_dir={out}", "train.max_steps=2", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
            "eval.enabled=false", "train.save_every=0", "rollout.max_new_tokens=24", *extra])
        run_train(cfg, explicit, argv=["test"])
        weights = load_file(str(next((out / "checkpoints").glob("step_*")) / "model.safetensors"))
        return weights, [r["loss/total"] for r in read_metrics(out / "metrics.jsonl") if "loss/total" in r]

    (w0, l0), (w1, l1) = train("plain", []), train("ckpt", ["model.gradient_checkpointing=true"])
    assert l0 == pytest.approx(l1, rel=1e-5)
    for name in w0:
        assert torch.allclose(w0[name], w1[name], atol=1e-6), name


def test_gradient_checkpointing_keeps_far_fewer_activations():
    """With model.gradient_checkpointing the forward saves only each layer's input for backward."""
    from opdcli.config import ModelConfig
    from opdcli.models import load_configured_pair

    def saved(on: bool) -> int:
        model = load_configured_pair(ModelConfig(gradient_checkpointing=on), "cpu", "float32").student
        count = [0]

        def pack(t):
            count[0] += t.numel()
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=torch.randint(4, 100, (2, 64))).logits.sum()
        loss.backward()
        return count[0]

    plain, ckpt = saved(False), saved(True)
    assert ckpt < plain / 4, (plain, ckpt)
