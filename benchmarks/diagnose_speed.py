"""Speed and memory of `opd diagnose` on a synthetic rollouts.jsonl with planted effects.

    python -m benchmarks.diagnose_speed                       # 10,000 records x 1,000 tokens, K = 16
    python -m benchmarks.diagnose_speed --n 1000 --t 1000 --k 16 --workers 2

Writes the file (distinct records through `RolloutWriter`, then repeated with new sample ids
so that writing stays fast), runs `opd diagnose` on it in a child process and prints the wall
time, the CPU time of all its processes, the child's peak RSS (`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`, the largest
single process) and the peak total RSS of its process tree (sampled from /proc every 0.1 s).

The planted effects (also used by tests/test_diagnose.py):

* advantage A_t = teacher_lp - student_lp with mean 0.3 and a standard deviation that falls
  from 2.0 to 0.5 along the response (variance decay);
* the teacher's top1 - top2 margin over the student's candidates is large before relative
  position `drop` and small after it (a release point near `drop`);
* the student's and teacher's top-K ids share almost all entries before `drop` and half of
  them after it (top-K overlap drop, drift events late).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def synthetic_record(rng: np.random.Generator, index: int, t: int, k: int, *, drop: float = 0.6,
                     step: int = 0, topk: bool = True, sentences: int = 24) -> dict[str, Any]:
    """One schema-valid record with the planted effects (see the module docstring)."""
    pos = np.arange(t) / max(t, 1)
    late = pos >= drop
    student_lp = -6.0 - 0.8 * np.abs(rng.standard_normal(t))
    sigma = 0.5 + 1.5 * (1.0 - pos)
    adv = np.clip(0.3 + sigma * rng.standard_normal(t), -4.0, 5.8)
    teacher_lp = student_lp + adv
    words = [f"Step {j} adds {j + 1} to the running total and checks it." for j in range(sentences)]
    rec: dict[str, Any] = {
        "schema": "opd.rollout", "schema_version": 1, "run_id": "synthetic", "step": step,
        "policy_version": step, "sample_id": f"{step}-{index}", "prompt_id": f"p{index % 97}",
        "prompt": "Add the numbers.", "response_text": " ".join(words),
        "response_ids": rng.integers(0, 50000, t).tolist(), "mask": [1] * t,
        "student_lp": student_lp.tolist(), "teacher_lp": teacher_lp.tolist(),
        "behavior_lp": (student_lp + 0.01 * rng.standard_normal(t)).clip(max=0.0).tolist(),
        "finished": True,
    }
    if topk:
        rec |= _topk_fields(rng, t, k, late)
    return rec


def _topk_fields(rng: np.random.Generator, t: int, k: int, late: np.ndarray) -> dict[str, Any]:
    s_ids = np.argsort(rng.random((t, 4 * k)), axis=1)[:, :k] + 10
    share = np.where(late, k // 2, k - 1)
    t_ids = np.where(np.arange(k)[None, :] < share[:, None], s_ids, s_ids + 1000)
    s_lp = -np.sort(rng.exponential(2.0, (t, k)), axis=1)
    s_lp[:, 0] = -rng.exponential(0.00004, t)  # near-certain top-1: tiny values such as -2e-05
    # teacher probabilities on the student's candidates: a clear favourite early, flat late
    early_p = np.full(k, 0.2 / max(k - 1, 1))
    early_p[0] = 0.75
    flat = np.full(k, 0.9 / k)
    base = np.where(late[:, None], flat, early_p)
    q = base * np.exp(0.15 * rng.standard_normal((t, k)))
    t_on_s = np.log(np.minimum(q, 0.999))
    t_lp = -np.sort(rng.exponential(1.5, (t, k)), axis=1)
    return {"topk": k, "student_topk_ids": s_ids.tolist(), "teacher_topk_ids": t_ids.tolist(),
            "student_topk_lp": s_lp.tolist(), "teacher_topk_lp": t_lp.tolist(),
            "teacher_lp_on_student_topk": t_on_s.tolist()}


def write_synthetic(path: Path, n: int, t: int, k: int, *, distinct: int = 64, seed: int = 0,
                    steps: int = 1, **kwargs: Any) -> Path:
    """Write n records: `distinct` generated ones, repeated with fresh sample ids."""
    from opdcli.records import RolloutWriter

    rng = np.random.default_rng(seed)
    template = path.with_suffix(".template.jsonl")
    template.unlink(missing_ok=True)
    with RolloutWriter(template, fsync_every=0) as writer:
        for i in range(min(n, distinct)):
            writer.write(synthetic_record(rng, i, t, k, **kwargs))
    lines = template.read_bytes().splitlines(keepends=True)
    template.unlink()
    with open(path, "wb") as out:
        for i in range(n):
            line = lines[i % len(lines)]
            step = i * steps // n
            head, rest = line.split(b'"sample_id":', 1)
            rest = rest.split(b",", 1)[1]
            head = head.replace(b'"step":0,"policy_version":0', b'"step":%d,"policy_version":%d' % (step, step))
            out.write(head + b'"sample_id":"%d-%d",' % (step, i) + rest)
    return path


def _tree_rss(root: int) -> int:
    """Total RSS in bytes of `root` and its descendants (Linux /proc; 0 elsewhere)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(stat[1])
        rss[int(entry)] = int(stat[21]) * page
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += [c for c, p in parents.items() if p == pid]
    return total


def run(path: Path, out: Path, workers: int | None) -> dict[str, float]:
    """Run `opd diagnose` in a child process; wall time and memory."""
    cmd = [sys.executable, "-m", "opdcli.cli", "diagnose", str(path), "--out", str(out), "--format", "json"]
    if workers:
        cmd += ["--workers", str(workers)]
    peak = [0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def poll() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.1)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"opd diagnose failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    summary = json.loads(stdout)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"seconds": seconds, "max_rss_gib": usage.ru_maxrss * 1024 / 2**30,
            "tree_rss_gib": peak[0] / 2**30, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "records": summary["records"], "tokens": summary["tokens"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="records")
    parser.add_argument("--t", type=int, default=1_000, help="tokens per record")
    parser.add_argument("--k", type=int, default=16, help="stored top-K")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: default)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "rollouts.jsonl"
        t0 = time.perf_counter()
        write_synthetic(path, args.n, args.t, args.k)
        size = path.stat().st_size
        print(f"wrote {args.n} x {args.t} tokens, K={args.k}: {size / 2**30:.2f} GiB "
              f"in {time.perf_counter() - t0:.1f} s")
        res = run(path, Path(tmp) / "diagnose", args.workers or None)
    print(f"opd diagnose: {res['seconds']:.1f} s wall, {res['cpu_seconds']:.1f} s CPU (all processes), "
          f"peak RSS {res['max_rss_gib']:.2f} GiB (largest process), {res['tree_rss_gib']:.2f} GiB "
          f"(process tree, sampled); {res['records']} records, {res['tokens']} tokens, "
          f"{size / 2**20 / res['seconds']:.0f} MiB/s; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
