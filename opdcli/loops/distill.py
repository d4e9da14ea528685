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

import torch

from opdcli import dist, losses, stages
from opdcli.assembly import check_engine, vllm_sampler
from opdcli.config import DistillRunConfig, RolloutConfig
from opdcli.data import Prompt, PromptSource, heldout_prompts, render
from opdcli.dist import Dist
from opdcli.engines.hf_sampler import HFSampler
from opdcli.engines.hf_scorer import HFScorer
from opdcli.engines.types import RolloutBatch
from opdcli.errors import ConfigError, DataError
from opdcli.learner import Learner
from opdcli.lm import as_response_lm, token_stats
from opdcli.models import (
    LoadedPair,
    load_configured_pair,
    load_weights,
)
from opdcli.objective import chunked_logit_loss
from opdcli.precision import sampling_replica
from opdcli.run.context import RunResult, open_run, resume_point, setup_process
from opdcli.run.interrupt import StopOnSignal
from opdcli.run.progress import progress_bar
from opdcli.run.tracking import timed
from opdcli.validate import validate_common


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
        prompt_texts_P=tuple(texts), version_B=torch.zeros(B, dtype=torch.long))


def distill_loss(student, scorer: HFScorer | None, batch: RolloutBatch, mode: str, normalizer: float,
                 chunk_tokens: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy (sft) or forward KL to the teacher (fkl) on the trace tokens."""
    mask = batch.response_mask_B_T.float()
    if mode == "sft":
        def sft(hidden, head):
            st = token_stats(hidden, head, batch.response_ids_B_T, 1, chunk_tokens)
            return losses.token_mean(-st.lp_B_T, mask, None, normalizer)

        loss = as_response_lm(student)(batch, compute=sft)
        return loss, {}
    assert scorer is not None, "fkl distillation needs the teacher"
    t_hidden = scorer.teacher_hidden(batch)

    def fkl(hidden, head):
        return chunked_logit_loss(hidden, head, t_hidden, scorer.teacher_logits, losses.forward_kl_loss, mask,
                                  None, normalizer, chunk_tokens, support="full")[0]

    loss = as_response_lm(student)(batch, compute=fkl)
    return loss, {}


def traces(cfg: DistillRunConfig, tokenizer, sampler: HFSampler | None, prompts: list[Prompt],
           device: torch.device, d: Dist) -> RolloutBatch:
    """This rank's rows of the gold solutions, or of the teacher's samples under rollout.*."""
    if cfg.distill.traces == "gold":
        start, stop = d.shard(len(prompts))
        return gold_batch(tokenizer, prompts[start:stop], device)
    assert sampler is not None
    return stages.sample(sampler, [render(tokenizer, p) for p in prompts], stages.sampling_params(cfg.rollout), d)


def _load(cfg: DistillRunConfig, device: str) -> LoadedPair:
    m = cfg.model
    needs_teacher = cfg.distill.traces == "teacher" or cfg.distill.mode == "fkl"
    return load_configured_pair(m, device, cfg.run.dtype, teacher_files=needs_teacher,
                                master_weights=cfg.run.master_weights)


def run_distill(cfg: DistillRunConfig, explicit: set[str], argv: list[str] | None = None) -> RunResult:
    validate_common(cfg, explicit)
    if cfg.distill.traces == "gold":
        # one gold trace per prompt: samples_per_prompt 1 (as the shipped distill.yaml sets) and
        # the sampling defaults change nothing; any other value would be silently ignored
        neutral = {name: getattr(RolloutConfig(), name) for name in ("temperature", "top_p", "top_k", "engine")}
        neutral["samples_per_prompt"] = 1
        for name, value in neutral.items():
            if f"rollout.{name}" in explicit and getattr(cfg.rollout, name) != value:
                raise ConfigError(f"rollout.{name} cannot take effect: distill.traces=gold samples nothing; "
                                  "remove it")
        if "model.teacher" in explicit and cfg.distill.mode == "sft":
            warnings.warn("model.teacher is not loaded: distill.traces=gold with mode=sft needs no "
                          "teacher", stacklevel=2)
    if cfg.scoring.teacher_engine != "hf":
        raise ConfigError("scoring.teacher_engine cannot take effect: opd distill trains on traces, with no "
                          "teacher scoring of student samples; remove it (rollout.engine=vllm samples traces)")
    d = dist.init(cfg.run.device, cfg.dist.backend)
    try:
        return _run(cfg, argv or sys.argv, d)
    finally:
        dist.shutdown(d)


def _run(cfg: DistillRunConfig, argv: list[str], d: Dist) -> RunResult:
    setup_process(cfg.run)
    if cfg.distill.traces == "teacher":
        check_engine(cfg, cfg.model.teacher, "teacher")
    n_seq = cfg.rollout.prompts_per_step * (cfg.rollout.samples_per_prompt if cfg.distill.traces == "teacher" else 1)
    if d.active and n_seq % d.world:
        raise ConfigError(f"the step's {n_seq} traces do not split evenly over {d.world} ranks; make "
                          f"rollout.prompts_per_step a multiple of {d.world}")
    source = PromptSource(cfg.data, cfg.run.seed)  # data errors surface before models load
    heldout = heldout_prompts(cfg.data, cfg.eval.size) if cfg.eval.enabled else None
    ckpt = resume_point(cfg)
    pair = _load(cfg, dist.device_for(cfg.run.device, d))
    if ckpt is not None:
        load_weights(pair.student, ckpt)
    policy = pair.student if not d.active else sampling_replica(pair.student)
    learner = Learner(pair.student, cfg.optim, d)
    scorer = None if pair.teacher is None else HFScorer(None, pair.teacher, k=1, chunk_tokens=cfg.scoring.chunk_tokens,
                                                         batch_size=cfg.scoring.batch_size)
    ctx = open_run(cfg, argv, d, eval_model=policy, tokenizer=pair.tokenizer, device=pair.device,
                   dtype=pair.dtype, source=source, heldout=heldout, learner=learner, write_rollouts=False,
                   ckpt=ckpt)
    sampler = None
    if cfg.distill.traces == "teacher" and cfg.rollout.engine == "vllm":  # a frozen teacher: no weight pushes
        sampler = vllm_sampler(cfg, cfg.model.teacher, pair.tokenizer, module=None, device=pair.device,
                               dtype=pair.dtype)
    elif cfg.distill.traces == "teacher":
        sampler = HFSampler(pair.teacher, pair.tokenizer, generator=ctx.generator)

    def loop(stop: StopOnSignal) -> None:
        with progress_bar(cfg.train.max_steps, ctx.state.step, "opd distill", show=d.is_main) as bar:
            for step_idx in range(ctx.state.step, cfg.train.max_steps):
                stop.check()
                metrics: dict[str, float] = {}
                prompts = source.next_batch(cfg.rollout.prompts_per_step)
                with timed(metrics, "sample"):
                    batch = traces(cfg, pair.tokenizer, sampler, prompts, pair.device, d)
                with timed(metrics, "train"):
                    def micro_loss(sl: slice, normalizer: float, batch: RolloutBatch = batch):
                        return distill_loss(learner.module, scorer, batch.rows(sl), cfg.distill.mode, normalizer,
                                            cfg.scoring.chunk_tokens)

                    tokens = float(batch.response_mask_B_T.sum())
                    total = stages.train_on(batch.batch_size, tokens, cfg.optim.grad_accum, micro_loss, d)["loss/total"]
                    metrics[f"loss/{cfg.distill.mode}"] = metrics["loss/total"] = total
                    metrics |= learner.step(cfg.optim, step_idx, cfg.train.max_steps)
                    weights = learner.full_weights()
                    if weights is not None:
                        policy.load_state_dict(weights)
                metrics["rollout/response_len"] = d.sum(tokens) / max(1, n_seq)
                ctx.periodic(step_idx, metrics, learner, None)
                bar.advance(metrics)

    return ctx.drive(learner, None, loop)
