"""`opd distill`: the off-policy baseline the OPD papers compare against.

    opd distill --config configs/toy/distill.yaml

Traces come from the teacher (sampled with rollout.*) or from gold solutions in the data
(`distill.traces: gold`, the path `opd toy build` trains the toy models with). The student
learns from them by cross-entropy (sft) or by token-level forward KL to the teacher's full
distribution on the trace (fkl).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch

from opdcli import losses
from opdcli.config import DistillRunConfig
from opdcli.data import Prompt, PromptSource, heldout_prompts, render
from opdcli.errors import ConfigError, DataError
from opdcli.models import (
    LoadedPair,
    load_model,
    load_pair,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from opdcli.optim import build_optimizer, optimizer_step
from opdcli.rollout.batch import RolloutBatch
from opdcli.rollout.hf import SamplingParams, sample
from opdcli.run_dir import open_run, progress_bar, setup_process, validate_common
from opdcli.scoring import chunked_logit_loss, response_hidden, token_stats
from opdcli.tracking import timed


@dataclass
class DistillResult:
    run_dir: str
    before: dict[str, float]
    after: dict[str, float]
    steps: int


def gold_batch(tokenizer, prompts: list[Prompt], device: torch.device) -> RolloutBatch:
    """Pack (prompt, gold solution + EOS) pairs into the rollout layout."""
    missing = [p.prompt_id for p in prompts if p.solution is None]
    if missing:
        raise DataError(f"prompt '{missing[0]}' has no solution; distill.traces=gold needs a "
                        "solution field (data.solution_field)")
    texts = [render(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
    resp = [tokenizer(p.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for p in prompts]
    T = max(len(r) for r in resp)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in resp])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in resp])
    B = len(prompts)
    return RolloutBatch(
        input_ids_B_L=torch.cat([enc["input_ids"], ids], 1).to(device),
        attention_mask_B_L=torch.cat([enc["attention_mask"], mask], 1).to(device),
        prompt_len=enc["input_ids"].shape[1], response_ids_B_T=ids.to(device),
        response_mask_B_T=mask.to(device), behavior_lp_B_T=torch.zeros(B, T, device=device),
        finished_B=torch.ones(B, dtype=torch.bool, device=device), prompt_index_B=tuple(range(B)),
        prompt_texts_P=tuple(texts))


def distill_loss(student, teacher, batch: RolloutBatch, mode: str, normalizer: float,
                 chunk_tokens: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy (sft) or forward KL to the teacher (fkl) on the trace tokens."""
    hidden = response_hidden(student, batch)
    mask = batch.response_mask_B_T.float()
    if mode == "sft":
        st = token_stats(hidden, student.get_output_embeddings(), batch.response_ids_B_T, 1, chunk_tokens)
        nll = -st.lp_B_T
        loss, _ = losses.token_mean(nll, mask, None, normalizer), None
        return loss, {"loss/sft_nll": float(loss.detach())}
    with torch.no_grad():
        t_hidden = response_hidden(teacher, batch)
    loss, _ = chunked_logit_loss(hidden, student.get_output_embeddings(), t_hidden,
                                 teacher.get_output_embeddings(), losses.forward_kl_loss, mask, None,
                                 normalizer, chunk_tokens, support="full")
    return loss, {"loss/fkl": float(loss.detach())}


def traces(cfg: DistillRunConfig, pair: LoadedPair, prompts: list[Prompt], generator) -> RolloutBatch:
    """Gold solutions, or the teacher's samples under rollout.* sampling."""
    if cfg.distill.traces == "gold":
        return gold_batch(pair.tokenizer, prompts, pair.device)
    params = SamplingParams(n=cfg.rollout.samples_per_prompt, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                            max_new_tokens=cfg.rollout.max_new_tokens, batch_size=cfg.rollout.batch_size)
    return sample(pair.teacher, pair.tokenizer, [render(pair.tokenizer, p) for p in prompts], params,
                  generator=generator)


def _load(cfg: DistillRunConfig) -> LoadedPair:
    if cfg.distill.traces == "teacher" or cfg.distill.mode == "fkl":
        return load_pair(cfg.model.student, cfg.model.teacher, cfg.run.device, cfg.run.dtype,
                         trust_remote_code=cfg.model.trust_remote_code,
                         attn_implementation=cfg.model.attn_implementation)
    device = resolve_device(cfg.run.device)
    dtype = resolve_dtype(cfg.run.dtype, device)
    student = load_model(cfg.model.student, device, dtype, trainable=True,
                         trust_remote_code=cfg.model.trust_remote_code,
                         attn_implementation=cfg.model.attn_implementation)
    return LoadedPair(student, None, load_tokenizer(cfg.model.student), device, dtype)


def run_distill(cfg: DistillRunConfig, explicit: set[str], argv: list[str] | None = None) -> DistillResult:
    validate_common(cfg, explicit)
    setup_process(cfg.run)
    if cfg.distill.traces == "gold":
        for key in ("rollout.temperature", "rollout.top_p", "rollout.top_k", "rollout.samples_per_prompt"):
            if key in explicit:
                raise ConfigError(f"{key} cannot take effect: distill.traces=gold samples nothing; remove it")
        if "model.teacher" in explicit and cfg.distill.mode == "sft":
            warnings.warn("model.teacher is not loaded: distill.traces=gold with mode=sft needs no "
                          "teacher", stacklevel=2)
    source = PromptSource(cfg.data, cfg.run.seed)  # data errors surface before models load
    heldout = heldout_prompts(cfg.data, cfg.eval.size) if cfg.eval.enabled else None
    pair = _load(cfg)
    optimizer = build_optimizer(pair.student, cfg.optim)
    ctx = open_run(cfg, argv or sys.argv, pair, optimizer, source, None, heldout, write_rollouts=False)
    n_seq = cfg.rollout.prompts_per_step * (cfg.rollout.samples_per_prompt if cfg.distill.traces == "teacher" else 1)
    before = ctx.evaluate()
    ctx.log_eval(ctx.state.step, before, "before")
    with progress_bar(cfg.train.max_steps, ctx.state.step, "opd distill") as bar:
        for step_idx in range(ctx.state.step, cfg.train.max_steps):
            metrics: dict[str, float] = {}
            prompts = source.next_batch(cfg.rollout.prompts_per_step)
            with timed(metrics, "sample"):
                batch = traces(cfg, pair, prompts, ctx.generator)
            with timed(metrics, "train"):
                normalizer = max(1.0, float(batch.response_mask_B_T.sum()))
                size = -(-n_seq // cfg.optim.grad_accum)
                total = 0.0
                for a in range(0, batch.batch_size, size):
                    loss, _ = distill_loss(pair.student, pair.teacher, batch.rows(slice(a, a + size)),
                                           cfg.distill.mode, normalizer, cfg.scoring.chunk_tokens)
                    loss.backward()
                    total += float(loss.detach())
                metrics[f"loss/{cfg.distill.mode}"] = metrics["loss/total"] = total
                metrics |= optimizer_step(pair.student, optimizer, cfg.optim, step_idx, cfg.train.max_steps)
            metrics["rollout/response_len"] = float(batch.response_mask_B_T.float().sum(-1).mean())
            ctx.periodic(step_idx, metrics, None)
            bar.advance(metrics)
    after = ctx.evaluate()
    ctx.log_eval(ctx.state.step, after, "after")
    ctx.save(None, final=True)
    ctx.close()
    return DistillResult(str(ctx.run_dir), before, after, ctx.state.step)
