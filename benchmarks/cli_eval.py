"""The body of `opd eval` / `opd evaluate`: turn the flags into `EvalOptions` and dispatch.

`opd eval --list` lists the benches; `opd eval fetch --bench X` only downloads and caches;
`--run-dir DIR` evaluates every checkpoint of a training run; `--harness lm-eval` goes through
lm-evaluation-harness; otherwise the native path (`benchmarks.runner.run_eval`).
"""

from __future__ import annotations

from typing import Any

import typer

from opdcli.errors import ConfigError

SAMPLING_FLAGS = ("n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "thinking", "seed")
BENCH_FLAGS = ("release", "start_date", "end_date")


def list_benches() -> None:
    from benchmarks.registry import BENCHMARKS

    for name, spec in sorted(BENCHMARKS.items()):
        source = spec.dataset.get("hub") or f"generated ({spec.dataset.get('generator')})"
        typer.echo(f"{name:14s} {spec.kind:5s} v{spec.version}  {source:38s} {spec.description}")


def build_options(args: dict[str, Any]) -> Any:
    from benchmarks.runner import EvalOptions
    from benchmarks.scorers import ScoreConfig

    if args["harness"] not in ("native", "lm-eval"):
        raise ConfigError(f"--harness '{args['harness']}' is not one of native, lm-eval")
    if args.get("include_path") and args["harness"] != "lm-eval":
        raise ConfigError("--include-path adds lm-eval tasks; it needs --harness lm-eval")
    sampling = {k: args[k] for k in SAMPLING_FLAGS if args.get(k) is not None}
    score = ScoreConfig(timeout=args["score_timeout"], workers=args["workers"],
                        allow_unsafe_code=bool(args.get("allow_unsafe_code")))
    return EvalOptions(
        bench=args["bench"], model=args["model"], generator=args["generator"], harness=args["harness"],
        preset=args["preset"], sampling=sampling, data=args["data"], completions=args["completions"],
        limit=args["limit"], out=str(args["out"]) if args["out"] else None,
        bench_options={k: args[k] for k in BENCH_FLAGS if args.get(k) is not None},
        device=args["device"], dtype=args["dtype"], batch_size=args["batch_size"],
        max_model_len=args["max_model_len"], score=score, argv=list(args.get("argv") or []),
        include_path=str(args["include_path"]) if args.get("include_path") else None,
    )


def fetch_only(opts: Any) -> None:
    from benchmarks.data import check_options, fetch, load_cached
    from benchmarks.registry import get_bench

    spec = get_bench(opts.bench)
    if opts.data:
        raise ConfigError("`opd eval fetch` downloads from the Hub; --data FILE needs no fetching")
    options = check_options(spec, opts.bench_options, None)
    folder = fetch(spec, options)
    rows, manifest = load_cached(spec, options)
    typer.echo(f"{spec.name}: {len(rows)} rows, sha256 {manifest['sha256'][:16]}…, revision "
               f"{manifest.get('revision')} -> {folder}")


def run_cli(args: dict[str, Any]) -> None:
    """Dispatch one `opd eval` invocation (args: the command's parameters by name)."""
    if args["list_"]:
        list_benches()
        return
    if args["action"] not in (None, "fetch"):
        raise ConfigError(f"unknown eval action '{args['action']}'; the only one is 'fetch' "
                          "(opd eval fetch --bench NAME)")
    if not args["bench"]:
        raise ConfigError("--bench is required (see opd eval --list)")
    opts = build_options(args)
    if args["action"] == "fetch":
        fetch_only(opts)
        return
    if args["run_dir"] is not None:
        if opts.harness != "native":
            raise ConfigError("--run-dir works with the native harness only; drop --harness lm-eval")
        from benchmarks.runner import run_checkpoints

        rows, out_root = run_checkpoints(opts, args["run_dir"])
        for row in rows:
            typer.echo(f"step {row['step']:>6}: avg@k {100 * row['avg@k']:5.1f}%  ({row['checkpoint']})")
        typer.echo(f"accuracy vs step: {out_root / 'accuracy_vs_step.csv'} and .png")
        return
    if opts.harness == "lm-eval":
        from benchmarks.harness.lm_eval_adapter import run_lm_eval

        result = run_lm_eval(opts)
    else:
        from benchmarks.runner import run_eval

        result = run_eval(opts)
    from benchmarks.report import print_table

    print_table(result.results)
    typer.echo(f"results: {result.out_dir / 'results.json'}")
