"""`opd doctor` and the preflight of `opd train` / `opd rollout`: pairs that make OPD wrong are
refused with the fix, the rest warned about; each check is shown to fire on a pair built to
trip it, and to stay quiet on the toy pair."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from opdcli import config as C
from opdcli.cli import app
from opdcli.doctor import diagnose, preflight
from opdcli.engines.hf_sampler import HFSampler
from opdcli.engines.types import SamplingParams
from opdcli.errors import ConfigError
from opdcli.models import load_pair, load_tokenizer, resolve_model_path


def _copy(src: str, dst: Path, *, tokenizer=None, generation: dict | None = None) -> str:
    shutil.copytree(resolve_model_path(src), dst)
    tok = load_tokenizer(src)
    if tokenizer is not None:
        tokenizer(tok)
    tok.save_pretrained(dst)
    if generation is not None:
        path = dst / "generation_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **generation}))
    return str(dst)


def _cfg(student: str = "toy:student", teacher: str = "toy:teacher", *extra: str):
    cfg, _ = C.load_config(C.TrainRunConfig, None, [f"model.student={student}", f"model.teacher={teacher}", *extra])
    return cfg


def _levels(findings, check: str) -> list[str]:
    return [f.level for f in findings if f.check == check]


def test_the_toy_pair_passes_every_check():
    findings = diagnose(_cfg())
    assert {f.level for f in findings} == {"ok"}, [f.line() for f in findings if f.level != "ok"]
    assert {f.check for f in findings} >= {"tokenizer", "vocabulary width", "chat template", "end of answer",
                                           "dtype", "context"}
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0 and "no errors, 0 warning(s)" in result.output, result.output


def test_a_base_student_that_does_not_stop_where_the_teacher_ends_is_refused_with_the_fix(tmp_path):
    def base(tok):  # stands in for Qwen3-*-Base: its EOS is <|endoftext|>, not <|im_end|>
        tok.eos_token = "<unk>"

    student = _copy("toy:student", tmp_path / "base", tokenizer=base, generation={"eos_token_id": 1})
    findings = diagnose(_cfg(student))
    err = [f for f in findings if f.level == "error"]
    assert len(err) == 1 and err[0].check == "end of answer"
    assert err[0].fix == "--set rollout.stop_tokens=[<|im_end|>]"
    assert "warning" in _levels(findings, "end of answer")  # and it stops at a token the teacher never ends on
    with pytest.raises(ConfigError, match=r"rollout.stop_tokens=\[<\|im_end\|>\]; `opd doctor` shows every check"):
        preflight(_cfg(student))
    fixed = diagnose(_cfg(student, "toy:teacher", "rollout.stop_tokens=[<|im_end|>]"))
    assert "error" not in {f.level for f in fixed}
    # through the command line: exit 2, one line, nothing trained
    result = CliRunner().invoke(app, ["train", "--set", f"model.student={student}", "--set",
                                      f"run.out_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "rollout.stop_tokens" in lines[0], result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_stop_tokens_end_samples_in_the_sampler():
    pair = load_pair("toy:student", "toy:teacher", "cpu", "float32")
    texts = ["<|im_start|>user\nCompute 12+7*3.<|im_end|>\n<|im_start|>assistant\n"]
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=40)
    plain = HFSampler(pair.student, pair.tokenizer, generator=torch.Generator().manual_seed(0)).sample(texts, params)
    space = pair.tokenizer.convert_tokens_to_ids(" ")
    assert bool((plain.response_ids_B_T == space).any()), "the probe token must occur in plain samples"
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=40, stop_tokens=(" ",))
    cut = HFSampler(pair.student, pair.tokenizer, generator=torch.Generator().manual_seed(0)).sample(texts, params)
    for b in range(8):
        n = int(cut.response_mask_B_T[b].sum())
        row = cut.response_ids_B_T[b, :n].tolist()
        assert space not in row[:-1]
        assert bool(cut.finished_B[b]) == (row[-1] in (space, pair.tokenizer.eos_token_id))
    with pytest.raises(ConfigError, match="'<nope>' is not a token"):
        HFSampler(pair.student, pair.tokenizer).sample(texts, SamplingParams(stop_tokens=("<nope>",)))


def test_a_teacher_that_splits_text_differently_is_refused(tmp_path):
    from tokenizers import normalizers

    def lowercase(tok):
        tok.backend_tokenizer.normalizer = normalizers.Lowercase()

    teacher = _copy("toy:teacher", tmp_path / "lower", tokenizer=lowercase)
    findings = diagnose(_cfg("toy:student", teacher))
    assert _levels(findings, "tokenizer") == ["error"]
    assert "splits a rendered prompt differently" in findings[-1].detail


def test_template_differences_are_shown_as_a_diff(tmp_path):
    def system(tok):
        tok.chat_template = "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}" + tok.chat_template

    teacher = _copy("toy:teacher", tmp_path / "sys", tokenizer=system)
    findings = diagnose(_cfg("toy:student", teacher))
    (f,) = [f for f in findings if f.check == "chat template"]
    assert f.level == "warning" and "+<|im_start|>system" in f.detail and "data.system_prompt" in f.fix
    with pytest.warns(UserWarning, match="chat template"):
        preflight(_cfg("toy:student", teacher))

    def base(tok):
        tok.chat_template = None

    no_template = _copy("toy:teacher", tmp_path / "base", tokenizer=base)
    (Path(no_template) / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = Path(no_template) / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps({k: v for k, v in json.loads(tok_cfg.read_text()).items() if k != "chat_template"}))
    (g,) = [f for f in diagnose(_cfg("toy:student", no_template)) if f.check == "chat template"]
    assert g.level == "warning" and "no chat template" in g.detail


def test_generation_defaults_the_run_overrides_are_named(tmp_path):
    student = _copy("toy:student", tmp_path / "s", generation={"temperature": 0.6, "top_p": 0.95, "top_k": 20})
    (f,) = [f for f in diagnose(_cfg(student)) if f.check == "generation_config"]
    assert f.level == "warning"
    assert "temperature=0.6" in f.detail and "rollout.temperature=1.0" in f.detail and "top_k=20" in f.detail
    quiet = diagnose(_cfg(student, "toy:teacher", "rollout.temperature=0.6", "rollout.top_p=0.95", "rollout.top_k=20"))
    assert not [f for f in quiet if f.check == "generation_config"]


def test_context_dtype_and_widths():
    long = diagnose(_cfg("toy:student", "toy:teacher", "rollout.max_new_tokens=1000"))
    ctx = [f for f in long if f.check == "context"]
    assert [f.level for f in ctx] == ["error"]
    assert all("context of 1024 positions" in f.detail and "rollout.max_new_tokens" in f.fix for f in ctx)
    half = diagnose(_cfg("toy:student", "toy:teacher", "run.device=cpu", "run.dtype=float16"))
    assert _levels(half, "dtype") == ["warning"]
    bf16 = [f for f in diagnose(_cfg("toy:student", "toy:teacher", "run.dtype=bfloat16")) if f.check == "dtype"]
    assert [f.level for f in bf16] == ["ok"] and "mixed precision" in bf16[0].detail
    pure = [f for f in diagnose(_cfg("toy:student", "toy:teacher", "run.dtype=bfloat16", "run.master_weights=false"))
            if f.check == "dtype"]
    assert [f.level for f in pure] == ["warning"] and "run.master_weights=true" in pure[0].fix


def test_a_padded_teacher_is_fine_and_said_so(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy:teacher"))
    model.resize_token_embeddings(128, mean_resizing=False)
    model.save_pretrained(tmp_path / "t")
    load_tokenizer("toy:teacher").save_pretrained(tmp_path / "t")
    (f,) = [f for f in diagnose(_cfg("toy:student", str(tmp_path / "t"))) if f.check == "vocabulary width"]
    assert f.level == "ok" and "teacher 128" in f.detail and "tokenizer's ids only" in f.detail


def test_doctor_exits_2_on_an_error(tmp_path):
    result = CliRunner().invoke(app, ["doctor", "--set", "rollout.max_new_tokens=1000"])
    assert result.exit_code == 2
    assert "error: 1 check(s) found what makes OPD wrong" in result.output and "Traceback" not in result.output
