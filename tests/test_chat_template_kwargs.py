"""data.chat_template_kwargs: Qwen3's enable_thinking (or any template variable) reaches the
prompts of training, rollouts and held-out evaluation, is recorded in the run, and a key the
template never reads is refused instead of silently changing nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from opdcli.cli import app
from opdcli.config import DataConfig
from opdcli.data import PromptSource, heldout_prompts, render
from opdcli.errors import ConfigError
from opdcli.models import load_tokenizer, resolve_model_path

# the generation-prompt part of Qwen3's template: thinking off pre-fills an empty think block
THINKING_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}")
EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def thinking_pair(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("thinking")
    out = {}
    for name in ("student", "teacher"):
        dst = root / name
        shutil.copytree(resolve_model_path(f"toy:{name}"), dst)
        tok = load_tokenizer(f"toy:{name}")
        tok.chat_template = THINKING_TEMPLATE
        tok.save_pretrained(dst)
        out[name] = dst
    return out


def test_render_passes_the_template_variables(thinking_pair):
    tok = load_tokenizer(str(thinking_pair["student"]))
    on = PromptSource(DataConfig(), 0).next_batch(2)
    off = PromptSource(DataConfig(chat_template_kwargs={"enable_thinking": False}), 0).next_batch(2)
    assert [p.messages for p in on] == [p.messages for p in off]
    assert all(not render(tok, p).endswith(EMPTY_THINK) for p in on)
    assert all(render(tok, p).endswith("<|im_start|>assistant\n" + EMPTY_THINK) for p in off)
    held = heldout_prompts(DataConfig(chat_template_kwargs={"enable_thinking": False}), 3)
    assert all(render(tok, p).endswith(EMPTY_THINK) for p in held)


def test_a_variable_the_template_never_reads_is_refused():
    tok = load_tokenizer("toy:student")  # the toy template has no enable_thinking
    prompt = PromptSource(DataConfig(chat_template_kwargs={"enable_thinking": False}), 0).next_batch(1)[0]
    with pytest.raises(ConfigError, match="data.chat_template_kwargs.enable_thinking cannot take effect"):
        render(tok, prompt)


def test_train_with_thinking_off_samples_after_the_empty_think_block(tmp_path, thinking_pair):
    out = tmp_path / "run"
    args = ["train", "--set", f"model.student={thinking_pair['student']}", "--set",
            f"model.teacher={thinking_pair['teacher']}", "--set", "data.chat_template_kwargs.enable_thinking=false",
            "--set", "train.max_steps=2", "--set", "rollout.prompts_per_step=2", "--set",
            "rollout.samples_per_prompt=2", "--set", "eval.size=4", "--set", "train.rollouts_every=1",
            "--set", "rollout.max_new_tokens=16", "--set", f"run.out_dir={out}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["chat_template_kwargs"] == {"enable_thinking": False}
    records = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert records and all(r["prompt"].endswith(EMPTY_THINK) for r in records)


def test_train_refuses_it_on_a_template_without_the_variable(tmp_path):
    result = CliRunner().invoke(app, ["train", "--set", "data.chat_template_kwargs.enable_thinking=false",
                                      "--set", f"run.out_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "never reads 'enable_thinking'" in errors[0], result.output
