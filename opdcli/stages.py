"""The stages of one on-policy step, as functions over frozen records:

    sample -> score -> gather (the global batch, for the method) -> weigh -> train_on -> signals

`opd train`, `opd rollout` and `opd distill` (and later loops) are short loops over these.
Data-parallel ranks each sample, score and train their own rows; the method sees the
global batch (every rank computes the same weights, so batch-level statistics such as the
Prune budget or the TOPD threshold equal those of one process), and the loss normaliser is
the token count over all ranks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from opdcli.config import FULL_DISTRIBUTION, LossConfig, RolloutConfig
from opdcli.dist import Dist
from opdcli.engines.types import (
    GenerationControl,
    RolloutBatch,
    RowShard,
    Sampler,
    SamplingParams,
    ScoredBatch,
    Scorer,
)
from opdcli.errors import ConfigError, NonFiniteError
from opdcli.methods.base import Method, MethodOutput
from opdcli.signals import masked_mean, sampled_advantage, topk_overlap


def sampling_params(r: RolloutConfig, max_new_tokens: int | None = None) -> SamplingParams:
    """The rollout config's sampling settings (one place that builds them)."""
    return SamplingParams(n=r.samples_per_prompt, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=r.max_new_tokens if max_new_tokens is None else max_new_tokens,
                          batch_size=r.batch_size, stop_tokens=tuple(r.stop_tokens))


def row_shard(d: Dist, rows: int) -> RowShard:
    """This rank's rows of a `rows`-row batch (all rows alone)."""
    if not d.active:
        return RowShard.whole(rows)
    start, stop = d.shard(rows)
    return RowShard(start, stop, rows, reduce_max=d.max)


def sample(sampler: Sampler, prompt_texts_P: list[str], params: SamplingParams, d: Dist,
           control: GenerationControl | None = None) -> RolloutBatch:
    """This rank's rows of the step's rollout (the prompts are the whole step's)."""
    return sampler.sample(prompt_texts_P, params, control=control,
                          shard=row_shard(d, len(prompt_texts_P) * params.n))


def route(rollout: RolloutBatch, prompts: list) -> RolloutBatch:
    """The rollout of `prompts` with each prompt's teacher tag (model.teachers), for the scorer."""
    tags = tuple(p.teacher for p in prompts)
    return dataclasses.replace(rollout, prompt_teachers_P=tags) if any(t is not None for t in tags) else rollout


def student_from_train(cfg, method: Method) -> bool:
    """Whether the step takes the student's scores from its training forward
    (scoring.student_scores; `train_forward` where it cannot take effect is refused with the reason)."""
    want = cfg.scoring.student_scores
    if want == "scoring_forward":
        return False
    reason = None
    if method.reads_student_scores:
        reason = f"method {method.name} reads the student's scores before training"
    elif cfg.loss.objective == "topk":
        reason = "loss.objective=topk reads the student's top-K before training"
    elif cfg.scoring.teacher_engine != "hf":
        reason = f"scoring.teacher_engine={cfg.scoring.teacher_engine} keeps no teacher hidden states"
    elif cfg.model.teachers:
        reason = "model.teachers scores rows with several teachers, whose heads the training forward cannot apply"
    elif cfg.train.mode != "sync":
        reason = "train.mode=async scores and trains different policy versions"
    if reason is not None and want == "train_forward":
        raise ConfigError(f"scoring.student_scores=train_forward cannot take effect: {reason}; "
                          "use scoring.student_scores=auto or scoring_forward")
    return reason is None


def score(scorer: Scorer, rollout: RolloutBatch, objective: str, fused: bool = False) -> ScoredBatch:
    """Scores of this rank's rows (teacher hidden states kept for full-distribution objectives).
    `fused`: the student is left to the training forward (`student_from_train`)."""
    if fused:
        return scorer.score(rollout, keep_teacher_hidden=True, with_student=False)
    return scorer.score(rollout, keep_teacher_hidden=objective in FULL_DISTRIBUTION)


def fill_student(whole: ScoredBatch, stats, d: Dist) -> ScoredBatch:
    """The global batch with the student's scores of every rank's training forward."""
    return dataclasses.replace(
        whole, student_lp_B_T=d.gather_rows(stats.lp_B_T), student_topk_ids_B_T_K=d.gather_rows(stats.topk_ids_B_T_K),
        student_topk_lp_B_T_K=d.gather_rows(stats.topk_lp_B_T_K),
        teacher_lp_on_student_topk_B_T_K=d.gather_rows(stats.teacher_lp_on_topk_B_T_K))


@dataclass(frozen=True)
class StepRows:
    """What the global batch's records need beyond the scores (rows of every rank)."""

    prompt_index_B: tuple[int, ...]
    prompt_texts_P: tuple[str, ...]
    finished_B: torch.Tensor
    response_ids_B_T: torch.Tensor
    response_mask_B_T: torch.Tensor
    stopped_B: torch.Tensor | None
    follower_tokens: float
    follower_reused: float = 0.0
    """Response tokens whose teacher scores came from the follower's hidden states (not re-run)."""


def gather(rollout: RolloutBatch, scored: ScoredBatch, d: Dist) -> tuple[StepRows, ScoredBatch]:
    """The global batch: every rank's rows in rank order (the kept teacher hidden stays local)."""
    fields = {f.name: getattr(scored, f.name) for f in dataclasses.fields(scored)}
    fields["teacher_hidden_B_T_H"] = None
    whole = ScoredBatch(**{k: None if v is None else d.gather_rows(v) for k, v in fields.items()})
    n = len(rollout.prompt_texts_P)
    per = whole.mask_B_T.shape[0] // max(1, n)
    rows = StepRows(
        prompt_index_B=tuple(p for p in range(n) for _ in range(per)) if d.active else rollout.prompt_index_B,
        prompt_texts_P=rollout.prompt_texts_P, finished_B=d.gather_rows(rollout.finished_B),
        response_ids_B_T=whole.response_ids_B_T, response_mask_B_T=d.gather_rows(rollout.response_mask_B_T),
        stopped_B=None if rollout.stopped_B is None else d.gather_rows(rollout.stopped_B),
        follower_tokens=d.sum(float(rollout.follower_tokens)),
        follower_reused=d.sum(float(rollout.response_mask_B_T.sum()) if rollout.teacher_hidden_B_T_H is not None else 0.0))
    return rows, whole


def weigh(method: Method, scored: ScoredBatch, rows: StepRows, loss: LossConfig, step: int,
          fused: bool = False) -> MethodOutput:
    """The method's weights and advantages on the global batch (default: the sampled advantage;
    `fused`: the student's scores are still to come, so the objective computes it)."""
    advantages_B_T = None if fused else sampled_advantage(scored.teacher_lp_B_T, scored.student_lp_B_T,
                                                          scored.mask_B_T, loss.kl_coef, loss.discount)
    out = method.apply(scored, advantages_B_T, step)
    if out.advantages_B_T is None:
        out.advantages_B_T = advantages_B_T
    assert bool((out.weights_B_T >= 0).all()), f"method {method.name} produced negative weights"
    if rows.stopped_B is not None:  # a stop rule ran during sampling
        p = f"method/{method.name}/"
        out.metrics[p + "online_stopped_frac"] = float(rows.stopped_B.float().mean()) if rows.stopped_B.numel() else 0.0
        out.metrics[p + "online_teacher_tokens"] = rows.follower_tokens
        out.metrics[p + "online_reused_tokens"] = rows.follower_reused
    return out


def local_rows(out: MethodOutput, d: Dist) -> MethodOutput:
    """This rank's rows of the method's global output."""
    if not d.active:
        return out
    start, stop = d.shard(out.weights_B_T.shape[0])
    adv = out.advantages_B_T
    return MethodOutput(weights_B_T=out.weights_B_T[start:stop],
                        advantages_B_T=None if adv is None else adv[start:stop], drift_penalty=out.drift_penalty)


def learn(learner, scorer: Scorer, rollout: RolloutBatch, scored: ScoredBatch, mine: MethodOutput, cfg,
          step: int, d: Dist, collect: list | None = None) -> dict[str, float]:
    """The only forward with grad over this rank's rows, then the optimizer step. `collect`
    receives the student's scores of this rank's rows from that forward (one
    `objective.StudentStats` per micro-batch; `student_from_train`)."""
    from opdcli.objective import objective_loss

    def micro_loss(sl: slice, normalizer: float):
        adv = None if mine.advantages_B_T is None else mine.advantages_B_T[sl]
        return objective_loss(learner.module, rollout.rows(sl), scored.rows(sl), mine.weights_B_T[sl], adv,
                              cfg.loss, normalizer, cfg.scoring.chunk_tokens, scorer.teacher_logits,
                              drift_penalty=mine.drift_penalty, collect=collect)

    trained = d.sum(float(((mine.weights_B_T > 0) & (scored.mask_B_T > 0)).sum()))
    if trained == 0 and collect is None:
        # every token weighs 0 (f-OPD dropped every sample): no forward, no backward, and no
        # optimizer step, which would still move the weights along AdamW's momentum and decay
        return {"loss/total": 0.0, "train/tokens_trained": 0.0, "optim/grad_norm": 0.0, "optim/empty_step": 1.0}
    metrics = train_on(rollout.batch_size, float(scored.mask_B_T.sum()), cfg.optim.grad_accum, micro_loss, d)
    metrics["train/tokens_trained"] = trained
    return metrics | learner.step(cfg.optim, step, cfg.train.max_steps)


MicroLoss = Callable[[slice, float], tuple[torch.Tensor, dict[str, float]]]
"""(rows of the micro-batch, the step's global token normaliser) -> (loss, metrics)."""


def train_on(rows: int, tokens: float, micro_batches: int, micro_loss: MicroLoss, d: Dist) -> dict[str, float]:
    """Forward and backward over `micro_batches` slices of this rank's `rows` rows.

    `tokens` is this rank's count of trained tokens; the normaliser is their sum over ranks,
    so the gradients summed over micro-batches and ranks are those of the step's token-mean
    loss. Under FSDP the gradient reduction averages over ranks, hence the world-size factor.
    Returns loss/total (the global loss) and the loss metrics over the micro-batches
    (`combine_micro`).
    """
    normalizer = max(1.0, d.sum(tokens))
    size = -(-rows // micro_batches)
    total, parts = 0.0, []
    for a in range(0, rows, size):
        loss, metrics = micro_loss(slice(a, a + size), normalizer)
        (loss * d.world if d.active else loss).backward()
        total += float(loss.detach())
        parts.append(metrics)
    out = {k: combine_micro(k, [m[k] for m in parts]) for k in parts[0]} if parts else {}
    out = reduce_loss_metrics(out, tokens, d)
    out["loss/total"] = d.sum(total)
    return out


SUMMED = frozenset({"loss/pg", "loss/topk_pg", "loss/rkl", "loss/fkl", "loss/jsd", "loss/tokens",
                    "loss/drift_penalty"})
"""Loss metrics that are each rank's share of a global sum (divided by the global normaliser)."""


def combine_micro(key: str, values: list[float]) -> float:
    """One loss metric over micro-batches: shares of the step's sum add up, maxima are maxed,
    the rest is averaged."""
    if key in SUMMED:
        return sum(values)
    if key.endswith("_max"):
        return max(values)
    return sum(values) / len(values)


def reduce_loss_metrics(metrics: dict[str, float], tokens: float, d: Dist) -> dict[str, float]:
    """Combine ranks' loss metrics: shares are summed, maxima maxed, means token-weighted."""
    if not d.active:
        return metrics
    keys = sorted(metrics)
    summed = d.sums({k: metrics[k] if k in SUMMED else metrics[k] * tokens for k in keys} | {"_tokens": tokens})
    out = {k: summed[k] if k in SUMMED else summed[k] / max(1.0, summed["_tokens"]) for k in keys}
    for k in keys:
        if k.endswith("_max"):
            out[k] = d.fmax(metrics[k])
    return out


def batch_signals(scored: ScoredBatch, finished_B: torch.Tensor) -> dict[str, float]:
    """The step's per-token signals and rollout lengths (on the global batch)."""
    m = scored.mask_B_T
    r = scored.teacher_lp_B_T - scored.student_lp_B_T
    overlap = topk_overlap(scored.student_topk_ids_B_T_K, scored.teacher_topk_ids_B_T_K)
    return {
        "signal/teacher_kl": float(masked_mean(-r, m)),
        "signal/teacher_lp": float(masked_mean(scored.teacher_lp_B_T, m)),
        "signal/student_lp": float(masked_mean(scored.student_lp_B_T, m)),
        "signal/topk_overlap": float(masked_mean(overlap, m)),
        "rollout/response_len": float(m.sum(-1).mean()),
        "rollout/finished_rate": float(finished_B.float().mean()),
        "rollout/tokens": float(m.sum()),
    }


def route_signals(rollout: RolloutBatch, scored: ScoredBatch, teachers: dict[str, str], d: Dist) -> dict[str, float]:
    """Per domain teacher (model.teachers), over the global batch: its share of the response
    tokens and the student's sampled-token KL to it, `route/<tag>/tokens_frac` and
    `signal/teacher_kl/<tag>` (every rank reduces the same tags, in order)."""
    tags_B = rollout.teacher_tags_B
    m_B_T = scored.mask_B_T
    kl_B_T = torch.where(m_B_T > 0, scored.student_lp_B_T - scored.teacher_lp_B_T, 0.0)
    total = d.sum(float(m_B_T.sum()))
    out = {}
    for tag in sorted(teachers):
        mine = torch.tensor([t == tag for t in tags_B], dtype=torch.bool, device=m_B_T.device)
        tokens, kl = d.sum(float(m_B_T[mine].sum())), d.sum(float(kl_B_T[mine].sum()))
        out[f"route/{tag}/tokens_frac"] = tokens / max(total, 1.0)
        out[f"signal/teacher_kl/{tag}"] = kl / tokens if tokens else float("nan")
    return out


def bad_signal(scored: ScoredBatch, d: Dist, student: bool = True) -> str | None:
    """What in this rank's scores is not finite on response tokens (teacher first), or None;
    agreed over ranks, so that all stop or skip together. `student` false: the student's scores
    are still to come (`student_from_train`)."""
    m = scored.mask_B_T > 0
    checks = [("teacher", scored.teacher_lp_B_T)] + ([("student", scored.student_lp_B_T)] if student else [])
    found = None
    for name, lp in checks:
        bad = int((~torch.isfinite(lp) & m).sum())
        if bad:
            found = f"{name} log-probs ({bad} of {int(m.sum())} response tokens are inf or NaN)"
            break
    if d.active and d.max(int(found is not None)) and found is None:
        found = "log-probs on another rank"
    return found


def bad_update(metrics: dict[str, float], scored: ScoredBatch) -> str | None:
    """What made the optimizer step apply nothing (a non-finite loss or gradient norm), or None."""
    if not metrics.get("optim/skipped"):
        return None
    m = scored.mask_B_T > 0
    low = float(scored.teacher_lp_B_T[m].min()) if bool(m.any()) else 0.0
    loss = metrics.get("loss/total", float("nan"))
    what = "the loss" if not math.isfinite(loss) else "the gradient norm"
    return f"{what} (loss {loss:.4g}, gradient norm {metrics.get('optim/grad_norm')}, lowest teacher log-prob {low:.4g})"


def guard(source: str | None, step: int, policy: str, metrics: dict[str, float]) -> bool:
    """Apply train.on_nonfinite to a step with a non-finite `source`: raise (stop), or count the
    step as skipped and return True. Returns False for a clean step."""
    if source is None:
        return False
    if policy == "stop":
        raise NonFiniteError(f"step {step + 1}: non-finite {source}; no update was applied and the checkpoints "
                             "stay as they were. Check the teacher and optim.lr, or pass "
                             "--set train.on_nonfinite=skip to skip such steps")
    metrics["train/skipped"] = 1.0
    return True
