"""Token-level on-policy distillation losses (methods.md §1, Variants A-E).

Every loss is a pure function of tensors and scalars and returns ``(loss, metrics)``:
``loss`` is a scalar tensor that carries a graph whenever the student input requires grad,
and ``metrics`` maps ``loss/...`` keys to detached python floats.

* `sampled_token_loss`   Variant A: sampled-token reward with an "is" / "ppo" / "pg" surrogate.
* `topk_pg_loss`         Variant B: top-K reverse KL in policy-gradient form, summed over K.
* `analytic_rkl_loss`    Variant C: differentiable reverse KL on the full vocab or a top-k support.
* `forward_kl_loss`      Variant D: forward KL on the same supports.
* `generalized_jsd_loss` Variant E: the generalized JSD of GKD (TRL), exact KLs at beta 0 and 1.

Aggregation is token-mean everywhere (`token_mean`): ``sum(m * w * l) / normalizer`` with ``m``
the response mask, ``w`` optional detached per-token weights and ``normalizer`` the number of
valid tokens (at least 1) unless the caller passes the global token count, so that the losses
of the chunks of one batch sum to the full-batch loss.

Masked positions may hold anything (nan, +-inf): inputs are replaced with `torch.where` *before*
any arithmetic, because multiplying by zero afterwards still turns a nan or inf into a nan, in the
loss and in the backward pass. An all-masked batch gives a loss of exactly 0.0 with a valid graph.

Logged metrics (means are unweighted over valid tokens, 0.0 when there are none):

| key                   | loss                  | meaning                                          |
|-----------------------|-----------------------|--------------------------------------------------|
| loss/pg               | sampled_token_loss    | the loss value                                   |
| loss/ratio_mean, _max | sampled_token_loss    | mean / max of exp(student_lp - behavior_lp)      |
| loss/clipfrac         | sampled_token_loss    | fraction of tokens where the PPO clip is active  |
| loss/advantage_mean   | sampled_token_loss    | mean advantage                                   |
| loss/topk_pg          | topk_pg_loss          | the loss value                                   |
| loss/topk_rkl         | topk_pg_loss          | mean of sum_v w(v) (old_lp(v) - teacher_lp(v))   |
| loss/rkl, fkl, jsd    | analytic losses       | the loss value                                   |
| loss/tokens           | all                   | number of valid tokens                           |

Shape suffixes: _B batch, _T tokens, _K candidates, _V vocabulary, _S support.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from opdcli.errors import ConfigError
from opdcli.signals import masked_mean

Surrogate = Literal["is", "ppo", "pg"]
WeightMode = Literal["student_p", "teacher_p", "none"]
Support = Literal["full", "student_topk", "teacher_topk"]
Normalizer = float | int | torch.Tensor | None

_SURROGATES = ("is", "ppo", "pg")
_WEIGHT_MODES = ("student_p", "teacher_p", "none")
_SUPPORTS = ("full", "student_topk", "teacher_topk")


# ----------------------------------------------------------------------------- helpers


def _valid(mask_B_T: torch.Tensor) -> torch.Tensor:
    """Boolean view of a 0/1 float or bool mask."""
    return mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0


def _where_valid(x: torch.Tensor, valid_B_T: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Replace the entries of ``x`` (B, T, ...) at invalid positions by ``fill``."""
    valid = valid_B_T.reshape(valid_B_T.shape + (1,) * (x.dim() - valid_B_T.dim()))
    return torch.where(valid, x, fill)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; use one of {list(allowed)}.")


def _check_shape(name: str, x: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ConfigError(
            f"{name} has shape {tuple(x.shape)} but {tuple(shape)} was expected; "
            "pass tensors aligned with mask_B_T."
        )


def _check_leading(name: str, x: torch.Tensor, valid_B_T: torch.Tensor) -> None:
    if x.dim() != 3 or x.shape[:2] != valid_B_T.shape:
        raise ConfigError(
            f"{name} has shape {tuple(x.shape)}; expected 3 dims with the leading two equal to "
            f"{tuple(valid_B_T.shape)} from mask_B_T."
        )


def _check_clip(clip_low: float, clip_high: float) -> None:
    if not 0.0 <= clip_low <= 1.0 or clip_high < 0.0:
        raise ConfigError(
            f"clip_low={clip_low}, clip_high={clip_high} are invalid; "
            "need 0 <= clip_low <= 1 and clip_high >= 0."
        )


def _masked_mean(x_B_T: torch.Tensor, valid_B_T: torch.Tensor) -> float:
    """Unweighted mean over valid positions as a python float (0.0 when none is valid)."""
    return float(masked_mean(x_B_T.detach(), valid_B_T))


def token_mean(
    values_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    weights_B_T: torch.Tensor | None = None,
    normalizer: Normalizer = None,
) -> torch.Tensor:
    """Token-mean aggregation ``sum(m * w * values) / normalizer``.

    Args:
        values_B_T: (B, T) per-token losses; entries at masked positions are ignored, even nan.
        mask_B_T: (B, T) 0/1 float or bool mask of the tokens trained on.
        weights_B_T: optional (B, T) per-token weights, detached; default ones.
        normalizer: divisor; default ``mask_B_T.sum()`` clamped to at least 1. Pass the token
            count of the whole batch when the batch is processed in chunks; 0 is read as 1.

    Returns:
        Scalar tensor; exactly 0.0 (with a graph when ``values_B_T`` requires grad) if every
        position is masked.
    """
    valid = _valid(mask_B_T)
    _check_shape("values_B_T", values_B_T, valid.shape)
    values = torch.where(valid, values_B_T, 0.0)
    if weights_B_T is None:
        w = valid.to(values.dtype)
    else:
        _check_shape("weights_B_T", weights_B_T, valid.shape)
        w = torch.where(valid, weights_B_T.detach().to(values.dtype), 0.0)
    total = (values * w).sum()
    if normalizer is None:
        denom = valid.sum().clamp_min(1).to(total.dtype)
    else:
        if not isinstance(normalizer, torch.Tensor) and not normalizer >= 0:
            raise ConfigError(f"normalizer={normalizer} must be >= 0 (a token count).")
        denom = torch.as_tensor(normalizer).detach().to(dtype=total.dtype, device=total.device)
        # a step with no trained tokens passes 0; its numerator is 0 too, so return 0, not nan
        denom = torch.where(denom == 0, 1.0, denom)
    return total / denom


def _ppo_terms(
    ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise ``max(-ratio*A, -clip(ratio)*A)`` and the mask where the clip is active."""
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    return torch.maximum(unclipped, clipped), clipped > unclipped


# ----------------------------------------------------------------------------- Variant A


def sampled_token_loss(
    student_lp_B_T: torch.Tensor,
    behavior_lp_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    weights_B_T: torch.Tensor | None = None,
    *,
    surrogate: Surrogate = "is",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    normalizer: Normalizer = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Variant A: surrogate loss on the sampled tokens (Tinker / verl / G-OPD).

    With ``rho = exp(student_lp - behavior_lp)``: "is" ``-rho*A``; "ppo"
    ``max(-rho*A, -clip(rho, 1-clip_low, 1+clip_high)*A)``, capped at ``-dual_clip*A`` where
    ``A < 0`` (verl's dual clip; ``dual_clip=None`` disables it); "pg" ``-A*student_lp``.
    At ``rho == 1`` all three have the gradient ``-A * grad(student_lp)``.

    Args:
        student_lp_B_T: (B, T) log-probs of the sampled tokens under the student (with grad).
        behavior_lp_B_T: (B, T) log-probs under the sampler; treated as a constant.
        advantages_B_T: (B, T) per-token advantages; treated as a constant.
        mask_B_T: (B, T) 0/1 float or bool mask.
        weights_B_T: optional (B, T) detached per-token weights.
        surrogate: "is", "ppo" or "pg".
        clip_low, clip_high: PPO clip range (ppo only).
        dual_clip: dual-clip constant c > 1 for negative advantages (ppo only), or None.
        normalizer: see `token_mean`.

    Returns:
        ``(loss, metrics)`` with metrics loss/pg, loss/ratio_mean, loss/ratio_max,
        loss/clipfrac (0.0 unless ppo), loss/advantage_mean, loss/tokens.
    """
    _check_choice("surrogate", surrogate, _SURROGATES)
    if surrogate == "ppo":
        _check_clip(clip_low, clip_high)
        if dual_clip is not None and not dual_clip > 1.0:
            raise ConfigError(f"dual_clip={dual_clip} must be > 1, or None to disable it.")
    valid = _valid(mask_B_T)
    _check_shape("student_lp_B_T", student_lp_B_T, valid.shape)
    _check_shape("behavior_lp_B_T", behavior_lp_B_T, valid.shape)
    _check_shape("advantages_B_T", advantages_B_T, valid.shape)
    lp = torch.where(valid, student_lp_B_T, 0.0)
    old = torch.where(valid, behavior_lp_B_T.detach(), 0.0)
    adv = torch.where(valid, advantages_B_T.detach(), 0.0)
    ratio = torch.exp(lp - old)
    clipfrac = 0.0
    if surrogate == "is":
        per_token = -ratio * adv
    elif surrogate == "pg":
        per_token = -adv * lp
    else:
        per_token, is_clipped = _ppo_terms(ratio, adv, clip_low, clip_high)
        if dual_clip is not None:
            per_token = torch.where(adv < 0, torch.minimum(per_token, -dual_clip * adv), per_token)
        clipfrac = _masked_mean(is_clipped.to(ratio.dtype), valid)
    loss = token_mean(per_token, valid, weights_B_T, normalizer)
    ratio_valid = torch.where(valid, ratio.detach(), -math.inf)
    metrics = {
        "loss/pg": loss.item(),
        "loss/ratio_mean": _masked_mean(ratio, valid),
        "loss/ratio_max": ratio_valid.max().item() if bool(valid.any()) else 0.0,
        "loss/clipfrac": clipfrac,
        "loss/advantage_mean": _masked_mean(adv, valid),
        "loss/tokens": float(valid.sum().item()),
    }
    return loss, metrics


# ----------------------------------------------------------------------------- Variant B


def topk_pg_loss(
    student_topk_lp_B_T_K: torch.Tensor,
    old_topk_lp_B_T_K: torch.Tensor,
    teacher_topk_lp_B_T_K: torch.Tensor,
    mask_B_T: torch.Tensor,
    weights_B_T: torch.Tensor | None = None,
    *,
    weight_mode: WeightMode = "student_p",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    normalizer: Normalizer = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Variant B: top-K reverse KL in policy-gradient form (THUNLP/OPD, methods.md §1.3).

    Per candidate ``A = -w(v) * (old_lp(v) - teacher_lp(v))`` (constant) with ``w`` the softmax
    over K of the old student log-probs ("student_p"), of the teacher log-probs ("teacher_p") or
    uniform 1/K ("none"); ``rho = exp(student_lp - old_lp)``; the PPO-clipped term
    ``max(-rho*A, -clip(rho)*A)`` is summed over K and then token-meaned. With K = V, "student_p"
    and rho = 1 the gradient equals that of the full-vocabulary analytic reverse KL.

    Args:
        student_topk_lp_B_T_K: (B, T, K) current student log-probs of the candidates, normalised
            over the full vocabulary (with grad).
        old_topk_lp_B_T_K: (B, T, K) student log-probs of the same candidates at sampling time.
        teacher_topk_lp_B_T_K: (B, T, K) teacher log-probs (full-vocab normalised) of them.
        mask_B_T: (B, T) 0/1 float or bool mask.
        weights_B_T: optional (B, T) detached per-token weights.
        weight_mode: "student_p", "teacher_p" or "none".
        clip_low, clip_high: PPO clip range.
        normalizer: see `token_mean`.

    Returns:
        ``(loss, metrics)`` with metrics loss/topk_pg, loss/topk_rkl, loss/tokens.
    """
    _check_choice("weight_mode", weight_mode, _WEIGHT_MODES)
    _check_clip(clip_low, clip_high)
    valid = _valid(mask_B_T)
    _check_leading("student_topk_lp_B_T_K", student_topk_lp_B_T_K, valid)
    _check_shape("old_topk_lp_B_T_K", old_topk_lp_B_T_K, student_topk_lp_B_T_K.shape)
    _check_shape("teacher_topk_lp_B_T_K", teacher_topk_lp_B_T_K, student_topk_lp_B_T_K.shape)
    lp = _where_valid(student_topk_lp_B_T_K, valid)
    old = _where_valid(old_topk_lp_B_T_K.detach(), valid)
    teacher = _where_valid(teacher_topk_lp_B_T_K.detach(), valid)
    if weight_mode == "student_p":
        w = old.softmax(dim=-1)
    elif weight_mode == "teacher_p":
        w = teacher.softmax(dim=-1)
    else:
        w = torch.full_like(old, 1.0 / old.shape[-1])
    weighted_rkl = w * (old - teacher)
    ratio = torch.exp(lp - old)
    per_candidate, _ = _ppo_terms(ratio, -weighted_rkl, clip_low, clip_high)
    loss = token_mean(per_candidate.sum(dim=-1), valid, weights_B_T, normalizer)
    metrics = {
        "loss/topk_pg": loss.item(),
        "loss/topk_rkl": _masked_mean(weighted_rkl.sum(dim=-1), valid),
        "loss/tokens": float(valid.sum().item()),
    }
    return loss, metrics


# ----------------------------------------------------------------------------- Variants C-E


def _tail_log_mass(lp_B_T_V: torch.Tensor, in_support_B_T_V: torch.Tensor) -> torch.Tensor:
    """(B, T) log of the probability mass outside the support, computed over the complement.

    Support entries are replaced by the most negative finite number rather than -inf, so an
    empty complement gives a finite log-mass whose probability underflows to 0 and whose
    logsumexp backward stays finite.
    """
    fill = torch.finfo(lp_B_T_V.dtype).min
    return torch.logsumexp(torch.where(in_support_B_T_V, fill, lp_B_T_V), dim=-1)


def _restrict_to_support(
    student_logits_B_T_V: torch.Tensor,
    teacher_logits_B_T_V: torch.Tensor,
    support: Support,
    k: int,
    tail_bucket: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-distributions over the support ``S_t``.

    "full" keeps all V ids; "student_topk" / "teacher_topk" keep the top-min(k, V) ids of that
    model (chosen without grad). The full-vocab distributions are restricted to ``S_t`` and
    renormalised, or, with ``tail_bucket``, extended by one pseudo-token holding ``1 - sum_S``.

    Returns:
        ``(student_lp_B_T_S, teacher_lp_B_T_S)``, each summing to 1 in probability over the last
        dim; S is V, k, or k + 1 with the tail bucket. The teacher is detached.
    """
    student_lp = F.log_softmax(student_logits_B_T_V, dim=-1)
    teacher_lp = F.log_softmax(teacher_logits_B_T_V.detach(), dim=-1)
    if support == "full":
        return student_lp, teacher_lp
    source = student_logits_B_T_V if support == "student_topk" else teacher_logits_B_T_V
    ids_B_T_K = source.detach().topk(min(k, source.shape[-1]), dim=-1).indices
    student_S = student_lp.gather(-1, ids_B_T_K)
    teacher_S = teacher_lp.gather(-1, ids_B_T_K)
    if not tail_bucket:
        return student_S.log_softmax(dim=-1), teacher_S.log_softmax(dim=-1)
    in_S = torch.zeros_like(student_lp, dtype=torch.bool).scatter(-1, ids_B_T_K, True)
    student_tail = _tail_log_mass(student_lp, in_S).unsqueeze(-1)
    teacher_tail = _tail_log_mass(teacher_lp, in_S).unsqueeze(-1)
    return torch.cat([student_S, student_tail], -1), torch.cat([teacher_S, teacher_tail], -1)


def _kl_B_T(lp_a: torch.Tensor, lp_b: torch.Tensor) -> torch.Tensor:
    """``sum_v exp(lp_a)(lp_a - lp_b)`` over the last dim; entries with ``lp_a = -inf`` add 0."""
    live = ~torch.isneginf(lp_a)
    a = torch.where(live, lp_a, 0.0)
    b = torch.where(live, lp_b, 0.0)
    return torch.where(live, a.exp() * (a - b), 0.0).sum(dim=-1)


def _fkl_B_T(lp_s: torch.Tensor, lp_t: torch.Tensor) -> torch.Tensor:
    """Forward KL ``KL(teacher || student)`` from (student, teacher) log-distributions."""
    return _kl_B_T(lp_t, lp_s)


def _log_mixture(lp_t: torch.Tensor, lp_s: torch.Tensor, beta: float) -> torch.Tensor:
    """``log(beta * exp(lp_t) + (1 - beta) * exp(lp_s))`` for 0 < beta < 1, nan-free backward."""
    live = ~(torch.isneginf(lp_t) & torch.isneginf(lp_s))
    t = torch.where(live, lp_t, 0.0) + math.log(beta)
    s = torch.where(live, lp_s, 0.0) + math.log1p(-beta)
    return torch.where(live, torch.logaddexp(t, s), -math.inf)


def _divergence_loss(
    key: str,
    divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    student_logits_B_T_V: torch.Tensor,
    teacher_logits_B_T_V: torch.Tensor,
    mask_B_T: torch.Tensor,
    weights_B_T: torch.Tensor | None,
    support: Support,
    k: int,
    tail_bucket: bool,
    normalizer: Normalizer,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Shared body of the analytic losses: validate, sanitise, restrict, aggregate.

    ``divergence(student_lp_B_T_S, teacher_lp_B_T_S) -> (B, T)``; ``key`` names the metric.
    """
    _check_choice("support", support, _SUPPORTS)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k={k!r} must be a positive int (the top-k support size).")
    valid = _valid(mask_B_T)
    _check_leading("student_logits_B_T_V", student_logits_B_T_V, valid)
    _check_shape("teacher_logits_B_T_V", teacher_logits_B_T_V, student_logits_B_T_V.shape)
    student = _where_valid(student_logits_B_T_V, valid)
    teacher = _where_valid(teacher_logits_B_T_V, valid)
    # Upcast: log_softmax over a large vocabulary in half precision loses the small terms.
    if student.dtype in (torch.float16, torch.bfloat16):
        student, teacher = student.float(), teacher.float()
    student_lp, teacher_lp = _restrict_to_support(student, teacher, support, k, tail_bucket)
    loss = token_mean(divergence(student_lp, teacher_lp), valid, weights_B_T, normalizer)
    return loss, {key: loss.item(), "loss/tokens": float(valid.sum().item())}


def analytic_rkl_loss(
    student_logits_B_T_V: torch.Tensor,
    teacher_logits_B_T_V: torch.Tensor,
    mask_B_T: torch.Tensor,
    weights_B_T: torch.Tensor | None = None,
    *,
    support: Support = "full",
    k: int = 16,
    tail_bucket: bool = False,
    normalizer: Normalizer = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Variant C: ``sum_{v in S_t} p(v) (log p(v) - log q(v))`` with p the student, q the teacher.

    Args:
        student_logits_B_T_V: (B, T, V) student logits (with grad).
        teacher_logits_B_T_V: (B, T, V) teacher logits; treated as a constant.
        mask_B_T: (B, T) 0/1 float or bool mask.
        weights_B_T: optional (B, T) detached per-token weights.
        support: "full" (exact), "student_topk" or "teacher_topk" (ids of that model's top-k).
        k: support size for the top-k supports (capped at V).
        tail_bucket: on a top-k support, keep the mass outside it as one extra pseudo-token
            instead of renormalising over the support.
        normalizer: see `token_mean`.

    Returns:
        ``(loss, metrics)`` with metrics loss/rkl, loss/tokens.
    """
    tensors = (student_logits_B_T_V, teacher_logits_B_T_V, mask_B_T, weights_B_T)
    return _divergence_loss("loss/rkl", _kl_B_T, *tensors, support, k, tail_bucket, normalizer)


def forward_kl_loss(
    student_logits_B_T_V: torch.Tensor,
    teacher_logits_B_T_V: torch.Tensor,
    mask_B_T: torch.Tensor,
    weights_B_T: torch.Tensor | None = None,
    *,
    support: Support = "full",
    k: int = 16,
    tail_bucket: bool = False,
    normalizer: Normalizer = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Variant D: ``sum_{v in S_t} q(v) (log q(v) - log p(v))`` with p the student, q the teacher.

    Args and supports as in `analytic_rkl_loss`.

    Returns:
        ``(loss, metrics)`` with metrics loss/fkl, loss/tokens.
    """
    tensors = (student_logits_B_T_V, teacher_logits_B_T_V, mask_B_T, weights_B_T)
    return _divergence_loss("loss/fkl", _fkl_B_T, *tensors, support, k, tail_bucket, normalizer)


def generalized_jsd_loss(
    student_logits_B_T_V: torch.Tensor,
    teacher_logits_B_T_V: torch.Tensor,
    mask_B_T: torch.Tensor,
    weights_B_T: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    support: Support = "full",
    k: int = 16,
    tail_bucket: bool = False,
    normalizer: Normalizer = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Variant E: generalized JSD of GKD, as TRL's ``generalized_jsd_loss``.

    ``p_S = softmax(z_S / temperature)``, ``p_T = softmax(z_T / temperature)`` (then restricted
    to the support as in `analytic_rkl_loss`), ``M = beta p_T + (1 - beta) p_S`` and
    ``JSD = beta KL(p_T || M) + (1 - beta) KL(p_S || M)``. As in TRL, beta = 0 is exactly
    ``KL(p_T || p_S)`` (forward) and beta = 1 exactly ``KL(p_S || p_T)`` (reverse).

    Args:
        beta: interpolation in [0, 1].
        temperature: softmax temperature (> 0) applied to both models' logits.
        Other args as in `analytic_rkl_loss`.

    Returns:
        ``(loss, metrics)`` with metrics loss/jsd, loss/tokens.
    """
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta={beta} must lie in [0, 1] (0 = forward KL, 1 = reverse KL).")
    if not temperature > 0.0:
        raise ConfigError(f"temperature={temperature} must be > 0.")

    def jsd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if beta == 0.0:
            return _kl_B_T(t, s)
        if beta == 1.0:
            return _kl_B_T(s, t)
        log_m = _log_mixture(t, s, beta)
        return beta * _kl_B_T(t, log_m) + (1.0 - beta) * _kl_B_T(s, log_m)

    tensors = (student_logits_B_T_V / temperature, teacher_logits_B_T_V / temperature)
    tensors += (mask_B_T, weights_B_T)
    return _divergence_loss("loss/jsd", jsd, *tensors, support, k, tail_bucket, normalizer)

