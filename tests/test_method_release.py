"""The release rule on a hand-made scored batch (methods.md §3, §7 invariant 5)."""

from __future__ import annotations

import math

import pytest
import torch

from opdcli.config import LossConfig
from opdcli.engines.types import ScoredBatch
from opdcli.errors import ConfigError
from opdcli.methods.base import METHODS, build_method
from opdcli.methods.release import ReleaseRule

STEPS = ["3*7=21.", "16*3=48.", "48*7=336.", "10+4=14.", "14-2=12.", "12*2=24.", "24+1=25.",
         r"\boxed{25}"]
TEXT = " ".join(STEPS)
DROP = 5  # the margin collapses from this step on
CUT = TEXT.index(" " + STEPS[DROP])  # its segment starts with the space that leads into it
FLAT = " ".join(STEPS[:5])
K = 4
HIGH, LOW = (0.90, 0.05, 0.03, 0.02), (0.30, 0.28, 0.22, 0.20)  # teacher probs of the candidates


def _teacher_lp_B_T_K(T: int, cut: int, noise_seed: int = 0) -> torch.Tensor:
    """Row 0 steps down at `cut`, row 1 is flat; candidates in shuffled order, small noise."""
    g = torch.Generator().manual_seed(noise_seed)
    p_B_T_K = torch.empty(3, T, K)
    p_B_T_K[0, :cut], p_B_T_K[0, cut:] = torch.tensor(HIGH), torch.tensor(LOW)
    p_B_T_K[1:] = torch.tensor(HIGH)
    p_B_T_K = p_B_T_K * (1 + 0.02 * torch.rand(3, T, K, generator=g))
    perm = torch.argsort(torch.rand(3, T, K, generator=g), dim=-1)
    return p_B_T_K.gather(-1, perm).log()


def _scored(tok, teacher_lp_B_T_K=None) -> ScoredBatch:
    rows = [tok.encode(TEXT, add_special_tokens=False), tok.encode(FLAT, add_special_tokens=False), []]
    B, T = len(rows), len(rows[0])
    ids_B_T = torch.full((B, T), tok.pad_token_id, dtype=torch.long)
    mask_B_T = torch.zeros(B, T)
    for b, row in enumerate(rows):
        ids_B_T[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask_B_T[b, : len(row)] = 1
    lp_B_T = torch.zeros(B, T)
    cand_B_T_K = torch.zeros(B, T, K, dtype=torch.long)
    tlp_B_T_K = _teacher_lp_B_T_K(T, CUT) if teacher_lp_B_T_K is None else teacher_lp_B_T_K
    return ScoredBatch(ids_B_T, mask_B_T, lp_B_T, lp_B_T, lp_B_T, cand_B_T_K, tlp_B_T_K, cand_B_T_K,
                       tlp_B_T_K, tlp_B_T_K, torch.zeros(B, dtype=torch.long))


def _method(tok, **options) -> ReleaseRule:
    method = build_method("release", {"k": K, **options}, LossConfig())
    method.attach(tok)
    return method


def test_registered_and_rejects_options_of_another_method():
    assert METHODS["release"] is ReleaseRule
    with pytest.raises(ConfigError, match="unknown config key 'method.options.theta'.*method 'release'"):
        build_method("release", {"theta": 1}, LossConfig())
    with pytest.raises(ConfigError, match="at least 2 candidates"):
        build_method("release", {"k": 1}, LossConfig())


def test_cut_at_the_planted_sentence_and_rescaled_prefix(toy_tokenizer):
    s = _scored(toy_tokenizer)
    out = _method(toy_tokenizer).apply(s, torch.zeros_like(s.mask_B_T), 0)
    tr = out.trajectory_outputs
    assert TEXT[CUT:].startswith(" " + STEPS[DROP])
    assert tr["accepted"] == [True, False, False] and tr["cut_token"] == [CUT, len(FLAT), 0]
    assert tr["release_segment"][0] == DROP and tr["n_segments"] == [8, 5, 0]
    assert tr["bic_improvement"][0] > 10
    w = out.weights_B_T[0]
    t_valid = len(TEXT)
    assert torch.allclose(w[:CUT], torch.full((CUT,), t_valid / CUT))
    assert w[:CUT].sum().item() == pytest.approx(t_valid)  # invariant 5
    assert torch.all(w[CUT:] == 0)
    assert all(isinstance(v, t) for key, t in (("release_segment", int), ("bic_improvement", float),
                                               ("accepted", bool), ("cut_token", int),
                                               ("n_segments", int)) for v in tr[key])


def test_flat_row_keeps_everything_and_masked_row_is_zero(toy_tokenizer):
    s = _scored(toy_tokenizer)
    out = _method(toy_tokenizer).apply(s, torch.zeros_like(s.mask_B_T), 0)
    w_B_T = out.weights_B_T
    assert torch.equal(w_B_T[1], s.mask_B_T[1])
    assert torch.all(w_B_T[2] == 0) and torch.all(w_B_T >= 0)
    assert not w_B_T.requires_grad and out.advantages_B_T is None
    m = out.metrics
    assert m["method/release/accept_rate"] == pytest.approx(1 / 3)
    assert m["method/release/kept_fraction"] == pytest.approx((CUT + len(FLAT)) / (len(TEXT) + len(FLAT)))
    assert m["method/release/segments_mean"] == pytest.approx(13 / 3)
    assert m["method/release/bic_gain_mean"] == pytest.approx(
        sum(out.trajectory_outputs["bic_improvement"]) / 3)


def test_uncapped_rescale_keeps_every_rows_mass():
    """Without a cap (the default) a prefix of 5 of 100 tokens carries weight 20 each: the row's
    mass stays 100; a cap of 8 keeps 40 of it."""
    from opdcli.methods.release import ReleaseConfig, keep_weights

    assert ReleaseConfig().cap is None
    assert keep_weights(100, 5, "tokens", None) == (20.0, 5)
    assert keep_weights(100, 5, "tokens", 8.0) == (8.0, 5)
    assert keep_weights(100, 50, "tokens", 8.0) == (2.0, 50)
    assert keep_weights(100, 0, "tokens", None) == (100.0, 0)  # nothing kept: no mass to carry


def test_cap_and_no_rescale(toy_tokenizer):
    s = _scored(toy_tokenizer)
    free = _method(toy_tokenizer).apply(s, torch.zeros_like(s.mask_B_T), 0).metrics
    assert free["method/release/mass_ratio"] == pytest.approx(1.0) and free["method/release/capped_frac"] == 0
    out = _method(toy_tokenizer, cap=1.2).apply(s, torch.zeros_like(s.mask_B_T), 0)
    capped = out.weights_B_T
    assert out.metrics["method/release/capped_frac"] == pytest.approx(1 / 3)  # the released row
    valid = float(s.mask_B_T.sum())
    assert out.metrics["method/release/mass_ratio"] == pytest.approx(float(capped.sum()) / valid)
    assert out.metrics["method/release/mass_ratio"] < 1
    assert capped.max().item() == pytest.approx(1.2)
    assert torch.allclose(capped[0, :CUT], torch.full((CUT,), 1.2))
    assert capped[0].sum().item() < len(TEXT)
    plain = _method(toy_tokenizer, rescale="none").apply(s, torch.zeros_like(s.mask_B_T), 0).weights_B_T
    assert torch.all(plain[0, :CUT] == 1) and torch.all(plain[0, CUT:] == 0)


def test_margin_in_prob_and_log_space(toy_tokenizer):
    s = _scored(toy_tokenizer)
    lp_T_K = s.teacher_lp_on_student_topk_B_T_K[0]
    top_T_2 = lp_T_K.sort(-1, descending=True).values[:, :2]
    adv = torch.zeros_like(s.mask_B_T)
    prob = _method(toy_tokenizer).apply(s, adv, 0).token_outputs["margin"]
    log = _method(toy_tokenizer, margin_space="log").apply(s, adv, 0).token_outputs["margin"]
    assert torch.allclose(prob[0], top_T_2[:, 0].exp() - top_T_2[:, 1].exp())
    assert torch.allclose(log[0], top_T_2[:, 0] - top_T_2[:, 1])
    assert prob[0, 0].item() == pytest.approx(0.85, abs=0.03)
    assert log[0, 0].item() == pytest.approx(math.log(0.90 / 0.05), abs=0.05)
    assert torch.all(prob[2] == 0) and torch.all(log[1, len(FLAT):] == 0)  # padding


def test_too_few_scored_candidates_and_missing_tokenizer(toy_tokenizer):
    s = _scored(toy_tokenizer)
    with pytest.raises(ConfigError, match="only 4 student top-K entries"):
        _method(toy_tokenizer, k=8).apply(s, torch.zeros_like(s.mask_B_T), 0)
    with pytest.raises(AssertionError, match="attach"):
        build_method("release", {"k": K}, LossConfig()).apply(s, torch.zeros_like(s.mask_B_T), 0)
