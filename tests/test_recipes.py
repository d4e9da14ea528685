"""configs/qwen3/: every recipe passes the config-time validation of `opd train` as written, and
runs two steps with its method, objective, options and stop tokens unchanged on the toy pair
(only the models, data, engine and sizes shrunk), moving the student."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opdcli import config as C
from opdcli.engines.vllm_scorer import check_teacher_engine
from opdcli.methods import build_method
from opdcli.models import resolve_model_path
from opdcli.stages import student_from_train
from opdcli.validate import method_objective, validate_train_config

RECIPES = sorted((Path(__file__).parents[1] / "configs" / "qwen3").glob("*.yaml"))


def test_there_are_recipes_for_the_pairs_and_methods_asked_for():
    names = {p.stem for p in RECIPES}
    assert {"qwen3-8b-to-1.7b-base-opd", "qwen3-8b-to-1.7b-base-prune", "qwen3-8b-to-1.7b-base-release",
            "qwen3-8b-to-1.7b-base-exopd", "qwen3-4b-to-0.6b-opd"} <= names
    readme = (RECIPES[0].parent / "README.md").read_text()
    assert all(p.name in readme for p in RECIPES), "configs/qwen3/README.md plans every recipe"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates_as_written(path):
    cfg, explicit = C.load_config(C.TrainRunConfig, path, [])
    resolved, note = method_objective(cfg, explicit)
    assert note is None and resolved == cfg, "the recipe states the objective its method needs"
    validate_train_config(cfg, explicit)
    method = build_method(cfg.method.name, cfg.method.options, cfg.loss)
    method.check_scoring(cfg.scoring.top_k)
    check_teacher_engine(cfg, method)
    student_from_train(cfg, method)
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0, "the papers sample the student itself"
    base = cfg.model.student.endswith("-Base")
    assert ("<|im_end|>" in cfg.rollout.stop_tokens) == base, "a Base student must stop where the teacher ends"
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
    if cfg.vllm.max_model_len is not None:
        assert cfg.vllm.max_model_len >= cfg.rollout.max_new_tokens + 2048


def _on_the_toy_pair(path: Path, out: Path) -> Path:
    tree = yaml.safe_load(path.read_text())
    tree["run"] = {**tree["run"], "out_dir": str(out), "device": "cpu", "dtype": "float32"}
    tree["model"] = {"student": "toy:student", "teacher": "toy:teacher"}
    tree["data"] = {"source": "toy"}
    tree["rollout"] = {**tree["rollout"], "engine": "hf", "prompts_per_step": 4, "samples_per_prompt": 2,
                       "max_new_tokens": 24}  # stop_tokens stay: <|im_end|> is a toy token too
    tree.pop("vllm", None)
    tree.pop("dist", None)
    tree["scoring"] = {**tree["scoring"], "batch_size": 8}
    tree["optim"] = {**tree["optim"], "lr": 1e-3, "grad_accum": 2}
    tree["train"] = {**tree["train"], "max_steps": 2, "save_every": 0, "rollouts_every": 1}
    options = tree["method"].get("options", {})
    if "init_len" in options:  # the budget's window, scaled to 24 tokens
        tree["method"]["options"] = {**options, "init_len": 16, "min_len": 8, "max_len": 24, "step": 4,
                                     "margin": 2}
    small = out.parent / f"{path.stem}.yaml"
    small.write_text(yaml.safe_dump(tree))
    return small


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_on_the_toy_pair(tmp_path, path):
    from opdcli.loops.train import run_train

    out = tmp_path / "run"
    cfg, explicit = C.load_config(C.TrainRunConfig, _on_the_toy_pair(path, out), [])
    result = run_train(cfg, explicit, argv=["test"])
    assert result.steps == 2
    after = load_file(str(next((out / "checkpoints").glob("step_*")) / "model.safetensors"))
    before = load_file(str(Path(resolve_model_path("toy:student")) / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student did not move"
    # the README's `opd eval --model <run>/checkpoints/latest` resolves the pointer to the step
    assert Path(resolve_model_path(str(out / "checkpoints" / "latest"))).name == "step_2"
