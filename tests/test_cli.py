"""The command line: a real 2-step run through the console entry point, and clean errors.

Every user error must exit with code 2, print one line naming the problem and the fix, and
never show a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from opdcli.cli import app
from opdcli.models import TOY_WEIGHTS

SMALL = ["--set", "rollout.prompts_per_step=4", "--set", "rollout.samples_per_prompt=2",
         "--set", "eval.size=16", "--set", "train.rollouts_every=1"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_two_step_train_run_changes_the_student(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "opdcli.cli", "train", "--config", "configs/toy/opd.yaml",
           "--set", f"run.out_dir={out}", "--set", "train.max_steps=2", "--set", "optim.warmup_steps=0",
           *SMALL]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out accuracy before" in proc.stderr and "held-out accuracy after" in proc.stderr
    # metrics.jsonl: one row per step with the namespaced keys
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    assert [r["progress/step"] for r in steps] == [1, 2]
    for key in ("loss/rkl", "optim/lr", "optim/grad_norm", "signal/teacher_kl", "time/sample",
                "time/score", "time/train", "rollout/response_len"):
        assert key in steps[0], key
    assert any("eval_before/heldout/accuracy" in r for r in rows)
    # rollouts.jsonl: valid records, 8 per step
    from opdcli.records import read_records

    records = list(read_records(out / "rollouts.jsonl"))
    assert len(records) == 16 and {r.step for r in records} == {0, 1}
    # the checkpoint loads with from_pretrained and differs from the starting student
    from transformers import AutoModelForCausalLM

    ckpt = out / "checkpoints" / "step_2"
    AutoModelForCausalLM.from_pretrained(ckpt)
    before, after = _weights(TOY_WEIGHTS / "student"), _weights(ckpt)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2, f"only {len(changed)} of {len(before)} tensors changed"
    assert (out / "config.yaml").is_file() and (out / "command.txt").is_file()


runner = CliRunner()


def _invoke(args: list[str]):
    result = runner.invoke(app, args)
    text = result.output  # click mixes stderr into output
    return result, text


def _expect_user_error(args: list[str], needle: str) -> str:
    result, text = _invoke(args)
    assert result.exit_code == 2, (result.exit_code, text, result.exception)
    assert "Traceback" not in text
    assert needle in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


def test_missing_model_path(tmp_path):
    line = _expect_user_error(["train", "--set", "model.student=/no/such/model", "--set",
                               f"run.out_dir={tmp_path}"], "does not exist")
    assert "/no/such/model" in line


def test_unknown_method():
    _expect_user_error(["train", "--method", "prunee"], "unknown method 'prunee'")


def test_unknown_config_key():
    line = _expect_user_error(["train", "--set", "optim.lrr=0.1"], "unknown config key 'optim.lrr'")
    assert "Did you mean 'lr'" in line


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 0.1\n")
    _expect_user_error(["train", "--config", str(bad)], "not valid YAML")


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _expect_user_error(["train", "--set", f"data.source={empty}"], "dataset is empty")


def test_teacher_with_a_different_vocabulary(tmp_path, toy_tokenizer):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from opdcli.loops.toy_build import init_model

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<|im_end|>", *"abcdefgh0123456789"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    other = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>")
    model = init_model(other, 32, 1, 0)
    model.save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    _expect_user_error(["train", "--set", f"model.teacher={tmp_path / 'other'}", "--set",
                        f"run.out_dir={tmp_path / 'run'}"], "different vocabularies")


def test_model_folder_without_config(tmp_path):
    (tmp_path / "empty_model").mkdir()
    _expect_user_error(["train", "--set", f"model.teacher={tmp_path / 'empty_model'}"], "has no config.json")


def test_existing_run_is_not_overwritten(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"progress/step": 1}\n')
    _expect_user_error(["train", "--set", f"run.out_dir={tmp_path}", *SMALL], "already holds a run")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"progress/step": 1}\n'


def test_resume_from_empty_directory(tmp_path):
    _expect_user_error(["train", "--set", f"run.resume={tmp_path}"], "holds no checkpoint")


def test_flag_that_cannot_take_effect():
    _expect_user_error(["train", "--set", "loss.surrogate=ppo"], "cannot take effect")


def test_list_methods():
    result, text = _invoke(["train", "--list-methods"])
    assert result.exit_code == 0 and "opd" in text


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["distill", "--help"], ["toy", "build", "--help"]])
def test_help_everywhere(args):
    result, _ = _invoke(args)
    assert result.exit_code == 0


def test_distill_gold_runs_with_the_shipped_config(tmp_path):
    """The shipped distill.yaml sets rollout.samples_per_prompt: 1 (its default); gold traces
    sample nothing, but a key at its default is no flag that fails to take effect."""
    result, text = _invoke(["distill", "--set", "distill.traces=gold", "--set", "train.max_steps=1",
                            "--set", "eval.enabled=false", "--set", "rollout.prompts_per_step=4",
                            "--set", f"run.out_dir={tmp_path / 'gold'}"])
    assert result.exit_code == 0, text[-2000:]
    assert (tmp_path / "gold" / "checkpoints" / "step_1" / "model.safetensors").is_file()
    line = _expect_user_error(["distill", "--set", "distill.traces=gold", "--set", "rollout.samples_per_prompt=4",
                               "--set", f"run.out_dir={tmp_path / 'gold2'}"], "samples nothing")
    assert "rollout.samples_per_prompt" in line


@pytest.mark.parametrize("name", ["opd", "prune", "release", "gopd", "exopd", "topd", "prefix", "fopd"])
def test_every_method_runs_as_opd_train_method_name_on_the_toy_defaults(name, tmp_path):
    from opdcli.methods import METHODS

    assert name in METHODS
    result, text = _invoke(["train", "--method", name, "--set", "train.max_steps=1", "--set", "eval.enabled=false",
                            "--set", "rollout.prompts_per_step=2", "--set", f"run.out_dir={tmp_path / name}"])
    assert result.exit_code == 0, text[-2000:]
    if METHODS[name].default_objective:
        assert f"uses loss.objective={METHODS[name].default_objective}" in text
        assert f"objective: {METHODS[name].default_objective}" in (tmp_path / name / "config.yaml").read_text()


def test_a_methods_incompatible_objective_chosen_by_the_user_names_the_fix(tmp_path):
    line = _expect_user_error(["train", "--method", "exopd", "--set", "loss.objective=rkl", "--set",
                               f"run.out_dir={tmp_path}"], "cannot be combined with loss.objective=rkl")
    assert "--set loss.objective=sampled" in line
