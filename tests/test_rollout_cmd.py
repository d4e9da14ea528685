"""`opd rollout`: sample and score with the toy models, write valid records, then diagnose them."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from opdcli.cli import TOY_CONFIGS, app
from opdcli.config import TrainRunConfig, load_config
from opdcli.errors import ConfigError
from opdcli.loops.rollout import _prompts, apply_flags, check_rollout_config, set_keys
from opdcli.records import read_records

runner = CliRunner()


def test_rollout_writes_valid_records_and_diagnose_reads_them(tmp_path):
    out = tmp_path / "rollouts.jsonl"
    result = runner.invoke(app, ["rollout", "--out", str(out), "--n", "2", "--top-k", "8",
                                 "--max-new-tokens", "12", "--set", "data.max_prompts=4"])
    assert result.exit_code == 0, result.output
    assert "wrote 8 records" in result.output
    records = list(read_records(out))
    assert len(records) == 8 and len({r.sample_id for r in records}) == 8
    assert len({r.prompt_id for r in records}) == 4
    for rec in records:
        assert rec.topk == 8 and rec.step == 0 and rec.policy_version == 0
        assert len(rec.student_topk_ids) == len(rec.response_ids) > 0
        assert all(len(row) == 8 for row in rec.teacher_lp_on_student_topk)
        assert rec.method["name"] == "opd" and rec.method["token"]["weight"] == [1.0] * len(rec.mask)
    diag = runner.invoke(app, ["diagnose", str(out), "--out", str(tmp_path / "d"), "--format", "json"])
    assert diag.exit_code == 0, diag.output
    summary = json.loads(diag.stdout)
    assert summary["records"] == 8 and summary["topk"] == {"8": 8}
    assert summary["analyses"]["prune"]["status"] == "ok"


@pytest.mark.parametrize(("args", "needle"), [
    (["--set", "optim.lr=1e-3"], "optim.lr has no effect in opd rollout"),
    (["--set", "train.max_steps=3"], "train.max_steps has no effect"),
    (["--top-k", "65"], "it must be in 1..64"),
    (["--n", "0"], "rollout.samples_per_prompt is 0"),
    (["--prompts", "missing.jsonl"], "is not a file"),
    (["--set", "model.studnt=x"], "Did you mean 'student'"),
    (["--set", "data.toy.n_ops=0"], "data.toy.n_ops is 0"),
])
def test_rollout_refuses_bad_options(tmp_path, args, needle):
    result = runner.invoke(app, ["rollout", "--out", str(tmp_path / "r.jsonl"), *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.output
    assert "Traceback" not in result.output


def test_rollout_refuses_to_append_to_an_existing_file(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text("{}\n")
    result = runner.invoke(app, ["rollout", "--out", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_flags_reach_the_config_and_long_horizon_knob_passes_through():
    cfg, _ = load_config(TrainRunConfig, TOY_CONFIGS / "opd.yaml", ["data.toy.n_ops=8", "data.max_prompts=3"])
    cfg = apply_flags(cfg, student="toy:teacher", teacher="toy:student", n=3, max_new_tokens=7, top_k=5)
    assert (cfg.model.student, cfg.model.teacher) == ("toy:teacher", "toy:student")
    assert (cfg.rollout.samples_per_prompt, cfg.rollout.max_new_tokens, cfg.scoring.top_k) == (3, 7, 5)
    keys = set_keys(["data.toy.n_ops=8"])
    assert "data.toy.n_ops" in keys
    check_rollout_config(cfg, keys)
    prompts = _prompts(cfg)
    assert len(prompts) == 3
    assert all(sum(c in "+-*" for c in p.messages[-1]["content"].split("Compute")[-1]) >= 8 for p in prompts)
    with pytest.raises(ConfigError, match="data.toy"):
        check_rollout_config(apply_flags(cfg, prompts="file.jsonl"), keys)
