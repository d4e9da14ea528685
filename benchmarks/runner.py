"""`opd eval`: bench -> prompts -> generator -> isolated scorers -> metrics -> results folder.

`run_eval(opts)` evaluates one model on one bench and writes results.json, samples.jsonl and
a table; `run_checkpoints(opts, run_dir)` does that for every run_dir/checkpoints/step_N and
writes accuracy-vs-step CSV + PNG. The optional lm-eval path lives in `benchmarks.harness`.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import data as bench_data
from benchmarks.generators import GENERATORS, ChatPrompt, Completion, GenParams, resolve_params
from benchmarks.metrics import Sample, compute_metrics
from benchmarks.prompts import build_messages
from benchmarks.registry import BenchSpec, get_bench
from benchmarks.report import package_versions, write_outputs
from benchmarks.scorers import ScoreConfig, ScoreResult, describe, score_batch
from opdcli.errors import CheckpointError, ConfigError


@dataclass
class EvalOptions:
    """Everything `opd eval` was asked to do (recorded in results.json under `config`)."""

    bench: str
    model: str | None = None
    generator: str = "hf"
    harness: str = "native"
    preset: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    """Explicit flags: n, temperature, top_p, top_k, min_p, max_tokens, thinking, seed."""
    data: str | None = None
    completions: str | None = None
    limit: int | None = None
    out: str | None = None
    bench_options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 64
    max_model_len: int | None = None
    include_path: str | None = None
    """--harness lm-eval: a folder of the user's own lm-eval task YAMLs (--bench names one)."""
    score: ScoreConfig = field(default_factory=ScoreConfig)
    argv: list[str] = field(default_factory=list)


@dataclass
class EvalResult:
    results: dict[str, Any]
    out_dir: Path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.rstrip("/").split("/")[-1]).strip("-") or "model"


def default_out(opts: EvalOptions) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    who = _slug(opts.model) if opts.model else opts.generator
    return Path("runs") / "eval" / f"{_slug(opts.bench)}-{who}-{stamp}"


def check_options(opts: EvalOptions) -> None:
    if opts.generator not in GENERATORS:
        raise ConfigError(f"--generator '{opts.generator}' is not one of {', '.join(GENERATORS)}")
    if opts.generator == "replay":
        if not opts.completions:
            raise ConfigError("--generator replay needs --completions FILE (JSONL of completions by problem id)")
        set_flags = sorted(k for k, v in opts.sampling.items() if v is not None)
        if set_flags or opts.preset:
            flags = ", ".join("--" + k.replace("_", "-") for k in set_flags + (["preset"] if opts.preset else []))
            raise ConfigError(f"{flags} cannot take effect with --generator replay (the completions exist already)")
    elif opts.completions:
        raise ConfigError("--completions only works with --generator replay; add --generator replay or drop it")
    elif not opts.model:
        raise ConfigError(f"--generator {opts.generator} needs --model (a folder, hub id, toy:teacher, ...)")
    if opts.limit is not None and opts.limit < 1:
        raise ConfigError(f"--limit must be at least 1 (got {opts.limit})")


def make_generator(opts: EvalOptions, params: GenParams) -> Any:
    explicit = opts.sampling.get("thinking") is not None
    if opts.generator == "replay":
        from benchmarks.generators.replay import ReplayGenerator

        return ReplayGenerator(opts.completions or "")
    if opts.generator == "vllm":
        from benchmarks.generators.vllm import VLLMGenerator

        return VLLMGenerator(opts.model or "", max_model_len=opts.max_model_len, dtype=opts.dtype,
                             explicit_thinking=explicit, seed=params.seed)
    from benchmarks.generators.hf import HFGenerator

    return HFGenerator(opts.model or "", opts.device, opts.dtype, opts.batch_size, explicit_thinking=explicit)


def _scoring_text(c: Completion) -> str:
    return ("<think>" + c.text) if c.thinking_open else c.text


def score_completions(spec: BenchSpec, rows: list[dict[str, Any]], completions: list[list[Completion]],
                      cfg: ScoreConfig) -> list[list[ScoreResult]]:
    items = [(_scoring_text(c), row) for row, cs in zip(rows, completions, strict=True) for c in cs]
    flat = score_batch(spec.scorer, items, cfg)
    out, i = [], 0
    for cs in completions:
        out.append(flat[i : i + len(cs)])
        i += len(cs)
    return out


def _sample_rows(rows, completions, scores) -> list[dict[str, Any]]:
    out = []
    for row, cs, ss in zip(rows, completions, scores, strict=True):
        for j, (c, s) in enumerate(zip(cs, ss, strict=True)):
            rec = {"problem_id": row["id"], "sample": j, "correct": s.correct, "status": s.status,
                   "extracted": s.extracted, "gold": row.get("answer"), "finish_reason": c.finish_reason,
                   "n_tokens": c.n_tokens, "text": c.text}
            if "shuffle_seed" in row:
                rec["shuffle_seed"] = row["shuffle_seed"]
            if s.detail:
                rec["detail"] = s.detail
            out.append(rec)
    return out


def run_eval(opts: EvalOptions, generator: Any = None) -> EvalResult:
    """Evaluate one model on one bench and write the results folder."""
    spec = get_bench(opts.bench)
    check_options(opts)
    params = resolve_params(spec.sampling, opts.preset, opts.sampling)
    bench = bench_data.load(spec, opts.bench_options, opts.data, opts.limit)
    gen = generator if generator is not None else make_generator(opts, params)
    rows = bench.rows
    if params.temperature == 0 and params.n > 1 and opts.generator == "hf":
        warnings.warn(f"greedy decoding gives {params.n} identical samples per problem; set --temperature > 0",
                      stacklevel=2)
    if getattr(gen, "name", "") == "replay":
        covered = [r for r in rows if gen.covers(r["id"])]
        if not covered:
            raise ConfigError(f"--completions covers none of the {len(rows)} problems of '{spec.name}' "
                              "(problem ids differ); check the file and --data")
        if len(covered) < len(rows):
            warnings.warn(f"the replay file covers {len(covered)} of {len(rows)} problems; scoring those",
                          stacklevel=2)
        rows = covered
    prompts = [ChatPrompt(r["id"], tuple(build_messages(spec, r))) for r in rows]
    t0 = time.perf_counter()
    try:
        completions = gen.generate(prompts, params)
    finally:
        if generator is None and hasattr(gen, "close"):
            gen.close()
    t1 = time.perf_counter()
    scores = score_completions(spec, rows, completions, opts.score)
    t2 = time.perf_counter()
    per_problem = [[Sample(s.correct, s.extracted, s.status, c.finish_reason, c.n_tokens, len(c.text))
                    for c, s in zip(cs, ss, strict=True)] for cs, ss in zip(completions, scores, strict=True)]
    metrics = compute_metrics(per_problem, spec.pass_k, majority="maj@k" in spec.metrics)
    results = {
        "bench": {"name": spec.name, "version": spec.version, "kind": spec.kind, "spec": spec.path,
                  "data_sha256": bench.sha256, "data_source": bench.source, "problems": len(rows)},
        "model": opts.model,
        "generator": gen.describe(),
        "sampling": params.as_dict() if opts.generator != "replay" else {"replay": opts.completions},
        "scoring": describe(spec.scorer, opts.score),
        "harness": "native",
        "config": asdict(opts),
        "packages": package_versions(),
        "metrics": metrics,
        "per_problem": [{"id": r["id"], "n": len(ss), "correct": sum(s.correct for s in ss)}
                        for r, ss in zip(rows, scores, strict=True)],
        "timing_s": {"generate": round(t1 - t0, 3), "score": round(t2 - t1, 3)},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    out_dir = Path(opts.out) if opts.out else default_out(opts)
    write_outputs(out_dir, results, _sample_rows(rows, completions, scores))
    return EvalResult(results, out_dir)


def find_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of run_dir/checkpoints/step_N that hold a config.json, by step."""
    root = Path(run_dir).expanduser() / "checkpoints"
    found = []
    for p in root.glob("step_*"):
        if p.is_dir() and p.name[5:].isdigit() and (p / "config.json").is_file():
            found.append((int(p.name[5:]), p))
    if not found:
        raise CheckpointError(f"--run-dir '{run_dir}' has no checkpoints/step_N folders with a config.json; "
                              "pass a run directory written by opd train")
    return sorted(found)


def run_checkpoints(opts: EvalOptions, run_dir: str | Path) -> tuple[list[dict[str, Any]], Path]:
    """Evaluate every checkpoint of a training run; write accuracy_vs_step.csv and .png."""
    from benchmarks.report import write_curve

    if opts.model:
        raise ConfigError("--run-dir evaluates the run's checkpoints; drop --model")
    if opts.generator == "replay":
        raise ConfigError("--run-dir needs a real generator (hf or vllm), not replay")
    out_root = Path(opts.out) if opts.out else Path(run_dir) / "eval" / _slug(opts.bench)
    rows = []
    for step, folder in find_checkpoints(Path(run_dir)):
        res = run_eval(replace(opts, model=str(folder), out=str(out_root / f"step_{step}")))
        rows.append({"step": step, "checkpoint": str(folder), **res.results["metrics"]})
    write_curve(out_root, rows, opts.bench)
    return rows, out_root
