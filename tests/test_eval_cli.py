"""`opd eval` end to end on the toy world: the hf generator on the toy teacher, re-scoring its
samples with replay, every checkpoint of a run directory, and the optional lm-eval path."""

from __future__ import annotations

import csv
import json
import shutil
import sys

import pytest
from typer.testing import CliRunner

from opdcli.cli import app
from opdcli.models import TOY_WEIGHTS


def test_toy_teacher_end_to_end_and_replay(tmp_path):
    out = tmp_path / "toy"
    result = CliRunner().invoke(app, ["eval", "--bench", "toy-arith", "--model", "toy:teacher",
                                      "--generator", "hf", "--limit", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    m = res["metrics"]
    assert m["problems"] == 32 and m["samples"] == 32
    assert m["avg@k"] > 0.5, m  # the toy teacher gets ~90% greedy
    assert res["bench"]["name"] == "toy-arith" and res["bench"]["version"] == 1
    assert len(res["bench"]["data_sha256"]) == 64
    assert res["sampling"]["preset"] == "greedy" and res["sampling"]["temperature"] == 0.0
    assert res["sampling"]["max_tokens"] == 64
    assert res["scoring"]["scorer"] == "opdcli.grading.grade"
    assert res["packages"]["torch"] and res["generator"]["generator"] == "hf"
    assert "avg@k" in result.output and "results.json" in result.output
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32 and {"problem_id", "text", "correct", "status", "finish_reason"} <= set(samples[0])
    # re-score the stored samples with the replay generator: same numbers
    again = tmp_path / "replay"
    result = CliRunner().invoke(app, ["evaluate", "--bench", "toy-arith", "--generator", "replay",
                                      "--completions", str(out / "samples.jsonl"), "--limit", "32", "--out", str(again)])
    assert result.exit_code == 0, result.output
    assert json.loads((again / "results.json").read_text())["metrics"]["avg@k"] == m["avg@k"]


def test_run_dir_evaluates_every_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2):
        shutil.copytree(TOY_WEIGHTS / "student", run / "checkpoints" / f"step_{step}")
    (run / "checkpoints" / "step_3").mkdir()  # incomplete: skipped
    result = CliRunner().invoke(app, ["eval", "--bench", "toy-arith", "--run-dir", str(run), "--limit", "8"])
    assert result.exit_code == 0, result.output
    root = run / "eval" / "toy-arith"
    rows = list(csv.DictReader((root / "accuracy_vs_step.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert rows[0]["avg@k"] == rows[1]["avg@k"]  # same weights, greedy
    assert (root / "accuracy_vs_step.png").stat().st_size > 1000
    assert (root / "step_1" / "results.json").is_file() and (root / "step_2" / "samples.jsonl").is_file()


@pytest.mark.parametrize("args, message", [
    (["--bench", "toy-arith", "--run-dir", "RUN", "--model", "toy:student"], "drop --model"),
    (["--bench", "toy-arith", "--run-dir", "EMPTY"], "no checkpoints/step_N"),
    (["--bench", "toy-arith"], "needs --model"),
    (["--bench", "toy-arith", "--model", "toy:teacher", "--completions", "x.jsonl"], "only works with --generator replay"),
    (["--bench", "aime24", "--model", "toy:teacher", "--release", "v5"], "--release cannot be used"),
    (["nonsense", "--bench", "aime24"], "unknown eval action"),
    (["--bench", "toy-arith", "--model", "toy:teacher", "--generator", "sglang"], "--generator 'sglang'"),
    (["--bench", "toy-arith", "--generator", "replay", "--completions", "x.jsonl", "--n", "4"], "--n cannot take effect"),
    (["--bench", "toy-arith", "--model", "toy:teacher", "--data", "x.jsonl"], "--data has no effect"),
])
def test_misuse_gives_one_line_errors(tmp_path, args, message):
    (tmp_path / "EMPTY").mkdir()
    args = [a.replace("RUN", str(tmp_path)).replace("EMPTY", str(tmp_path / "EMPTY")) if a in ("RUN", "EMPTY") else a
            for a in args]
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_lm_eval_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    result = CliRunner().invoke(app, ["eval", "--bench", "toy-arith", "--model", "toy:teacher", "--harness", "lm-eval"])
    assert result.exit_code == 2 and "needs lm-eval" in result.output


def test_lm_eval_path_with_a_fake_model(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.api.model import LM

    from benchmarks.harness.lm_eval_adapter import run_lm_eval
    from benchmarks.runner import EvalOptions

    class FakeLM(LM):
        """Answers every other request correctly (a toy problem is a Python expression)."""

        def __init__(self):
            super().__init__()
            self.calls = 0

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            out = []
            for req in requests:
                self.calls += 1
                expr = req.args[0].split("Compute ")[-1].rstrip(".")
                out.append(f"\\boxed{{{eval(expr)}}}" if self.calls % 2 else "no idea")
            return out

    lm = FakeLM()
    opts = EvalOptions(bench="toy-arith", harness="lm-eval", limit=4, sampling={"n": 2, "temperature": 0.7},
                       out=str(tmp_path / "lm"))
    result = run_lm_eval(opts, lm=lm)
    assert lm.calls == 8  # repeats: 2 on 4 problems
    m = result.results["metrics"]
    assert m["avg@k"] == pytest.approx(0.5) and m["pass@1"] == pytest.approx(0.5)
    assert m["no_answer_rate"] == pytest.approx(0.5) and m["maj@k"] == pytest.approx(1.0)
    assert result.results["harness"] == "lm-eval" and result.results["bench"]["lm_eval_task"] == "opd_toy_arith"
    samples = [json.loads(line) for line in (tmp_path / "lm" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(len(s["resps"][0]) == 2 for s in samples)
