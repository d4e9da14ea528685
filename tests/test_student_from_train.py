"""scoring.student_scores: the student's scores taken from the training forward equal those
of the separate no-grad scoring forward, the step trains the same student, and `train_forward` is
refused where it cannot take effect."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from opdcli import config as C
from opdcli.errors import ConfigError
from opdcli.records import read_records
from opdcli.run.tracking import read_metrics

BASE = ["train.max_steps=2", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
        "eval.enabled=false", "train.rollouts_every=1", "train.rollouts_topk=8", "rollout.max_new_tokens=24",
        "train.save_every=0"]


def _run(tmp_path, name: str, extra: list[str]):
    from opdcli.loops.train import run_train

    out = tmp_path / name
    cfg, explicit = C.load_config(C.TrainRunConfig, None, [f"run.out_dir={out}", *BASE, *extra])
    run_train(cfg, explicit, argv=["test"])
    weights = load_file(str(next((out / "checkpoints").glob("step_*")) / "model.safetensors"))
    metrics = [r for r in read_metrics(out / "metrics.jsonl") if "loss/total" in r]
    return weights, metrics, list(read_records(out / "rollouts.jsonl"))


@pytest.mark.parametrize("extra", [["loss.objective=rkl"], ["loss.objective=sampled"],
                                   ["loss.objective=sampled", "loss.discount=0.9", "optim.grad_accum=2"],
                                   ["loss.objective=jsd", "optim.grad_accum=2"]],
                         ids=["rkl", "sampled", "sampled-discount-accum", "jsd-accum"])
def test_fused_student_scores_match_the_separate_forward(tmp_path, extra):
    fused = _run(tmp_path, "on", [*extra, "scoring.student_scores=train_forward"])
    apart = _run(tmp_path, "off", [*extra, "scoring.student_scores=scoring_forward"])
    (w_on, m_on, r_on), (w_off, m_off, r_off) = fused, apart
    assert len(r_on) == len(r_off) == 16
    for a, b in zip(r_on, r_off, strict=True):
        assert a.response_ids == b.response_ids  # the same samples at both steps
        assert torch.allclose(torch.tensor(a.student_lp), torch.tensor(b.student_lp), atol=1e-5)
        assert a.student_topk_ids == b.student_topk_ids
        assert torch.allclose(torch.tensor(a.student_topk_lp), torch.tensor(b.student_topk_lp), atol=1e-5)
        assert torch.allclose(torch.tensor(a.teacher_lp_on_student_topk),
                              torch.tensor(b.teacher_lp_on_student_topk), atol=1e-5)
        assert not any(v != v for v in a.student_lp)  # no NaN placeholder survives
    for a, b in zip(m_on, m_off, strict=True):
        for key in ("loss/total", "signal/teacher_kl", "signal/topk_overlap", "optim/grad_norm"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert w_on.keys() == w_off.keys()
    for name in w_on:
        assert torch.allclose(w_on[name], w_off[name], atol=1e-6), name
    init = _run(tmp_path, "none", [*extra, "optim.lr=0"])[0]
    moved = any(not torch.equal(init[n], w_on[n]) for n in w_on)
    assert moved, "the fused step trained nothing"
    assert [m["score/student_from_train"] for m in m_on + m_off] == [1.0, 1.0, 0.0, 0.0]


def test_auto_takes_effect_only_where_possible(tmp_path):
    from opdcli.methods import build_method
    from opdcli.stages import student_from_train

    def cfg_of(*overrides):
        return C.load_config(C.TrainRunConfig, None, list(overrides))[0]

    rkl = cfg_of("loss.objective=rkl")
    assert student_from_train(rkl, build_method("opd", {}, rkl.loss))
    assert not student_from_train(cfg_of("loss.objective=rkl", "scoring.student_scores=scoring_forward"),
                                  build_method("opd", {}, rkl.loss))
    assert not student_from_train(rkl, build_method("prune", {}, rkl.loss))
    topk = cfg_of("loss.objective=topk")
    assert not student_from_train(topk, build_method("opd", {}, topk.loss))


@pytest.mark.parametrize("extra, reason", [
    (["method.name=prune"], "method prune reads the student's scores"),
    (["loss.objective=topk"], "loss.objective=topk reads"),
    (["method.name=release", "method.options.k=8"], "method release reads"),
])
def test_on_where_it_cannot_act_is_refused_before_models_load(tmp_path, extra, reason):
    from opdcli.loops.train import run_train

    cfg, explicit = C.load_config(C.TrainRunConfig, None, [
        f"run.out_dir={tmp_path}", "model.student=/nonexistent/student", "scoring.student_scores=train_forward", *extra])
    with pytest.raises(ConfigError, match=reason) as err:
        run_train(cfg, explicit, argv=["test"])
    assert "student_scores=auto or scoring_forward" in str(err.value)
