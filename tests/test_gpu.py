"""The 1-rank CUDA path in bf16 (skipped without CUDA; run with `pytest -m gpu` on a GPU box):
the toy pair, and a tiny random Qwen3-shaped pair with an untied head and head_dim 64."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _qwen3(path, tokenizer, hidden: int, layers: int, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=1,
                      head_dim=64, max_position_embeddings=512, tie_word_embeddings=False,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = Qwen3ForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("pair", ["toy", "qwen3-shaped"])
def test_cuda_bf16_training_moves_the_student(tmp_path, toy_tokenizer, pair):
    from opdcli.config import TrainRunConfig, load_config
    from opdcli.loops.train import run_train

    models = ["model.student=toy:student", "model.teacher=toy:teacher"]
    if pair != "toy":
        models = [f"model.student={_qwen3(tmp_path / 's', toy_tokenizer, 128, 2, 1)}",
                  f"model.teacher={_qwen3(tmp_path / 't', toy_tokenizer, 256, 2, 2)}"]
    cfg, explicit = load_config(TrainRunConfig, None, [
        *models, "run.device=cuda", "run.dtype=bfloat16", "train.max_steps=3", "eval.size=16",
        "optim.lr=1e-3", "rollout.max_new_tokens=24", "loss.objective=rkl", f"run.out_dir={tmp_path / 'run'}"])
    result = run_train(cfg, explicit, argv=["test"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/total"] for r in rows if "loss/total" in r]
    assert len(losses) == 3 and all(x == x and x > 0 for x in losses)
    assert json.loads((tmp_path / "run" / "environment.json").read_text())["device"].startswith("cuda")
    assert result.steps == 3
    from safetensors.torch import load_file

    from opdcli.models import resolve_model_path

    start = load_file(Path(resolve_model_path(models[0].split("=", 1)[1])) / "model.safetensors")
    end = load_file(tmp_path / "run" / "checkpoints" / "step_3" / "model.safetensors")
    assert max(float((start[k].float() - end[k].float()).abs().max()) for k in start) > 0
