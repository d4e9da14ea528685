"""Scorers through the replay generator: right, wrong, no answer, unfinished thinking, the
math-verify hang (killed by the deadline), and code that loops, forks, writes outside its
folder, opens sockets or exhausts memory (each contained and failed)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from benchmarks.runner import EvalOptions, run_eval
from benchmarks.scorers import ScoreConfig, score_batch
from benchmarks.scorers.isolate import run_isolated
from benchmarks.scorers.mcq import extract_letter
from opdcli.errors import ConfigError, DataError
from opdcli.grading import grade

FIX = Path(__file__).parent / "fixtures" / "benchmarks"


def _replay(tmp_path, bench, data, completions, **score):
    opts = EvalOptions(bench=bench, generator="replay", completions=str(completions), data=str(FIX / data),
                       out=str(tmp_path / "out"), score=ScoreConfig(**score))
    result = run_eval(opts)
    samples = [json.loads(line) for line in (result.out_dir / "samples.jsonl").read_text().splitlines()]
    return result, samples


def _sleep_forever(x):
    if x == "hang":
        time.sleep(60)
    return x * 2


def test_isolated_workers_kill_items_past_their_deadline():
    start = time.monotonic()
    out = run_isolated(_sleep_forever, [1, "hang", 3, "hang", 5], timeout=0.5, workers=2)
    assert out == [("ok", 2), ("timeout", None), ("ok", 6), ("timeout", None), ("ok", 10)]
    assert time.monotonic() - start < 10


def test_math_replay_right_wrong_missing_unfinished_and_hang(tmp_path):
    pytest.importorskip("math_verify")
    result, samples = _replay(tmp_path, "aime24", "aime24.jsonl", FIX / "completions_aime24.jsonl", timeout=1.0)
    p1 = [s for s in samples if s["problem_id"] == "2024-I-1"]
    assert [(s["correct"], s["status"]) for s in p1] == [
        (True, "ok"),            # \boxed{033} equals 33
        (False, "ok"),           # wrong number
        (False, "no_answer"),    # no \boxed{}
        (False, "unfinished"),   # <think> never closed: its boxed 33 does not count
        (False, "timeout"),      # math-verify hang string, killed at the deadline
    ]
    assert p1[0]["extracted"] == "033" and p1[3]["extracted"] is None
    m = result.results["metrics"]
    assert m["avg@k"] == pytest.approx((1 / 5 + 3 / 5 + 2 / 5) / 3)
    assert m["timeout_rate"] == pytest.approx(1 / 15) and m["unfinished_rate"] == pytest.approx(1 / 15)
    assert m["no_answer_rate"] == pytest.approx(3 / 15)
    assert result.results["scoring"]["scorer"] == "math-verify"
    assert result.results["bench"]["version"] == 1 and len(result.results["bench"]["data_sha256"]) == 64
    assert result.results["timing_s"]["score"] < 20


def test_math_verify_handles_latex_answers(tmp_path):
    pytest.importorskip("math_verify")
    result, samples = _replay(tmp_path, "hmmt25", "hmmt25.jsonl", FIX / "completions_hmmt25.jsonl")
    assert [s["correct"] for s in samples] == [True, True, False, True, True, False]


def test_exact_fallback_is_recorded(tmp_path):
    result, samples = _replay(tmp_path, "hmmt25", "hmmt25.jsonl", FIX / "completions_hmmt25.jsonl",
                              math_backend="exact")
    assert result.results["scoring"]["scorer"] == "exact"
    # exact match: 0.5 != \frac{1}{2}; integers still compare as integers
    assert [s["correct"] for s in samples] == [False, False, False, True, False, False]


def test_missing_math_verify_falls_back_with_one_warning(monkeypatch):
    import importlib.util

    from benchmarks.scorers import math as math_scorer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    monkeypatch.setattr(math_scorer, "_warned", False)
    with pytest.warns(UserWarning, match="math-verify is not installed"):
        res = score_batch("math", [("\\boxed{4}", {"answer": "4"}), ("\\boxed{x+1}", {"answer": "x+1"})], ScoreConfig())
    assert [r.correct for r in res] == [True, True]
    assert math_scorer.math_backend(ScoreConfig()) == "exact"


def test_code_sandbox_contains_bad_programs(tmp_path):
    escape = Path("/tmp/opd-sandbox-escape.txt")
    escape.unlink(missing_ok=True)
    result, samples = _replay(tmp_path, "livecodebench", "livecodebench.jsonl",
                              FIX / "completions_livecodebench.jsonl", timeout=1.0, workers=2, memory_mb=512)
    lcb = [s for s in samples if s["problem_id"] == "abc999_a"]
    got = [(s["correct"], s["status"], (s.get("detail") or {}).get("result")) for s in lcb]
    assert got == [
        (True, "ok", "pass"),
        (False, "ok", "wrong_answer"),
        (False, "timeout", "timeout"),        # while True: pass
        (False, "ok", "runtime_error"),       # fork bomb
        (False, "ok", "runtime_error"),       # writes outside its folder
        (False, "ok", "runtime_error"),       # socket.create_connection
        (False, "ok", "runtime_error"),       # _socket.socket
        (False, "ok", "runtime_error"),       # 8 GiB allocation
        (False, "no_answer", None),
        (False, "unfinished", None),
    ]
    assert "fork" in lcb[3]["detail"]["error"]
    assert "outside the sandbox" in lcb[4]["detail"]["error"]
    assert "network" in lcb[5]["detail"]["error"] and "network" in lcb[6]["detail"]["error"]
    assert "MemoryError" in lcb[7]["detail"]["error"]
    assert not escape.exists() and not (tmp_path / "escape.txt").exists()
    functional = {s["problem_id"]: s["correct"] for s in samples if s["problem_id"] != "abc999_a" and s["sample"] == 0}
    assert functional == {"3999": True, "4000": True}  # tuple result equals the JSON list
    wrong = [s for s in samples if s["problem_id"] == "3999" and s["sample"] == 1][0]
    assert wrong["detail"]["result"] == "wrong_answer"
    assert result.results["metrics"]["pass@1"] == pytest.approx((1 / 10 + 1 / 2 + 1) / 3)


def test_mcq_replay_letters(tmp_path):
    from benchmarks import data as bench_data
    from benchmarks.registry import get_bench

    rows = bench_data.load(get_bench("gpqa-diamond"), data_file=str(FIX / "gpqa_diamond.jsonl")).rows
    wrong = {r["id"]: next(x for x in "ABCD" if x != r["answer"]) for r in rows}
    comp = tmp_path / "c.jsonl"
    comp.write_text("".join(json.dumps({"id": r["id"], "completions": [
        f"<think>hmm</think>Answer: {r['answer']}", f"The answer is ({wrong[r['id']]})",
        f"\\boxed{{{r['answer']}}}", "I am not sure.", f"<think>Answer: {r['answer']}"]}) + "\n" for r in rows))
    result, samples = _replay(tmp_path, "gpqa-diamond", "gpqa_diamond.jsonl", comp)
    assert [(s["correct"], s["status"]) for s in samples[:5]] == [
        (True, "ok"), (False, "ok"), (True, "ok"), (False, "no_answer"), (False, "unfinished")]
    assert all("shuffle_seed" in s for s in samples)
    assert extract_letter("blah\n**C**") == "C" and extract_letter("Answer: E", 4) is None


def test_toy_scorer_is_the_training_grader():
    items = [("14*2=28. 28-12=16. \\boxed{16}", {"answer": "16"}), ("\\boxed{15}", {"answer": "16"}),
             ("no box", {"answer": "16"}), ("<think>x</think>\\boxed{16.0}", {"answer": "16"})]
    res = score_batch("toy", items, ScoreConfig())
    assert [r.correct for r in res] == [grade(t, row["answer"]) for t, row in items] == [True, False, False, True]
    assert res[2].status == "no_answer"


def test_replay_misuse_is_reported(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"completions": ["x"]}\n')
    with pytest.raises(DataError, match="needs an 'id'"):
        _replay(tmp_path, "aime24", "aime24.jsonl", bad)
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "nope", "text": "\\\\boxed{1}"}\n')
    with pytest.raises(ConfigError, match="covers none"):
        _replay(tmp_path, "aime24", "aime24.jsonl", other)
    with pytest.raises(ConfigError, match="needs --completions"):
        run_eval(EvalOptions(bench="aime24", generator="replay", data=str(FIX / "aime24.jsonl")))
