"""Rollout engines side by side: our transformers sampler vs vLLM, on the same model and prompts.

    .venv-vllm/bin/python -m benchmarks.vllm_rollout --out runs/vllm-bench           # both setups
    .venv-vllm/bin/python -m benchmarks.vllm_rollout --out runs/vb --setups toy --reps 3

Setups: `toy` (the shipped toy student, 64 prompts x 48 new tokens, as configs/toy/opd.yaml
samples them) and `large` (a randomly initialised toy-shaped Qwen3 of about 25M parameters,
hidden 512, 8 layers, head size 64, 16 prompts x 512 new tokens; its EOS embedding row is zeroed,
which makes EOS rare but not impossible, so rows differ in length between engines and tokens/s is
the figure to compare). Per setup it times the engine start, then alternates hf and vllm
sampling `--reps` times after one warm-up each, and the weight push into vLLM. Prints medians
and writes results.csv. Run it alone on quiet cores (the figures are wall times); it needs vLLM
(make test-vllm builds .venv-vllm). Set VLLM_ENABLE_V1_MULTIPROCESSING=0, VLLM_CPU_KVCACHE_SPACE
and, on CPU, LD_PRELOAD=<venv>/lib/libiomp5.so as `make test-vllm` does.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path


def _setup(name: str, tmp: Path):
    """(model folder, prompt texts, SamplingParams, whether EOS is suppressed)."""
    from opdcli.config import DataConfig
    from opdcli.data import PromptSource, render
    from opdcli.engines.types import SamplingParams
    from opdcli.models import resolve_model_path
    from opdcli.toy.tokenizer import build_toy_tokenizer

    tok = build_toy_tokenizer()
    if name == "toy":
        prompts = [render(tok, p) for p in PromptSource(DataConfig(source="toy"), 0).next_batch(64)]
        return resolve_model_path("toy:student"), prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=48)
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # EOS rare: rows decode most of the budget
        model.lm_head.weight[tok.eos_token_id].zero_()
        model.model.embed_tokens.weight[tok.eos_token_id].zero_()
    folder = tmp / "large"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    prompts = [render(tok, p) for p in PromptSource(DataConfig(source="toy"), 0).next_batch(16)]
    return str(folder), prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=512, batch_size=16)


def bench(name: str, reps: int, tmp: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from opdcli.config import VLLMConfig
    from opdcli.engines.hf_sampler import HFSampler
    from opdcli.engines.vllm_engine import VLLMSampler
    from opdcli.toy.tokenizer import build_toy_tokenizer

    path, prompts, params = _setup(name, tmp)
    tok = build_toy_tokenizer()
    module = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n_params = sum(p.numel() for p in module.parameters())
    hf = HFSampler(module, tok, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    vl = VLLMSampler(path, tok, VLLMConfig(), module=module, dtype="float32", seed=0,
                     max_model_len=params.max_new_tokens + 256)
    init_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {"hf": [], "vllm": []}
    tokens: dict[str, list[int]] = {"hf": [], "vllm": []}
    for engine in (hf, vl):  # warm-up
        engine.sample(prompts, params)
    for _ in range(reps):
        for label, engine in (("hf", hf), ("vllm", vl)):
            t0 = time.perf_counter()
            batch = engine.sample(prompts, params)
            times[label].append(time.perf_counter() - t0)
            tokens[label].append(int(batch.response_mask_B_T.sum()))
    pushes = []
    for _ in range(reps):
        t0 = time.perf_counter()
        vl.sync_weights(None, 1)
        pushes.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"setup": name, "params_M": round(n_params / 1e6, 2), "rows": len(prompts) * params.n,
           "max_new_tokens": params.max_new_tokens, "engine_init_s": round(init_s, 1),
           "hf_sample_s": round(med["hf"], 3), "vllm_sample_s": round(med["vllm"], 3),
           "hf_tokens_per_s": round(statistics.median(tokens["hf"]) / med["hf"]),
           "vllm_tokens_per_s": round(statistics.median(tokens["vllm"]) / med["vllm"]),
           "speedup": round(med["hf"] / med["vllm"], 2), "weight_push_s": round(statistics.median(pushes), 3),
           "reps": reps}
    del vl
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--setups", nargs="+", default=["toy", "large"], choices=["toy", "large"])
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.setups:
            rows.append(bench(name, a.reps, Path(tmp)))
            print(rows[-1], flush=True)
    with (a.out / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
