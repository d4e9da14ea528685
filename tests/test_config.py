"""Strict config loading: every shipped YAML loads, typos are refused with a suggestion,
flags that cannot take effect raise, and every config field is read somewhere."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from opdcli import config as C
from opdcli.errors import ConfigError
from opdcli.validate import validate_train_config

ROOT = Path(__file__).resolve().parents[1]


def _kind(path: Path):
    return C.DistillRunConfig if "distill" in path.name else C.TrainRunConfig


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    if "methods" in C.read_yaml(path):  # a sweep file: every run it plans must validate
        from opdcli.loops.sweep import load_sweep, run_overrides
        from opdcli.methods import build_method

        sweep = load_sweep(path)
        for method in sweep.methods:
            cfg, explicit = C.load_config(C.TrainRunConfig, sweep.base, run_overrides(sweep, method, 0))
            validate_train_config(cfg, explicit)
            build_method(cfg.method.name, cfg.method.options, cfg.loss)
        return
    cls = _kind(path)
    cfg, explicit = C.load_config(cls, path)
    if cls is C.TrainRunConfig:
        from opdcli.methods import build_method

        validate_train_config(cfg, explicit)
        build_method(cfg.method.name, cfg.method.options, cfg.loss)


def test_unknown_key_suggests_closest(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'\. Did you mean 'lr'\?"):
        C.load_config(C.TrainRunConfig, f)
    with pytest.raises(ConfigError, match="Did you mean 'rollout'"):
        C.load_config(C.TrainRunConfig, None, ["rolout.temperature=0.5"])


def test_types_are_checked_and_coerced():
    cfg, explicit = C.load_config(C.TrainRunConfig, None, ["optim.lr=1e-4", "train.max_steps=3",
                                                          "optim.betas=[0.8, 0.9]", "run.resume=null"])
    assert cfg.optim.lr == 1e-4 and cfg.train.max_steps == 3 and cfg.optim.betas == (0.8, 0.9)
    assert {"optim.lr", "train.max_steps", "optim", "train"} <= explicit
    with pytest.raises(ConfigError, match="'train.max_steps' must be an integer"):
        C.load_config(C.TrainRunConfig, None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"'loss.objective' is 'rk'.*Did you mean 'rkl'"):
        C.load_config(C.TrainRunConfig, None, ["loss.objective=rk"])
    with pytest.raises(ConfigError, match="true or false"):
        C.load_config(C.TrainRunConfig, None, ["train.tensorboard=maybe"])
    with pytest.raises(ConfigError, match="key=value"):
        C.load_config(C.TrainRunConfig, None, ["optim.lr"])


def test_malformed_yaml_names_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        C.load_config(C.TrainRunConfig, f)
    g = tmp_path / "list.yaml"
    g.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        C.load_config(C.TrainRunConfig, g)
    with pytest.raises(ConfigError, match="does not exist"):
        C.load_config(C.TrainRunConfig, tmp_path / "missing.yaml")


def test_configs_are_frozen():
    cfg, _ = C.load_config(C.TrainRunConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss.objective=rkl", "loss.surrogate=ppo"], "loss.surrogate cannot take effect"),
    (["loss.objective=sampled", "loss.support=student_topk"], "loss.support cannot take effect"),
    (["loss.objective=rkl", "loss.support_k=8"], "loss.support_k cannot take effect"),
    (["loss.objective=fkl", "loss.beta=0.3"], "loss.beta cannot take effect"),
    (["loss.objective=sampled", "loss.clip_low=0.1"], "loss.clip_low cannot take effect"),
    (["loss.objective=sampled", "loss.dual_clip=2"], "loss.dual_clip cannot take effect"),
    (["loss.objective=sampled", "loss.surrogate=ppo", "loss.dual_clip=1"], "loss.dual_clip is 1.0; it must be > 1"),
    (["loss.objective=rkl", "loss.dual_clip=2"], "loss.dual_clip cannot take effect"),
    (["loss.objective=topk", "loss.kl_coef=2"], "loss.kl_coef cannot take effect"),
    (["data.source=x.jsonl", "data.toy.n_ops=3"], "data.toy.n_ops cannot take effect"),
    (["scoring.top_k=65"], "must be in 1..64"),
    (["train.rollouts_topk=32"], "exceeds scoring.top_k"),
    (["optim.grad_accum=1000"], "exceeds the sequences per step"),
])
def test_flags_that_cannot_take_effect_raise(overrides, message):
    cfg, explicit = C.load_config(C.TrainRunConfig, None, overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_train_config(cfg, explicit)


def test_method_options_are_validated_against_the_method():
    from opdcli.errors import MethodNotFoundError
    from opdcli.methods import build_method

    with pytest.raises(ConfigError, match="unknown config key 'method.options.theta'"):
        build_method("opd", {"theta": 0.7}, C.LossConfig())
    with pytest.raises(MethodNotFoundError, match="unknown method 'opdd'. Did you mean 'opd'"):
        build_method("opdd", {}, C.LossConfig())


def _fields(cls, out):
    for f in dataclasses.fields(cls):
        out.add(f.name)
        tp = f.type if not isinstance(f.type, str) else None
        if tp is not None and dataclasses.is_dataclass(tp):
            _fields(tp, out)
    return out


def test_every_config_field_is_read_somewhere():
    """Catch the silently unread flag: each field name must be read as `.name` outside config.py."""
    source = "\n".join(p.read_text() for p in (ROOT / "opdcli").rglob("*.py") if p.name != "config.py")
    names: set[str] = set()
    for cls in (C.TrainRunConfig, C.DistillRunConfig, *[getattr(C, n) for n in dir(C) if n.endswith(("Config", "Spec"))]):
        if dataclasses.is_dataclass(cls):
            _fields(cls, names)
    unread = sorted(n for n in names if not re.search(rf"\.{n}\b", source))
    assert unread == [], f"config fields never read: {unread}"


def test_resolved_config_round_trips(tmp_path):
    cfg, _ = C.load_config(C.TrainRunConfig, None, ["optim.lr=0.5", "method.options={}"])
    C.dump_config(cfg, tmp_path / "config.yaml")
    again, _ = C.load_config(C.TrainRunConfig, tmp_path / "config.yaml")
    assert again == cfg
