"""Every registered method runs two real training steps on the toy models through run_train,
writes its namespaced metrics and its per-token / per-trajectory outputs to rollouts.jsonl."""

from __future__ import annotations

import pytest

from opdcli import config as C
from opdcli.methods import METHODS
from opdcli.records import read_records
from opdcli.run.tracking import read_metrics

CASES = {
    "opd": ([], None),
    "prune": (["method.options.budget=true", "method.options.min_len=8"], "method/prune/next_budget"),
    "release": (["method.options.k=8"], "method/release/accept_rate"),
    "gopd": (["loss.objective=sampled"], "method/gopd/kl_to_ref"),
    "exopd": (["loss.objective=sampled"], "method/exopd/kl_to_ref"),
    "topd": (["loss.objective=sampled"], "method/topd/high_loss_frac"),
    "prefix": (["method.options.length=6"], "method/prefix/length"),
    "fopd": ([], "method/fopd/freshness_mean"),
}


def test_every_registered_method_has_an_integration_case():
    assert set(CASES) == set(METHODS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_method_trains_two_steps(name, tmp_path):
    from opdcli.loops.train import run_train

    extra, key = CASES[name]
    overrides = [f"run.out_dir={tmp_path}", "train.max_steps=2", "rollout.prompts_per_step=4",
                 "rollout.samples_per_prompt=2", "eval.enabled=false", f"method.name={name}",
                 "train.rollouts_every=1", *extra]
    if "loss.objective=sampled" in extra:
        overrides.remove("loss.objective=sampled")
        cfg, explicit = C.load_config(C.TrainRunConfig, None, overrides + ["loss.objective=sampled",
                                      "optim.lr=1e-3", "rollout.max_new_tokens=48"])
    else:
        cfg, explicit = C.load_config(C.TrainRunConfig, "configs/toy/opd.yaml", overrides)
    run_train(cfg, explicit, argv=["test"])
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss/total" in r]
    assert len(rows) == 2
    if key is not None:
        assert key in rows[-1], sorted(rows[-1])
    records = list(read_records(tmp_path / "rollouts.jsonl"))
    assert len(records) == 16 and all(r.method["name"] == name for r in records)
    if name == "prefix":
        assert max(len(r.response_ids) for r in records) <= 6
    if name == "release":
        assert {"release_segment", "bic_improvement", "accepted", "cut_token"} <= set(records[0].method["trajectory"])
    if name == "prune":
        assert {"overlap", "drift", "reliability"} <= set(records[0].method["token"])


@pytest.mark.parametrize("name", ["prune", "release", "topd"])
def test_method_topk_beyond_scoring_is_refused_before_models_load(name, tmp_path):
    from opdcli.errors import ConfigError
    from opdcli.loops.train import run_train

    overrides = [f"run.out_dir={tmp_path}", f"method.name={name}", "method.options.k=32", "scoring.top_k=16",
                 "model.student=/nonexistent/model"]  # a model load would fail with another message
    if name == "topd":
        overrides.append("loss.objective=sampled")
    cfg, explicit = C.load_config(C.TrainRunConfig, None, overrides)
    with pytest.raises(ConfigError, match="method.options.k is 32 but only 16"):
        run_train(cfg, explicit, argv=["test"])
    assert not (tmp_path / "metrics.jsonl").exists()
