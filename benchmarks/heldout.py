"""A training config's held-out evaluation, run on any models or checkpoints afterwards.

    python -m benchmarks.heldout --config configs/toy/forms/opd.yaml toy:student-forms \\
        runs/toy-forms-prune/opd-compatible-seed0/checkpoints/latest --samples 4 --temperature 1.0

The held-out problems, generation budget, stop tokens and batch size are the config's (the
`eval.*` and `data.*` keys, after `--set`), and the numbers come from the same function training
logs `eval/heldout/...` with, so a sweep can keep only its greedy curve during training and take
the costlier sampled evaluation (avg@n) once per final checkpoint, and once for the starting
model instead of once per run. Prints one row per model (greedy, and sampled with --samples)
and writes heldout.csv under --out.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from opdcli.config import TrainRunConfig, load_config
from opdcli.data import heldout_prompts
from opdcli.errors import ConfigError, OpdError
from opdcli.models import (
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from opdcli.run.heldout import heldout_accuracy


def evaluate(name: str, cfg: TrainRunConfig, samples: int, temperature: float, seed: int,
             greedy: bool = True) -> dict[str, float | str]:
    """Greedy (unless `greedy` is false) and, with samples > 0, sampled held-out metrics of one
    model under `cfg`."""
    device = resolve_device(cfg.run.device)
    tok = load_tokenizer(name)
    model = load_model(name, device, resolve_dtype(cfg.run.dtype, device))
    prompts = heldout_prompts(cfg.data, cfg.eval.size)
    if prompts is None:
        raise ConfigError("the config has no held-out set (data.eval_source, or the toy task); nothing to evaluate")
    tokens = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    stops = tuple(cfg.rollout.stop_tokens)
    row: dict[str, float | str] = {"model": name, "problems": len(prompts)}
    if greedy:
        row |= heldout_accuracy(model, tok, prompts, tokens, cfg.eval.batch_size, prefix="greedy", stop_tokens=stops)
    if samples > 0:
        row |= heldout_accuracy(model, tok, prompts, tokens, cfg.eval.batch_size, prefix="sampled", stop_tokens=stops,
                                samples=samples, temperature=temperature, seed=seed)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model folders, checkpoints/latest files, toy:<name> or hub ids")
    ap.add_argument("--config", "-c", required=True, help="the training config whose held-out set to use")
    ap.add_argument("--set", "-s", action="append", default=[], help="override a config key (repeatable)")
    ap.add_argument("--samples", type=int, default=0, help="sampled answers per problem (0: greedy only)")
    ap.add_argument("--temperature", type=float, default=1.0, help="temperature of the sampled answers")
    ap.add_argument("--seed", type=int, default=1234, help="noise seed (training's eval.seed default)")
    ap.add_argument("--no-greedy", action="store_true",
                    help="only the sampled evaluation (the runs' metrics already hold the greedy one)")
    ap.add_argument("--out", type=Path, default=Path("heldout"))
    args = ap.parse_args(argv)
    if args.samples < 0 or (args.samples and not args.temperature > 0):
        ap.error("--samples must be >= 0, and sampled answers need --temperature > 0")
    if args.no_greedy and not args.samples:
        ap.error("--no-greedy leaves nothing to evaluate; add --samples N")
    try:
        cfg, _ = load_config(TrainRunConfig, args.config, args.set)
        for name in args.models:
            resolve_model_path(name)  # a wrong path fails before any model loads
        rows = []
        for name in args.models:
            rows.append(evaluate(name, cfg, args.samples, args.temperature, args.seed, greedy=not args.no_greedy))
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                  flush=True)
    except OpdError as exc:
        raise SystemExit(f"error: {exc}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "heldout.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out / 'heldout.csv'}")


if __name__ == "__main__":
    main()
