"""LoRA students (model.lora): only the adapters train, the checkpoint holds a PEFT adapter (and
the merged model on request) that loads back to the same function, a resume continues the
adapter, and on the toy pair LoRA moves the student towards the teacher as full fine-tuning does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdcli import config as C
from opdcli.errors import ConfigError
from opdcli.models import load_model, resolve_model_path
from opdcli.run.tracking import read_metrics

pytest.importorskip("peft")

TOY_CONFIG = Path(__file__).parents[1] / "configs" / "toy" / "opd.yaml"
BASE = ["eval.every=0", "train.rollouts_every=0"]
LORA = ["model.lora.r=8", "model.lora.alpha=16"]


def _train(out: Path, *extra: str):
    from opdcli.loops.train import run_train

    cfg, explicit = C.load_config(C.TrainRunConfig, TOY_CONFIG, [f"run.out_dir={out}", *BASE, *extra])
    result = run_train(cfg, explicit, argv=["test"])
    return result, [r for r in read_metrics(out / "metrics.jsonl") if "loss/total" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    result, rows = _train(root / "lora", *LORA, "model.lora.merge=true", "optim.lr=5e-3", "train.max_steps=100",
                          "train.save_every=50")
    return root, result, rows


def test_lora_improves_the_student_by_the_bar_full_fine_tuning_is_held_to(runs):
    """tests/test_train_e2e.py asks full fine-tuning for +4 points after 100 steps of the toy
    config (it reaches 15.6%); LoRA r 8 at lr 5e-3 is held to the same bar (it reaches 14.1%;
    lr 1.5e-2 diverges, to 6.6%)."""
    _, result, rows = runs
    before, after = result.before["eval/heldout/accuracy"], result.after["eval/heldout/accuracy"]
    assert after >= before + 0.04, (before, after)
    assert len(rows) == 100


def test_only_the_adapters_train_and_the_checkpoint_is_a_peft_adapter(runs):
    root, _, _ = runs
    ckpt = root / "lora" / "checkpoints" / "step_100"
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert all(k.startswith("base_model.model.model.layers.") for k in adapter)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == resolve_model_path("toy:student")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if ".lora_B." in k), "B moved from zero"
    # the merged model differs from the base only in the adapted projections
    merged = load_file(str(ckpt / "merged" / "model.safetensors"))
    base = load_file(str(Path(resolve_model_path("toy:student")) / "model.safetensors"))
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("proj.weight",)) for k in changed)


def test_adapter_and_merged_folders_load_to_the_same_function(runs):
    root, _, _ = runs
    ckpt = root / "lora" / "checkpoints" / "step_100"
    ids = torch.randint(4, 100, (2, 16))
    merged = load_model(str(ckpt / "merged"), torch.device("cpu"), torch.float32)  # a plain model folder
    via_peft = load_model(str(ckpt), torch.device("cpu"), torch.float32)  # the adapter on its base, by PEFT
    base = load_model("toy:student", torch.device("cpu"), torch.float32)
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (merged, via_peft, base))
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3), "the adapter changes the function"


def test_a_lora_run_resumes_its_adapter(runs, tmp_path):
    root, _, rows = runs
    out = root / "lora"
    _, again = _train(tmp_path / "again", *LORA, "model.lora.merge=true", "optim.lr=5e-3", "train.max_steps=52",
                      f"run.resume={out / 'checkpoints' / 'step_50'}", "eval.enabled=false")
    assert [r["progress/step"] for r in again] == [51, 52]
    # the adapter, optimizer and sampler state come back: the same step 51 as the first run's
    assert again[0]["loss/total"] == pytest.approx(rows[50]["loss/total"], rel=1e-4)


def test_lora_settings_that_cannot_take_effect_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.lora.alpha cannot take effect"):
        _train(tmp_path / "a", "model.lora.alpha=32", "train.max_steps=1")
    with pytest.raises(ConfigError, match="use rollout.engine=hf"):
        _train(tmp_path / "b", *LORA, "rollout.engine=vllm", "train.max_steps=1")
