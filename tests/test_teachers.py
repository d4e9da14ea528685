"""Domain teachers (model.teachers, G-OPD's merge of domain experts): each prompt's tag routes
its rows to one teacher. Routed scores equal each teacher's own scores of its rows; tags that
reach no teacher, and settings a routed teacher cannot serve, are refused before models load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from opdcli.cli import app
from opdcli.config import TrainRunConfig, load_config
from opdcli.data import Prompt, PromptSource, render
from opdcli.engines.hf_sampler import sample
from opdcli.engines.hf_scorer import HFScorer
from opdcli.engines.types import SamplingParams
from opdcli.errors import ConfigError, DataError
from opdcli.methods import build_method
from opdcli.models import load_model, load_tokenizer
from opdcli.stages import route
from opdcli.validate import check_routes, validate_train_config

runner = CliRunner()
CPU = torch.device("cpu")


def _prompts(tags: list[str | None]) -> list[Prompt]:
    return [Prompt(f"p{i}", ({"role": "user", "content": f"Compute {i + 2}+{i + 3}."},), teacher=tag)
            for i, tag in enumerate(tags)]


def _data(tmp_path: Path, tags: list[str | None], name: str = "mixed.jsonl") -> Path:
    rows = [{"prompt": f"Compute {i + 2}*{i + 3}.", "answer": str((i + 2) * (i + 3))} | (
        {"opd_teacher": tag} if tag is not None else {}) for i, tag in enumerate(tags)]
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def models(tiny_dirs):
    tok = load_tokenizer(str(tiny_dirs["student"]))
    student = load_model(str(tiny_dirs["student"]), CPU, torch.float32)
    teacher = load_model(str(tiny_dirs["teacher"]), CPU, torch.float32)
    return tok, student, teacher


def test_each_row_is_scored_by_its_prompts_teacher(models):
    tok, student, teacher = models
    prompts = _prompts(["b", None, "a", "b", None])  # student as teacher "a", teacher as "b" and default
    rollout = sample(student, tok, [render(tok, p) for p in prompts], SamplingParams(n=2, max_new_tokens=10),
                     generator=torch.Generator().manual_seed(0))
    rollout = route(rollout, prompts)
    assert rollout.teacher_tags_B == ("b", "b", None, None, "a", "a", "b", "b", None, None)
    routed = HFScorer(student, teacher, k=4, chunk_tokens=8, batch_size=3,
                      teachers={"a": student, "b": teacher}).score(rollout)
    by_teacher = HFScorer(student, teacher, k=4, chunk_tokens=8, batch_size=3).score(rollout)
    by_student = HFScorer(student, student, k=4, chunk_tokens=8, batch_size=3).score(rollout)
    m = rollout.response_mask_B_T.bool()
    for b, tag in enumerate(rollout.teacher_tags_B):
        want = by_student if tag == "a" else by_teacher
        torch.testing.assert_close(routed.teacher_lp_B_T[b][m[b]], want.teacher_lp_B_T[b][m[b]], atol=1e-5, rtol=0)
        torch.testing.assert_close(routed.teacher_lp_on_student_topk_B_T_K[b][m[b]],
                                   want.teacher_lp_on_student_topk_B_T_K[b][m[b]], atol=1e-5, rtol=0)
        assert torch.equal(routed.teacher_topk_ids_B_T_K[b][m[b]], want.teacher_topk_ids_B_T_K[b][m[b]])
    a_rows = [b for b, t in enumerate(rollout.teacher_tags_B) if t == "a"]  # the student scoring itself
    torch.testing.assert_close(routed.teacher_lp_B_T[a_rows], routed.student_lp_B_T[a_rows], atol=1e-5, rtol=0)
    assert not torch.allclose(routed.teacher_lp_B_T[m], by_teacher.teacher_lp_B_T[m])  # routing changed something


def test_a_row_whose_tag_names_no_teacher_is_refused(models):
    tok, student, teacher = models
    prompts = _prompts(["a", "zzz"])
    rollout = route(sample(student, tok, [render(tok, p) for p in prompts], SamplingParams(n=1, max_new_tokens=4),
                           generator=torch.Generator().manual_seed(0)), prompts)
    with pytest.raises(DataError, match="teacher 'zzz'.*model.teachers.zzz="):
        HFScorer(student, teacher, k=2, chunk_tokens=8, batch_size=4, teachers={"a": student}).score(rollout)
    assert route(rollout, _prompts([None, None])).prompt_teachers_P == rollout.prompt_teachers_P  # untagged: as is


def _cfg(*sets: str) -> tuple[TrainRunConfig, set[str]]:
    return load_config(TrainRunConfig, None, list(sets))


@pytest.mark.parametrize(("sets", "needle"), [
    (["loss.objective=rkl"], "full-distribution objectives"),
    (["loss.objective=sampled", "train.mode=async", "asynchronous.worker_scoring=true"], "worker_scoring=false"),
])
def test_settings_a_routed_teacher_cannot_serve_are_refused(sets, needle):
    cfg, explicit = _cfg("model.teachers.a=toy:teacher", *sets)
    with pytest.raises(ConfigError, match=needle):
        validate_train_config(cfg, explicit)


def test_teacher_field_without_teachers_is_refused(tmp_path):
    cfg, explicit = _cfg("data.teacher_field=domain")
    with pytest.raises(ConfigError, match="data.teacher_field cannot take effect"):
        validate_train_config(cfg, explicit)
    result = runner.invoke(app, ["rollout", "--out", str(tmp_path / "r.jsonl"), "--set", "data.teacher_field=domain"])
    assert result.exit_code == 2 and "data.teacher_field cannot take effect" in result.output


def test_routes_no_prompt_reaches_or_no_teacher_serves_are_refused(tmp_path):
    def check(source: str, *sets: str, method: str = "gopd", options: dict | None = None) -> None:
        cfg, _ = _cfg(f"data.source={source}", "model.teachers.a=toy:teacher", "loss.objective=sampled", *sets)
        m = build_method(method, options or {}, cfg.loss)
        check_routes(cfg, PromptSource(cfg.data, 0).teacher_tags(), m)

    with pytest.raises(ConfigError, match="toy prompts name no teacher"):
        check("toy")
    with pytest.raises(ConfigError, match="no row of .* has a 'opd_teacher' field"):
        check(str(_data(tmp_path, [None, None])))
    with pytest.raises(ConfigError, match="names teacher 'b'.*model.teachers.b="):
        check(str(_data(tmp_path, ["a", "b"])))
    with pytest.raises(ConfigError, match="scoring.teacher_engine=hf"):
        check(str(_data(tmp_path, ["a", None])), "scoring.teacher_engine=vllm")
    with pytest.raises(ConfigError, match="online truncation"):
        check(str(_data(tmp_path, ["a", None])), method="prune", options={"online": True})
    check(str(_data(tmp_path, ["a", None])))  # one tagged row is enough; the other goes to model.teacher
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "opd_teacher": 3}))
    with pytest.raises(DataError, match="must be a teacher's tag"):
        PromptSource(_cfg(f"data.source={bad}")[0].data, 0)


def test_opd_distill_refuses_teachers():
    result = runner.invoke(app, ["distill", "--set", "model.teachers.a=toy:teacher"])
    assert result.exit_code == 2 and "model.teachers cannot take effect in opd distill" in result.output
    assert "Traceback" not in result.output


def test_opd_train_routes_each_domain_to_its_teacher_and_trains(tmp_path):
    from safetensors.torch import load_file

    from opdcli.models import resolve_model_path

    data = _data(tmp_path, ["hard", "self"] * 8)
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "train", "--set", f"data.source={data}", "--set", "model.teachers.hard=toy:teacher",
        "--set", "model.teachers.self=toy:student", "--set", "loss.objective=sampled", "--set", "optim.lr=1e-3",
        "--set", "rollout.prompts_per_step=8", "--set", "rollout.max_new_tokens=24", "--set", "train.max_steps=3",
        "--set", "eval.every=0", "--set", f"run.out_dir={out}"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    assert len(steps) == 3
    first = steps[0]
    # the student scored by itself: zero KL on its half; the real teacher: a clear gap
    assert abs(first["signal/teacher_kl/self"]) < 1e-4 and first["signal/teacher_kl/hard"] > 0.05
    assert abs(first["route/hard/tokens_frac"] + first["route/self/tokens_frac"] - 1.0) < 1e-9
    assert first["signal/teacher_kl"] == pytest.approx(
        first["route/hard/tokens_frac"] * first["signal/teacher_kl/hard"]
        + first["route/self/tokens_frac"] * first["signal/teacher_kl/self"], abs=1e-5)
    from opdcli.records.io import RolloutRecord

    records = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    for rec in records:
        assert RolloutRecord.from_json(rec).to_json()["teacher"] == rec["teacher"]  # valid, and read back
    assert {r["teacher"] for r in records} == {"hard", "self"}  # each sample says which teacher scored it
    start = load_file(Path(resolve_model_path("toy:student")) / "model.safetensors")
    final = load_file(out / "checkpoints" / "step_3" / "model.safetensors")
    assert any(not torch.equal(start[k], final[k]) for k in start)  # the student changed


def test_sharded_teachers_under_torchrun_route_in_lockstep_and_match_one_process(tmp_path):
    """With dist.frozen_models=shard a teacher's forward is a collective: a rank whose rows name
    no prompt of some teacher must still join it (else the ranks deadlock)."""
    import os
    import socket
    import subprocess
    import sys

    data = _data(tmp_path, ["hard", "self", "self", "self"] * 2)  # ranks see different tag mixes
    bin_dir = Path(sys.executable).parent
    common = ["--set", f"data.source={data}", "--set", "model.teachers.hard=toy:teacher", "--set",
              "model.teachers.self=toy:student", "--set", "loss.objective=sampled", "--set",
              "rollout.prompts_per_step=8", "--set", "rollout.max_new_tokens=16", "--set", "train.max_steps=2",
              "--set", "eval.every=0", "--set", "run.threads=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = {}
    for name, prefix in (("one", [str(bin_dir / "opd")]),
                         ("two", [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                                  "--master_port", str(port), str(bin_dir / "opd")])):
        out = tmp_path / name
        proc = subprocess.run([*prefix, "train", *common, "--set", "dist.frozen_models=shard", "--set",
                               f"run.out_dir={out}"], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                      if "loss/total" in line]
    for one, two in zip(runs["one"], runs["two"], strict=True):
        for key in ("signal/teacher_kl/hard", "signal/teacher_kl/self", "route/hard/tokens_frac", "loss/total"):
            assert one[key] == pytest.approx(two[key], abs=1e-4), key


def test_a_domain_teacher_that_is_model_teacher_is_loaded_once():
    from opdcli.config import ModelConfig
    from opdcli.models import load_configured_pair, load_teachers

    m = ModelConfig(teachers={"a": "toy:teacher", "b": "toy:student", "c": "toy:student"})
    pair = load_configured_pair(m, "cpu", "float32")
    got = load_teachers(pair, m)
    assert got["a"] is pair.teacher and got["b"] is got["c"] and got["b"] is not pair.student
    assert not any(p.requires_grad for p in got["b"].parameters())


def test_the_doctor_checks_every_domain_teacher_against_the_student():
    from opdcli.doctor import diagnose

    cfg, _ = _cfg("model.teachers.a=toy:teacher", "model.teachers.b=toy:teacher-forms", "loss.objective=sampled")
    errors = [f.line() for f in diagnose(cfg) if f.level == "error"]
    assert errors and "toy:teacher-forms" in errors[0]  # another vocabulary: refused before any run
    cfg, _ = _cfg("model.teachers.a=toy:teacher", "model.teachers.b=toy:teacher-add", "loss.objective=sampled")
    checked = [f.line() for f in diagnose(cfg)]
    assert not [f for f in diagnose(cfg) if f.level == "error"]
    assert sum("chat template" in line for line in checked) == 2  # model.teacher and teacher-add, each once


def test_opd_rollout_scores_each_row_with_its_domain_teacher(tmp_path):
    out = tmp_path / "r.jsonl"
    data = _data(tmp_path, ["hard", "self", None])
    result = runner.invoke(app, ["rollout", "--out", str(out), "--prompts", str(data), "--n", "2",
                                 "--max-new-tokens", "12", "--set", "model.teachers.hard=toy:teacher",
                                 "--set", "model.teachers.self=toy:student"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("teacher") for r in records] == ["hard", "hard", "self", "self", None, None]
    for r in records:  # the student scored by itself: its own log-probs; the others: the toy teacher's
        gap = max(abs(s - t) for s, t in zip(r["student_lp"], r["teacher_lp"], strict=True))
        assert (gap < 1e-4) == (r.get("teacher") == "self"), (r.get("teacher"), gap)
