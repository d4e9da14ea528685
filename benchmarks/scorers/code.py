"""Code answers (LiveCodeBench): the last fenced block, run against every test in a sandbox.

A completion passes when all its tests pass (LCB's rule); runs stop at the first failure.
stdin tests: one sandboxed process per test, the input on stdin, the output compared line by
line after stripping, with a Decimal fallback for numbers (as LCB does). Functional tests
(LeetCode style): one sandboxed process runs a driver that execs the code, finds
`Solution().<func_name>` (or a top-level function), calls it with the JSON arguments (one per
input line) and compares with the JSON output (tuples count as lists). Results per completion
go to `detail`: result (pass | wrong_answer | runtime_error | timeout), tests passed / total.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, InvalidOperation
from typing import Any

from benchmarks.lcb import extract_code
from benchmarks.scorers import ScoreConfig, ScoreResult, is_unfinished, isolation
from benchmarks.scorers.sandbox import MARK, Limits, run_python

HEADER = (
    "from string import *\nfrom re import *\nfrom datetime import *\nfrom collections import *\n"
    "from heapq import *\nfrom bisect import *\nfrom copy import *\nfrom math import *\n"
    "from random import *\nfrom statistics import *\nfrom itertools import *\nfrom functools import *\n"
    "from operator import *\nfrom io import *\nfrom sys import *\nfrom json import *\n"
    "from builtins import *\nfrom typing import *\n"
    "import string, re, datetime, collections, heapq, bisect, copy, math, random, statistics, "
    "itertools, functools, operator, io, sys, json\nsys.setrecursionlimit(50000)\n"
)

DRIVER = r'''
import contextlib, io, json, os, signal, sys
_tests = json.load(open("tests.json", encoding="utf-8"))
_out = os.dup(1)
def _report(results):
    os.write(_out, ("\n" + _MARK + json.dumps(results) + "\n").encode())
_results = []
_ns = {"__name__": "solution"}
_sink = io.StringIO()
def _alarm(signum, frame):
    raise TimeoutError("test timed out")
signal.signal(signal.SIGALRM, _alarm)
try:
    with contextlib.redirect_stdout(_sink):
        exec(compile(_cfg["header"] + _src, "solution.py", "exec"), _ns)
    _cls = _ns.get("Solution")
    _fn = getattr(_cls(), _tests["func_name"]) if _cls is not None else _ns[_tests["func_name"]]
except BaseException as exc:
    _report(["runtime_error: " + type(exc).__name__])
    raise SystemExit(0)
for _t in _tests["tests"]:
    try:
        _args = [json.loads(line) for line in _t["input"].split("\n") if line.strip()]
        signal.setitimer(signal.ITIMER_REAL, _tests["timeout"])
        with contextlib.redirect_stdout(_sink):
            _got = _fn(*_args)
        signal.setitimer(signal.ITIMER_REAL, 0)
    except TimeoutError:
        _results.append("timeout"); break
    except BaseException as exc:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _results.append("runtime_error: " + type(exc).__name__); break
    _sink.seek(0); _sink.truncate()
    try:
        _got = json.loads(json.dumps(_got))
    except (TypeError, ValueError):
        pass
    _ok = _got == json.loads(_t["output"])
    _results.append("pass" if _ok else "wrong_answer")
    if not _ok:
        break
_report(_results)
'''


def same_output(got: str, want: str) -> bool:
    """LCB's stdin comparison: stripped lines equal, or equal as Decimal tokens."""
    g = [line.strip() for line in got.strip().split("\n")]
    w = [line.strip() for line in want.strip().split("\n")]
    if len(g) != len(w):
        return False
    for a, b in zip(g, w, strict=True):
        if a == b:
            continue
        try:
            da, db = [Decimal(x) for x in a.split()], [Decimal(x) for x in b.split()]
        except InvalidOperation:
            return False
        if da != db:
            return False
    return True


def _stdin_tests(code: str, tests: list[dict[str, str]], limits: Limits) -> list[str]:
    results = []
    for t in tests:
        run = run_python(code, t["input"], limits, "stdin", HEADER)
        if run.timed_out:
            results.append("timeout")
        elif run.returncode != 0:
            last = (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]
            results.append("runtime_error: " + last[:200])
        else:
            results.append("pass" if same_output(run.stdout, t["output"]) else "wrong_answer")
        if results[-1] != "pass":
            break
    return results


def _functional_tests(code: str, row: dict[str, Any], tests: list[dict[str, str]], limits: Limits) -> list[str]:
    wall = min(limits.wall_s * len(tests) + 2.0, 120.0)
    payload = json.dumps({"func_name": row.get("func_name") or "", "tests": tests, "timeout": limits.wall_s})
    run = run_python(code, "", dataclasses.replace(limits, wall_s=wall), "functional",
                     HEADER, f"_MARK = {MARK!r}\n" + DRIVER, {"tests.json": payload})
    if run.timed_out:
        return ["timeout"]
    for line in reversed(run.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):]) or ["runtime_error: no tests ran"]
    last = (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]
    return ["runtime_error: " + last[:200]]


def score_one(text: str, row: dict[str, Any], cfg: ScoreConfig) -> ScoreResult:
    if is_unfinished(text):
        return ScoreResult(False, None, "unfinished")
    code = extract_code(text)
    if code is None:
        return ScoreResult(False, None, "no_answer")
    limits = Limits(wall_s=cfg.timeout, memory_mb=cfg.memory_mb, allow_unsafe=cfg.allow_unsafe_code)
    functional = [t for t in row["tests"] if t.get("testtype") == "functional"]
    tests = functional or row["tests"]
    if functional:
        results = _functional_tests(code, row, functional, limits)
    else:
        results = _stdin_tests(code, tests, limits)
    passed = sum(r == "pass" for r in results)
    correct = passed == len(tests)
    verdict = "pass" if correct else next((r for r in results if r != "pass"), "wrong_answer")
    status = "timeout" if verdict == "timeout" else "ok"
    return ScoreResult(correct, code, status, {"result": verdict.split(":")[0], "error": verdict,
                                               "passed": passed, "tests": len(tests)})


def score_code(items: list[tuple[str, dict[str, Any]]], cfg: ScoreConfig) -> list[ScoreResult]:
    isolation.require(cfg.allow_unsafe_code)  # refuse before the first program, not inside a thread
    with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        return list(pool.map(lambda it: score_one(it[0], it[1], cfg), items))
