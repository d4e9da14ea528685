"""The `opd` command line: parse arguments, load config, call one run_* function.

Errors a user can cause (`OpdError`) print one line to stderr and exit with code 2; anything
else keeps its traceback. Heavy imports (torch, transformers) happen inside commands so that
`opd --help` stays fast.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from opdcli.errors import OpdError

app = typer.Typer(help="On-policy distillation: train, distill, diagnose, evaluate.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
toy_app = typer.Typer(help="The embedded toy world (tiny Qwen3 models on arithmetic).", no_args_is_help=True)
app.add_typer(toy_app, name="toy")

TOY_CONFIGS = Path(__file__).parent / "toy" / "configs"

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (default: the toy config).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key: --set optim.lr=1e-4 (repeatable).")]


def _fail(exc: OpdError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2)


def _one_process(command: str) -> None:
    """Commands other than train and distill are not data-parallel: refuse torchrun up front."""
    from opdcli.dist import from_env
    from opdcli.errors import ConfigError

    if from_env().active:
        raise ConfigError(f"opd {command} runs on one process; start it without torchrun "
                          "(only opd train and opd distill are data-parallel)")


def _load(cls, config: Path | None, default: str, overrides: list[str]):
    from opdcli.config import load_config

    return load_config(cls, config if config is not None else TOY_CONFIGS / default, overrides)


def _summary(title: str, result) -> None:
    from opdcli.dist import from_env

    if not from_env().is_main:  # under torchrun the main rank reports
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in sorted(set(result.before) | set(result.after)):
        fmt = (lambda v: f"{100 * v:.1f}%") if key.endswith(("accuracy", "rate")) else (lambda v: f"{v:.2f}")
        table.add_row(key, fmt(result.before[key]) if key in result.before else "-",
                      fmt(result.after[key]) if key in result.after else "-")
    console = Console()
    console.print(table)
    console.print(f"run directory: {result.run_dir}  (steps: {result.steps})")


@app.command()
def train(
    config: ConfigOpt = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="Method name (see --list-methods).")] = None,
    set_: SetOpt = None,
    list_methods: Annotated[bool, typer.Option("--list-methods", help="List the methods and exit.")] = False,
) -> None:
    """On-policy distillation: the student samples, the teacher scores every token."""
    try:
        from opdcli.methods import METHODS

        if list_methods:
            for name, cls in sorted(METHODS.items()):
                typer.echo(f"{name:10s} {cls.summary}")
            return
        from opdcli.config import TrainRunConfig
        from opdcli.loops.train import run_train
        from opdcli.loops.train_async import run_train_async

        overrides = list(set_ or []) + ([f"method.name={method}"] if method else [])
        cfg, explicit = _load(TrainRunConfig, config, "opd.yaml", overrides)
        from opdcli.config_io import flatten_keys, parse_overrides
        from opdcli.validate import method_objective

        # keys the user chose: the command line's, and a config file's when they passed one
        user_keys = flatten_keys(parse_overrides(overrides)) | (explicit if config is not None else set())
        cfg, note = method_objective(cfg, user_keys)
        if note:
            typer.echo(note, err=True)
        loop = run_train_async if cfg.train.mode == "async" else run_train
        try:
            result = loop(cfg, explicit, argv=sys.argv)
        except KeyboardInterrupt:  # the loop has saved a checkpoint and said how to resume
            raise typer.Exit(code=130) from None
        _summary("opd train: held-out evaluation", result)
    except OpdError as exc:
        _fail(exc)


@app.command()
def doctor(
    config: ConfigOpt = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="Method name (its reference model is checked too).")] = None,
    set_: SetOpt = None,
) -> None:
    """Check a student / teacher pair before training: tokenizers, vocabulary widths, chat
    templates, end-of-answer tokens, generation defaults, dtype and context length."""
    try:
        _one_process("doctor")
        from rich.console import Console
        from rich.table import Table

        from opdcli.config import TrainRunConfig
        from opdcli.doctor import diagnose
        from opdcli.errors import ConfigError

        overrides = list(set_ or []) + ([f"method.name={method}"] if method else [])
        cfg, _ = _load(TrainRunConfig, config, "opd.yaml", overrides)
        findings = diagnose(cfg)
        table = Table(title=f"opd doctor: {cfg.model.student} <- {cfg.model.teacher}", show_lines=True)
        for col in ("", "check", "finding", "fix"):
            table.add_column(col)
        style = {"error": "[red]error[/red]", "warning": "[yellow]warning[/yellow]", "ok": "[green]ok[/green]"}
        for f in findings:
            table.add_row(style[f.level], f.check, f.detail, f.fix)
        Console(width=160).print(table)
        errors = sum(f.level == "error" for f in findings)
        if errors:
            raise ConfigError(f"{errors} check(s) found what makes OPD wrong with this pair; apply the fixes above")
        warned = sum(f.level == "warning" for f in findings)
        typer.echo(f"no errors, {warned} warning(s)")
    except OpdError as exc:
        _fail(exc)


@app.command()
def distill(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Off-policy baseline: the student learns from teacher traces (SFT or forward KL)."""
    try:
        from opdcli.config import DistillRunConfig
        from opdcli.loops.distill import run_distill

        cfg, explicit = _load(DistillRunConfig, config, "distill.yaml", list(set_ or []))
        try:
            result = run_distill(cfg, explicit, argv=sys.argv)
        except KeyboardInterrupt:  # the loop has saved a checkpoint and said how to resume
            raise typer.Exit(code=130) from None
        _summary("opd distill: held-out evaluation", result)
    except OpdError as exc:
        _fail(exc)


@app.command()
def sweep(
    config: Annotated[Path, typer.Option("--config", "-c", help="Sweep YAML (e.g. configs/toy/ablation.yaml).")],
    skip_done: Annotated[bool, typer.Option("--skip-done", help="Reuse runs that finished with exactly the planned config (add seeds or methods without retraining the rest).")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key in every run, after the sweep's own set (a method's own set still wins): --set run.device=cuda (repeatable).")] = None,
) -> None:
    """Train several methods from the same student, seed and budget; write a comparison table."""
    try:
        _one_process("sweep")
        from opdcli.loops.sweep import aggregate, run_sweep
        from opdcli.loops.train import run_train

        rows = run_sweep(config, sys.argv, train=run_train, skip_done=skip_done, extra=set_, echo=typer.echo)

        for row in aggregate(rows):
            typer.echo(f"{row['method']:14s} acc {100 * row['acc_before']:5.1f}% -> {100 * row['acc_after']:5.1f}%  "
                       f"generated {row['tokens_generated']:8.0f}  trained {row['tokens_trained']:8.0f}  "
                       f"{row['wall_s']:6.0f} s")
    except OpdError as exc:
        _fail(exc)


@app.command("evaluate", hidden=True)
@app.command("eval")
def eval_(
    action: Annotated[str | None, typer.Argument(help="'fetch': only download and cache the bench's data.")] = None,
    bench: Annotated[str | None, typer.Option("--bench", "-b", help="Benchmark name (see --list), or a stock lm-eval task with --harness lm-eval.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model folder, hub id, or toy:teacher / toy:student.")] = None,
    generator: Annotated[str, typer.Option("--generator", "--backend", help="hf, vllm or replay.")] = "hf",
    harness: Annotated[str, typer.Option(help="native (default) or lm-eval.")] = "native",
    include_path: Annotated[Path | None, typer.Option(help="--harness lm-eval: a folder of your own lm-eval task YAMLs; --bench names one.")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the benchmarks and exit.")] = False,
    preset: Annotated[str | None, typer.Option(help="Sampling preset: qwen3-thinking, qwen3-nothink, greedy.")] = None,
    n: Annotated[int | None, typer.Option("--n", "-n", help="Samples per problem (k).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (0: greedy).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Top-k sampling (0: off).")] = None,
    min_p: Annotated[float | None, typer.Option(help="Min-p sampling (vllm only).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max new tokens per sample.")] = None,
    thinking: Annotated[bool | None, typer.Option("--thinking/--no-thinking", help="enable_thinking of the chat template.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    data: Annotated[str | None, typer.Option(help="Local file with the bench's rows in the upstream format.")] = None,
    completions: Annotated[str | None, typer.Option(help="JSONL of completions for --generator replay.")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N problems.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: runs/eval/<bench>-<model>-<time>).")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Evaluate every checkpoints/step_N of this training run.")] = None,
    release: Annotated[str | None, typer.Option(help="LiveCodeBench release (release_v6, v5, v4_v6, ...).")] = None,
    start_date: Annotated[str | None, typer.Option(help="LiveCodeBench: first contest date (YYYY-MM-DD).")] = None,
    end_date: Annotated[str | None, typer.Option(help="LiveCodeBench: last contest date (YYYY-MM-DD).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N (hf generator).")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Sequences generated at once (hf).")] = 64,
    max_model_len: Annotated[int | None, typer.Option(help="vLLM context length (prompt + max tokens).")] = None,
    score_timeout: Annotated[float, typer.Option(help="Deadline per math check / code test, seconds.")] = 10.0,
    workers: Annotated[int, typer.Option(help="Scoring worker processes.")] = 2,
    allow_unsafe_code: Annotated[bool, typer.Option(
        "--allow-unsafe-code", help="Run code answers even without OS isolation (bubblewrap): hostile programs "
        "can then escape. Recorded in results.json.")] = False,
) -> None:
    """Evaluate a model on a benchmark (AIME, AMC, HMMT, GPQA, LiveCodeBench, toy-arith)."""
    args = dict(locals(), argv=sys.argv)
    try:
        _one_process("eval")
        from benchmarks.cli_eval import run_cli

        run_cli(args)
    except OpdError as exc:
        _fail(exc)


@app.command()
def diagnose(
    rollouts: Annotated[list[Path], typer.Argument(help="rollouts.jsonl files, analysed together.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: CSVs, PNGs, report.md, report.html, summary.json.")],
    format_: Annotated[str, typer.Option("--format", help="table: a summary table; json: summary.json on stdout (nothing else).")] = "table",
    bins: Annotated[int, typer.Option(help="Relative-position bins.")] = 10,
    workers: Annotated[int | None, typer.Option(help="Worker processes for inputs over 64 MiB (default: CPU count, at most 8).")] = None,
) -> None:
    """Teachability analyses of rollouts: advantage decay, teacher margins, release rule, Prune-OPD, TOPD, freshness."""
    try:
        _one_process("diagnose")
        from diagnostics.run import run_diagnose

        run_diagnose(rollouts, out, bins=bins, fmt=format_, workers=workers)
    except OpdError as exc:
        _fail(exc)


@app.command()
def rollout(
    student: Annotated[str | None, typer.Option(help="Student model (default: the config's, toy:student).")] = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher model (default: the config's, toy:teacher).")] = None,
    prompts: Annotated[str | None, typer.Option(help="Prompt file (.jsonl, .json, .parquet) or hf:<dataset> (default: the toy task).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="rollouts.jsonl file to write.")] = Path("runs/rollouts.jsonl"),
    n: Annotated[int | None, typer.Option("--n", "-n", help="Samples per prompt (rollout.samples_per_prompt).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation budget per sample (rollout.max_new_tokens).")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Top-K entries stored per token for both models, at most 64 (scoring.top_k).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out when it already exists.")] = False,
) -> None:
    """Sample from the student and score with the teacher, without training; writes rollouts.jsonl."""
    try:
        _one_process("rollout")
        from opdcli.config import TrainRunConfig
        from opdcli.loops.rollout import apply_flags, run_rollout, set_keys

        cfg, _ = _load(TrainRunConfig, config, "opd.yaml", list(set_ or []))
        cfg = apply_flags(cfg, student=student, teacher=teacher, prompts=prompts, n=n,
                          max_new_tokens=max_new_tokens, top_k=top_k)
        result = run_rollout(cfg, out, overrides=set_keys(set_), overwrite=overwrite)
        typer.echo(f"wrote {result.records} records ({result.tokens} scored tokens, top-K {result.topk}) "
                   f"to {result.out} in {result.seconds:.1f} s")
    except OpdError as exc:
        _fail(exc)


@toy_app.command("build")
def toy_build(
    which: Annotated[list[str] | None, typer.Argument(help="Models to build (default: every model of --world, in order): teacher, student, teacher-long, student-long, teacher-add, teacher-mul (domain experts grown from student); teacher-forms-8, teacher-forms, teacher-forms-symbolic, student-forms-8, student-forms, student-forms-plus (a model starting from another is built after it, in the same --out).")] = None,
    world: Annotated[str, typer.Option(help="arith: the first toy world (about 30 minutes on 2 CPU cores); forms: the second (opdcli.toy.forms).")] = "arith",
    out: Annotated[Path | None, typer.Option(help="Output folder (default: the shipped weights folder).")] = None,
    steps: Annotated[int | None, typer.Option(help="Override the SFT steps (for quick checks).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and the data stream.")] = 0,
) -> None:
    """Rebuild the toy models from scratch."""
    try:
        _one_process("toy build")
        import time

        import torch

        from opdcli.errors import ConfigError
        from opdcli.loops.distill import run_distill
        from opdcli.loops.toy_build import TOY_SPECS, build_toy_model
        from opdcli.models import TOY_WEIGHTS

        worlds = sorted({spec.world for spec in TOY_SPECS.values()})
        if world not in worlds:
            raise ConfigError(f"unknown toy world '{world}'; choose from {', '.join(worlds)}")
        names = which or [name for name, spec in TOY_SPECS.items() if spec.world == world]
        for name in names:
            if name not in TOY_SPECS:
                raise ConfigError(f"unknown toy model '{name}'; choose from {', '.join(TOY_SPECS)}")
        torch.set_num_threads(min(2, torch.get_num_threads()))
        root = out or TOY_WEIGHTS
        if root.exists() and not root.is_dir():
            raise ConfigError(f"--out '{root}' is a file; pass a folder (it is created if missing)")
        if steps is not None and steps < 1:
            raise ConfigError(f"--steps is {steps}; it must be at least 1")
        for name in names:
            start = time.perf_counter()
            metrics = build_toy_model(TOY_SPECS[name], root / name, distill=run_distill, seed=seed, steps=steps)
            acc = metrics.get("eval/heldout/accuracy", float("nan"))
            typer.echo(f"{name}: held-out accuracy {100 * acc:.1f}% in {time.perf_counter() - start:.0f} s "
                       f"-> {root / name}")
    except OpdError as exc:
        _fail(exc)


def main() -> None:
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("default", category=UserWarning, module="opdcli")
    app()


if __name__ == "__main__":
    main()
